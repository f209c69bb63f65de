"""Compare training runs side by side: a table on stdout and four PNG plots.

    python profiling/compare.py outputs/run_local outputs/run_sgd --out plots/

Each run is a run directory written by the trainer (``metrics.jsonl``, ``summary.json``,
``config.yaml``) or, online, a wandb run path ``entity/project/run_id`` (needs ``WANDB_API_KEY``;
offline such paths are skipped with a message). The table has one row per run: mode, rule, final
and best accuracy, end-to-end time, the mean per-epoch speedup against the run's own all-SGD
reference, the peak-footprint and activation reductions at the last epoch (``footprint_reduction``,
``activation_reduction``), the final boundary and — when a ``mode=sgd`` run is among the inputs —
the end-to-end speedup against it. Plots, in ``--out``: ``boundary_vs_epoch.png``,
``footprint_vs_epoch.png`` (peak footprint of a step; dashed: the run's all-SGD reference),
``activation_memory_vs_epoch.png``, ``epoch_time_vs_epoch.png``, ``accuracy_vs_wall_time.png`` (wall
time = cumulative epoch time, evaluation excluded), and ``footprint_by_category.png`` (the peak
footprint of a step by category, each run beside its all-SGD reference, at the last epoch and, with
``--epoch N``, at epoch N; ``profiling/footprint_plot.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script footprint_plot.py
import footprint_plot  # noqa: E402

PLOTS = ("boundary_vs_epoch.png", "footprint_vs_epoch.png", "activation_memory_vs_epoch.png",
         "epoch_time_vs_epoch.png", "accuracy_vs_wall_time.png")
_WANDB_PATH = re.compile(r"^[\w.-]+/[\w.-]+/[\w-]+$")
# MetricsLogger's wandb prefixes (distlocal/metrics.py), stripped to get the flat keys back.
_WANDB_PREFIXES = ("train/", "test/", "time/", "mem/", "local/", "comm/")


@dataclass
class Run:
    """One run's epoch rows, summary and config."""

    name: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return str(self.summary.get("mode") or self.config.get("mode") or "?")

    @property
    def rule(self) -> str:
        if self.mode == "sgd":
            return "-"  # the trainer records cfg.local.rule even when no stage is ever local
        if self.mode == "freeze":
            return "freeze"
        return str(self.summary.get("rule") or (self.config.get("local") or {}).get("rule") or "?")

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(epoch, value)`` for the epochs where ``key`` is present and not null."""
        return [(int(r.get("epoch", i)), r[key]) for i, r in enumerate(self.rows) if r.get(key) is not None]


def load_dir(path: Path) -> Run:
    """A run directory written by the trainer; a missing summary/config yields empty dicts."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is this a distlocal run directory?)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)  # type: ignore[assignment]
    return Run(path.name, rows, summary, config)


def load_wandb(path: str) -> Run | None:
    """A wandb run ``entity/project/run_id``; ``None`` (with a message) when offline or unreachable."""
    if not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        print(f"compare: skipping wandb run {path}: offline "
              "(no WANDB_API_KEY, or WANDB_MODE offline/disabled)", file=sys.stderr)
        return None
    try:
        import wandb

        run = wandb.Api(timeout=30).run(path)
        rows = []
        for h in run.scan_history():
            row = {}
            for k, v in h.items():
                flat = next((k[len(p):] for p in _WANDB_PREFIXES if k.startswith(p)), k)
                if "/" not in flat and not flat.startswith("_"):
                    row[flat] = v
            if "_step" in h:
                row["epoch"] = h["_step"]
            rows.append(row)
        return Run(run.name, rows, dict(run.summary), dict(run.config))
    except Exception as exc:  # network, auth, unknown run: skip it, compare the rest
        print(f"compare: skipping wandb run {path}: {exc}", file=sys.stderr)
        return None


def _last(run: Run, key: str) -> Any:
    s = run.series(key)
    return s[-1][1] if s else None


