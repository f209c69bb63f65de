"""The converged Fashion-MNIST table (docs/results.md, "Time to accuracy"), from the run directories
``profiling/converged.sh`` writes: ``<runs>/main/<variant>/s<seed>``.

    python profiling/converged_table.py outputs/converged --clock cpu --out docs/results/converged

Per variant, over its seeds (mean ± std): the final test accuracy; the time to the common target
on ``--clock`` (the highest accuracy that *every* run of the table reaches, or ``--target``; the
time of the run's first evaluation at or above it, training time only, as
``profiling/compare.py`` reports it) and its ratio to ``sgd``'s mean; the in-run speedup against
the all-SGD step measured beside it (summary ``mean_speedup``: every epoch, warm-up included; a
wall-clock figure, so load moves it); the last epoch's CPU time (``epoch_cpu_s``, the deepest
boundary) and sgd's over it; the peak footprint of a step at the last epoch; the gradient + delta
bytes per step of the last epoch (from ``<runs>/bytes/<variant>``, a short 2-rank run, when
present). It prints the markdown table and draws accuracy against the clock for every run
(``accuracy_vs_<clock>_clock.png`` in ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling compare.py
from compare import Run, common_target, load_dir, plot_accuracy_vs_clock, time_to  # noqa: E402

from distlocal.tta import CLOCKS  # noqa: E402

ORDER = ("sgd", "freeze", "local", "local_tuned", "local_lever")


def _runs(root: Path, groups: tuple[str, ...] = ("main",)) -> dict[str, list[Run]]:
    """``{variant: [finished runs]}`` under ``root/<group>`` for each group (a run without
    summary.json is skipped); a variant outside ``main`` is named ``<group>/<variant>``."""
    out: dict[str, list[Run]] = {}
    for group in groups:
        for d in sorted((root / group).glob("*/s*")):
            if (d / "summary.json").is_file():
                run = load_dir(d)
                variant = d.parent.name if group == "main" else f"{group}/{d.parent.name}"
                run.name = f"{variant}/{d.name}"
                out.setdefault(variant, []).append(run)
    def rank(kv: tuple[str, list[Run]]) -> tuple[str, int]:  # group, then sgd, freeze, local
        mode = kv[0].split("/")[-1]
        return kv[0].rpartition("/")[0], ORDER.index(mode) if mode in ORDER else len(ORDER)

    return dict(sorted(out.items(), key=rank))


def _ms(xs: list[float], fmt: str = "{:.2f}") -> str:
    """``mean ± std`` (std over seeds; none for one value), or ``–``."""
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def _reached(runs: list[Run], clock: str, target: float | None) -> list[float]:
    """The time to ``target`` on ``clock`` of each run that reaches it."""
    times = [] if target is None else [time_to(r, clock, target) for r in runs]
    return [t for t in times if t is not None]


def _bytes(root: Path, variant: str) -> str:
    """Gradient + delta bytes per step of the last epoch of ``root/bytes/<variant>`` (2 ranks;
    ``bytes/long/<mode>`` for the long group's schedule: ``PHASE=bytes BYTES_GROUP=long``)."""
    d = root / "bytes" / variant
    if not (d / "summary.json").is_file():  # not run, or not finished
        return "–"
    run = load_dir(d)
    return f"{run.last('grad_allreduce_bytes') or 0:,.0f} + {run.last('delta_sync_bytes') or 0:,.0f}"


def table(
    root: Path, clock: str, target: float | None, groups_: tuple[str, ...] = ("main",)
) -> tuple[str, float | None, list[Run]]:
    """The markdown table, the target used and every run, over the run groups ``groups_``
    (``main``: the converged variants; ``switch``, ``long``: the switch-time and plateau runs)."""
    groups = _runs(root, groups_)
    if not groups:
        where = f"{root}/{{{','.join(groups_)}}}/<variant>/s<seed>"
        raise SystemExit(f"converged_table.py: no finished run under {where}; run converged.sh first")
    everyone = [r for runs in groups.values() for r in runs]
    target = common_target(everyone, clock) if target is None else target
    times = {v: _reached(runs, clock, target) for v, runs in groups.items()}
    ref = next((v for v in groups if v.split("/")[-1] == "sgd"), None)  # sgd, or long/sgd
    sgd = statistics.mean(times[ref]) if ref and times[ref] else None
    head = (f"| variant | seeds | final test acc % | {clock} s to {target:.2f} % | sgd / this "
            "| last-epoch CPU s (sgd / this) | in-run speedup (wall) | peak footprint MiB "
            "| grad + delta B/step |")
    lines = [head, "|" + "---|" * 9]
    last_cpu = {v: [run.last("epoch_cpu_s") for run in runs] for v, runs in groups.items()}
    sgd_last = statistics.mean(last_cpu[ref]) if ref else None
    for v, runs in groups.items():
        acc = [r.summary["final_test_acc"] for r in runs]
        spd = [r.summary["mean_speedup"] for r in runs if r.summary.get("mean_speedup") is not None]
        fp = [r.summary["footprint_bytes"] / 2**20 for r in runs if r.summary.get("footprint_bytes")]
        ratio = [sgd / t for t in times[v]] if sgd else []
        last = _ms(last_cpu[v], "{:.0f}")
        if sgd_last:
            last += f" ({sgd_last / statistics.mean(last_cpu[v]):.2f}×)"
        lines.append(f"| {v} | {len(runs)} | {_ms(acc)} | {_ms(times[v], '{:.0f}')} | {_ms(ratio, '{:.3f}')} "
                     f"| {last} | {_ms(spd, '{:.3f}')} | {_ms(fp, '{:.1f}')} | {_bytes(root, v)} |")
    return "\n".join(lines), target, everyone


def targets_table(root: Path, clock: str, targets: list[float], groups_: tuple[str, ...]) -> str:
    """Time on ``clock`` to each of ``targets``, per variant of every group (mean ± std over the
    seeds that reach it; ``k/n`` says how many of the n seeds did, ``–`` none): which mode *and
    budget* reaches an accuracy first."""
    groups = _runs(root, groups_)
    head = "| variant | seeds | " + " | ".join(f"{clock} s to {t:.2f} %" for t in targets) + " |"
    lines = [head, "|" + "---|" * (len(targets) + 2)]
    for v, runs in groups.items():
        cells = []
        for t in targets:
            hits = _reached(runs, clock, t)
            cell = _ms(hits, "{:.0f}")
            cells.append(cell if len(hits) == len(runs) or not hits else f"{cell} ({len(hits)}/{len(runs)})")
        lines.append(f"| {v} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    """Print the table; draw accuracy against the clock."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="the RUNS directory of profiling/converged.sh")
    ap.add_argument("--clock", choices=CLOCKS, default="cpu")
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None, help="where to draw accuracy against the clock")
    ap.add_argument("--groups", nargs="+", default=["main"],
                    help="run groups under RUNS to tabulate together (main, switch, long)")
    ap.add_argument("--targets", type=float, nargs="+", default=None,
                    help="also print the time to each of these accuracies, per variant and group")
    args = ap.parse_args(argv)
    text, target, runs = table(args.runs, args.clock, args.target, tuple(args.groups))
    print(text)
    if args.targets:
        print("\n" + targets_table(args.runs, args.clock, args.targets, tuple(args.groups)))
    if args.out is not None:
        print(f"wrote {plot_accuracy_vs_clock(runs, args.clock, target, args.out)}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
