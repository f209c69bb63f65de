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

Time to accuracy (``--clock wall|cpu|device``, default ``cpu``): each run's accuracy against its
cumulative training time on that clock (``distlocal/profiler/clocks.py``; the ``kind: eval`` rows of
``trainer.eval_every_steps`` when the run has them, else one point per epoch; the validation
accuracy when the run has a validation split, else test). The target is ``--target`` or, by
default, the highest accuracy that every compared run reaches; each run's time is that of its first
evaluation at or above it, and ``sgd / this`` is the (median) time of the ``mode=sgd`` runs among
the inputs over this run's. ``accuracy_vs_<clock>_clock.png`` plots the curves and the target.
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

from distlocal.tta import CLOCKS, first_crossing  # noqa: E402

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

    def last(self, key: str) -> Any:
        """The last non-null value of ``key`` (its last epoch's), or None."""
        s = self.series(key)
        return s[-1][1] if s else None


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
            "final_acc": r.summary.get("final_test_acc", r.last("test_acc")),
            "best_acc": r.summary.get("best_test_acc",
                                      max((v for _, v in r.series("test_acc")), default=None)),
            "end_to_end_s": e2e,
            "mean_speedup": r.summary.get("mean_speedup") or mean_speedup,
            "footprint_reduction": r.last("footprint_reduction"),
            "act_reduction": r.last("activation_reduction") or r.summary.get("final_activation_reduction"),
            "final_boundary": r.summary.get("final_boundary", r.last("boundary")),
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


# ------------------------------------------------------------------ time to accuracy
def clock_points(run: Run, clock: str) -> list[dict[str, float]]:
    """``[{"t": cumulative training time on clock, "acc": accuracy}]`` in training order: the
    evaluation rows if the run has any, else its epoch rows (validation accuracy if present, else
    test). Runs written before the clocks have the wall clock only (cumulative ``epoch_time_s``)."""
    evals = [r for r in run.rows if r.get("kind") == "eval"]
    key = f"train_{clock}_s"
    if evals:
        return [{"t": r[key], "acc": r["eval_acc"]} for r in evals
                if r.get(key) is not None and r.get("eval_acc") is not None]
    out, wall = [], 0.0
    for r in run.rows:
        wall += r.get("epoch_time_s") or 0.0
        t = r.get(key, wall if clock == "wall" else None)
        acc = r.get("val_acc", r.get("test_acc"))
        if t is not None and acc is not None:
            out.append({"t": t, "acc": acc})
    return out


def common_target(runs: list[Run], clock: str) -> float | None:
    """The highest accuracy every run with points on ``clock`` reaches (``None`` without any)."""
    bests = [max(p["acc"] for p in pts) for pts in (clock_points(r, clock) for r in runs) if pts]
    return min(bests) if bests else None


def time_to(run: Run, clock: str, target: float) -> float | None:
    """The time on ``clock`` of ``run``'s first evaluation at or above ``target`` (``None``: not
    reached, or no such clock)."""
    hit = first_crossing(clock_points(run, clock), target)
    return None if hit is None else hit["t"]


def tta_rows(runs: list[Run], clock: str, target: float) -> list[dict[str, Any]]:
    """Per run: :func:`time_to` ``target`` and ``vs_sgd`` = the median such time of the ``mode=sgd``
    runs / it."""
    out = [{"run": r.name, "mode": r.mode, "rule": r.rule, "time_s": time_to(r, clock, target)} for r in runs]
    sgd = [row["time_s"] for row in out if row["mode"] == "sgd" and row["time_s"] is not None]
    ref = statistics.median(sgd) if sgd else None
    for row in out:
        row["vs_sgd"] = ref / row["time_s"] if ref is not None and row["time_s"] else None
    return out


def format_tta(rows: list[dict[str, Any]], clock: str, target: float, default: bool) -> str:
    """The time-to-target table, headed by the target and the clock."""
    how = "the highest accuracy every run reaches" if default else "--target"
    head = f"time to {target:.2f} % ({how}) on the {clock} clock (training time, evaluation excluded)"
    cells = [["run", "mode", "rule", f"{clock} s", "sgd / this"]]
    for r in rows:
        t = "not reached" if r["time_s"] is None else f"{r['time_s']:.1f}"
        ratio = "-" if r["vs_sgd"] is None else f"{r['vs_sgd']:.3f}"
        cells.append([r["run"], r["mode"], r["rule"], t, ratio])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join([head, *("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)])


def plot_accuracy_vs_clock(runs: list[Run], clock: str, target: float | None, out: Path) -> Path:
    """``accuracy_vs_<clock>_clock.png``: every run's accuracy against its training time on
    ``clock``, the target dotted."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"accuracy_vs_{clock}_clock.png"
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in runs:
        xs, ys = _unzip([(p["t"], p["acc"]) for p in clock_points(r, clock)])
        if xs:
            ax.plot(xs, ys, marker=".", label=r.name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.2f} %")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {clock}-clock data in these runs", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(title=f"Accuracy vs training time ({clock} clock)", xlabel=f"cumulative training {clock} time (s)",
           ylabel="accuracy %")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def time_to_target(runs: list[Run], clock: str, target: float | None, out: Path) -> list[dict[str, Any]]:
    """Print the time-to-target table on ``clock`` and draw accuracy against it; returns the rows."""
    default = target is None
    target = common_target(runs, clock) if default else target
    plot = plot_accuracy_vs_clock(runs, clock, target, out)
    print(f"compare: wrote {plot}", file=sys.stderr)
    if target is None:
        print(f"compare: no run has accuracy points on the {clock} clock (runs from before the clocks "
              "have the wall clock only)")
        return []
    rows = tta_rows(runs, clock, target)
    print(format_tta(rows, clock, target, default))
    return rows


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
    ap.add_argument("--clock", choices=CLOCKS, default="cpu",
                    help="the clock of the time to accuracy (default: cpu, which machine load barely moves)")
    ap.add_argument("--target", type=float, default=None,
                    help="target accuracy %% (default: the highest accuracy every compared run reaches)")
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
    print()
    time_to_target(runs, args.clock, args.target, args.out)
    return rows


if __name__ == "__main__":
    main()