def _setup(run: Run) -> tuple[Any, ...]:
    """What must match for an end-to-end comparison with a ``mode=sgd`` run: model, data, length."""
    c, t = run.config, run.config.get("trainer") or {}
    return (c.get("model"), (c.get("data") or {}).get("name"), t.get("epochs"), t.get("batch_size"),
            t.get("max_steps_per_epoch"), run.summary.get("world_size"))


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One dict per run with the table's values (``None`` where the run lacks the data).

    ``e2e_vs_sgd`` is the end-to-end time of a ``mode=sgd`` run among the inputs with the same
    model, data set, epochs, batch size, step cap and world size, over this run's.
    """
    sgd_runs = [r for r in runs if r.mode == "sgd" and r.summary.get("end_to_end_s")]
    out = []
    for r in runs:
        sgd = next((s for s in sgd_runs if _setup(s) == _setup(r)), None)
        speedups = [v for _, v in r.series("speedup")]
        mean_speedup = statistics.fmean(speedups) if speedups else None
        e2e = r.summary.get("end_to_end_s")
        out.append({
            "run": r.name, "mode": r.mode, "rule": r.rule,
            "final_acc": r.summary.get("final_test_acc", _last(r, "test_acc")),
            "best_acc": r.summary.get("best_test_acc",
                                      max((v for _, v in r.series("test_acc")), default=None)),
            "end_to_end_s": e2e,
            "mean_speedup": r.summary.get("mean_speedup") or mean_speedup,
            "footprint_reduction": _last(r, "footprint_reduction"),
            "act_reduction": _last(r, "activation_reduction") or r.summary.get("final_activation_reduction"),
            "final_boundary": r.summary.get("final_boundary", _last(r, "boundary")),
            "e2e_vs_sgd": sgd.summary["end_to_end_s"] / e2e if sgd is not None and e2e else None,
        })
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table; ``-`` for missing values."""
    cols = [("run", "run", "{}"), ("mode", "mode", "{}"), ("rule", "rule", "{}"),
            ("final_acc", "final acc %", "{:.2f}"), ("best_acc", "best acc %", "{:.2f}"),
            ("end_to_end_s", "end-to-end s", "{:.1f}"), ("mean_speedup", "mean speedup", "{:.3f}"),
            ("footprint_reduction", "footprint reduction", "{:.2f}x"),
            ("act_reduction", "activation reduction", "{:.2f}x"), ("final_boundary", "final boundary", "{}"),
            ("e2e_vs_sgd", "e2e vs sgd run", "{:.3f}")]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append(["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _plot(runs: list[Run], path: Path, title: str, xlabel: str, ylabel: str,
          xy: Any, step: bool = False, ref: Any = None) -> None:
    """One line per run from ``xy(run) -> (xs, ys)`` (and, with ``ref``, a dashed line of the same
    colour from ``ref(run)``); a 'no data' note when no run has any."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = 0
    for r in runs:
        xs, ys = xy(r)
        if not xs:
            continue
        drawn += 1
        if step:
            line = ax.step(xs, ys, where="post", marker="o", label=r.name)[0]
        else:
            line = ax.plot(xs, ys, marker="o", label=r.name)[0]
        if ref is not None:
            rx, ry = ref(r)
            if rx:
                ax.plot(rx, ry, linestyle="--", color=line.get_color(), label=f"{r.name} (all-SGD ref)")
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _unzip(pairs: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    return [p[0] for p in pairs], [p[1] for p in pairs]


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """The PNGs of :data:`PLOTS`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / p for p in PLOTS]

    def acc_vs_time(r: Run) -> tuple[list[float], list[float]]:
        t, xs, ys = 0.0, [], []
        for row in r.rows:
            t += row.get("epoch_time_s") or 0.0
            if row.get("test_acc") is not None:
                xs.append(t)
                ys.append(row["test_acc"])
        return xs, ys

    _plot(runs, paths[0], "Boundary (stages [0, k) local)", "epoch", "boundary k",
          lambda r: _unzip(r.series("boundary")), step=True)
    _plot(runs, paths[1], "Peak memory footprint of a training step", "epoch", "MiB",
          lambda r: _unzip([(e, v / 2**20) for e, v in r.series("footprint_bytes")]),
          ref=lambda r: _unzip([(e, v / 2**20) for e, v in r.series("footprint_ref_bytes")]))
    _plot(runs, paths[2], "Activation memory saved for backward", "epoch", "MiB",
          lambda r: _unzip([(e, v / 2**20) for e, v in r.series("activation_bytes")]))
    _plot(runs, paths[3], "Epoch time (training loop)", "epoch", "s",
          lambda r: _unzip(r.series("epoch_time_s")))
    _plot(runs, paths[4], "Test accuracy vs wall time", "cumulative epoch time (s)", "test accuracy %",
          acc_vs_time)
    return paths


def _unique_names(runs: list[Run], sources: list[str]) -> None:
    """Hydra names run dirs by time: if two runs share a name, use the path they came from."""
    names = [r.name for r in runs]
    for r, src in zip(runs, sources):
        if names.count(r.name) > 1:
            r.name = src


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Load the runs, print the table, write the plots; returns the table rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories or wandb paths entity/project/run_id")
    ap.add_argument("--out", type=Path, default=Path("."), help="directory for the PNGs (default: .)")
    ap.add_argument("--epoch", type=int, default=None,
                    help="also draw the footprint by category at this epoch (besides the last)")
    args = ap.parse_args(argv)
    runs, sources = [], []
    for src in args.runs:
        p = Path(src)
        if p.is_dir():
            runs.append(load_dir(p))
        elif _WANDB_PATH.match(src):
            run = load_wandb(src)
            if run is None:
                continue
            runs.append(run)
        else:
            ap.error(f"{src}: neither a run directory nor a wandb path entity/project/run_id")
        sources.append(src)
    if not runs:
        sys.exit("compare: no run to compare")
    _unique_names(runs, sources)
    rows = table_rows(runs)
    print(format_table(rows))
    for p in [*write_plots(runs, args.out), footprint_plot.write(runs, args.out, args.epoch)]:
        print(f"compare: wrote {p}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
