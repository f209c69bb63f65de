"""Per-epoch metric sinks: ``metrics.jsonl``, ``summary.csv`` and wandb (rank 0 only)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distlocal.profiler import breakdown


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf: write them as null so every reader parses the file.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Appends one row per epoch to ``metrics.jsonl``, rewrites ``summary.csv``, logs to wandb."""

    def __init__(
        self, run_dir: Path, cfg: DictConfig, enabled: bool, tags: list[str], keep_epochs_below: int = 0,
        keep_evals_upto: int = 0,
    ) -> None:
        """``keep_epochs_below``: on resume, the rows of epochs already done are kept, later ones
        (written after the checkpoint that is resumed) are dropped, so no epoch appears twice.
        ``keep_evals_upto``: the same for evaluation rows (``kind: eval``), by global step: those
        at or before the resumed checkpoint's step stay."""
        self.run_dir = run_dir
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.wandb_run = None
        if not enabled:
            return
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "summary.csv"
        if self.jsonl.exists():
            old = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            self.rows = [r for r in old if (r.get("global_step", 0) <= keep_evals_upto if _is_eval(r)
                                            else r.get("epoch", 0) < keep_epochs_below)]
        self._rewrite()
        if cfg.wandb.mode != "disabled":
            self.wandb_run = _init_wandb(run_dir, cfg, tags)

    def log(self, row: dict[str, Any]) -> None:
        """Record one epoch's row everywhere; an evaluation row (``kind: eval``, ``trainer.eval_every_steps``)
        goes to ``metrics.jsonl`` and to wandb under ``eval/``, not to the per-epoch ``summary.csv``."""
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.wandb_run is None:
            return
        if _is_eval(row):
            # Logged at its epoch's wandb step, so the history keeps an epoch's last evaluation; every
            # evaluation is in the eval/curve table written at the end.
            self.wandb_run.log({f"eval/{k}": v for k, v in row.items() if k not in ("kind", "epoch")
                                and v is not None}, step=int(row["epoch"]))
        else:
            self.wandb_run.log(_wandb_keys(row), step=int(row["epoch"]))

    def _rewrite(self) -> None:
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.jsonl)
        self._write_csv()

    def _epoch_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not _is_eval(r)]

    def _write_csv(self) -> None:
        keys: list[str] = []
        rows = self._epoch_rows()
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        tmp = self.csv.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the run summary (``summary.json`` and ``wandb.summary``) and close wandb."""
        if not self.enabled:
            return
        summary = {k: _clean(v) for k, v in summary.items()}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.wandb_run is not None:
            import wandb

            for k, v in summary.items():
                self.wandb_run.summary[k] = v
            table = wandb.Table(columns=["epoch", "boundary"],
                                data=[[r["epoch"], r.get("boundary", 0)] for r in self._epoch_rows()])
            self.wandb_run.log({"local/boundary_table": table})
            # The footprint by category per epoch, the run's step and its all-SGD reference, in MiB.
            self.wandb_run.log({"mem/footprint_table": wandb.Table(columns=breakdown.TABLE_COLUMNS,
                                                                   data=breakdown.table_rows(self.rows))})
            evals = [r for r in self.rows if _is_eval(r)]
            if evals:
                cols = [k for k in evals[0] if k != "kind"]
                data = [[r.get(k) for k in cols] for r in evals]
                self.wandb_run.log({"eval/curve": wandb.Table(columns=cols, data=data)})
            self.wandb_run.finish()
            self.wandb_run = None


def _is_eval(row: dict[str, Any]) -> bool:
    return row.get("kind") == "eval"


# Flat metrics.jsonl keys are the public contract; wandb gets them under prefixes.
_PREFIX = {
    "train_loss": "train/", "test_loss": "test/", "test_acc": "test/", "lr": "train/",
    "epoch_time_s": "time/", "samples_per_s": "time/", "step_time_s": "time/",
    "step_time_ref_s": "time/", "speedup": "time/", "rebuild_ms": "time/", "sync_ms": "time/",
    "boundary": "local/", "local_lr": "local/", "u": "local/", "u_ratio": "local/", "moved": "local/",
    "skipped_updates": "local/", "drift_max": "local/", "drift_mean": "local/",
    "ws_multiplier": "local/", "ws_backoffs": "local/", "auto_frozen": "local/",
    "val_loss": "val/", "val_acc": "val/",
    "grad_allreduce_bytes": "comm/", "delta_sync_bytes": "comm/",
    # profiler (distlocal/profiler/): the keys its prefix rules below do not already route
    "rss_bytes": "mem/", "profiled_steps": "time/", "timed_steps": "time/", "reference_steps": "time/",
    "profiler_overhead_s": "time/",
    # the training clocks (distlocal/profiler/clocks.py)
    "epoch_cpu_s": "time/", "epoch_cpu_max_s": "time/", "epoch_device_s": "time/", "train_wall_s": "time/",
    "train_cpu_s": "time/", "train_cpu_max_s": "time/", "train_device_s": "time/", "global_step": "train/",
    "data_skipped": "train/",
}


def _wandb_keys(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if k == "epoch" or v is None:
            continue
        if isinstance(v, (list, tuple)):
            # wandb plots scalars: a per-stage list becomes one series per stage (…/0, …/1, …).
            for i, x in enumerate(v):
                if x is not None:
                    out.update(_wandb_keys({f"{k}/{i}": x}))
            continue
        if k.startswith(("time_", "phase_")):
            out["time/" + k] = v
        elif k.startswith(("mem", "activation", "footprint", "peak_", "cuda_", "nvml_", "param_",
                           "grad_bytes", "optim")):
            out["mem/" + k] = v
        elif k.startswith("drift/"):
            out["local/" + k] = v
        else:
            out[_PREFIX.get(k, "") + k] = v
    return out


def _init_wandb(run_dir: Path, cfg: DictConfig, tags: list[str]):
    import wandb

    mode = cfg.wandb.mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        # No key in the environment: keep the run offline (sync later) rather than prompt or hang.
        print("distlocal: WANDB_API_KEY is not set; logging wandb offline (wandb sync later)")
        mode = "offline"
    config = OmegaConf.to_container(cfg, resolve=True)
    return wandb.init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group,
        name=cfg.wandb.name or run_dir.name, tags=list(cfg.wandb.tags) + tags,
        config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True),
    )
