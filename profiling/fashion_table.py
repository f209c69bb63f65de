"""Summarise the Fashion-MNIST benchmark (profiling/fashion.sh) into a docs/results.md section.

    python profiling/fashion_table.py outputs/fashion --doc docs/results.md --plots docs/results/fashion \
        --command "bash profiling/fashion.sh"

Reads ``<runs>/<model>/<variant>/s<seed>/`` run directories (``profiling/compare.py`` loads them
and draws the plots: one line per variant, the first seed of each), and writes, between the
``<!-- fashion:begin -->`` / ``<!-- fashion:end -->`` markers of ``--doc`` (appended when absent):
per model a table with, per variant, the mean ± std over seeds of the final and best test accuracy
and the end-to-end time, the end-to-end ratio to the ``sgd`` variant, ``speedup``,
``footprint_bytes`` and ``footprint_reduction`` (from ``summary.json``, else the last epoch row;
"–" when a run has neither), the gradient and delta all-reduce bytes per step, weak supervision's
cuts, and the stages auto-frozen at the end; then the local variants' ``local_lr`` per epoch.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import Run, load_dir, write_plots  # noqa: E402  (profiling/ is not a package)

BEGIN, END = "<!-- fashion:begin -->", "<!-- fashion:end -->"
DASH = "–"


def _value(run: Run, key: str) -> Any:
    """``key`` from the run summary, else from its last epoch row that has it; ``None`` if neither."""
    if run.summary.get(key) is not None:
        return run.summary[key]
    s = run.series(key)
    return s[-1][1] if s else None


def _mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return DASH
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def _per_step_mean(run: Run, key: str) -> float | None:
    vals = [v for _, v in run.series(key)]
    return statistics.fmean(vals) if vals else None


def load(runs_dir: Path) -> dict[str, dict[str, list[Run]]]:
    """``{model: {variant: [runs by seed]}}`` for the run directories that finished (summary.json)."""
    out: dict[str, dict[str, list[Run]]] = {}
    for model_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        for variant_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            runs = []
            for seed_dir in sorted(variant_dir.glob("s*")):
                if (seed_dir / "summary.json").is_file():
                    run = load_dir(seed_dir)
                    run.name = variant_dir.name
                    runs.append(run)
            if runs:
                out.setdefault(model_dir.name, {})[variant_dir.name] = runs
    return out


def model_table(variants: dict[str, list[Run]], order: list[str]) -> str:
    """The markdown table of one model's variants (in ``order``, unknown ones last)."""
    names = sorted(variants, key=lambda v: (order.index(v) if v in order else len(order), v))
    sgd = variants.get("sgd")
    sgd_e2e = statistics.fmean(r.summary["end_to_end_s"] for r in sgd) if sgd else None
    sgd_loops = [r.summary["train_loop_s"] for r in sgd or [] if r.summary.get("train_loop_s")]
    sgd_loop = statistics.fmean(sgd_loops) if sgd_loops else None
    head = ("| variant | seeds | final acc % | best acc % | end-to-end s | e2e vs sgd | train loop s | "
            "loop vs sgd | speedup | "
            "peak footprint MiB | footprint reduction | grad B/step | delta B/step | ws cuts | "
            "auto-frozen stages (end) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        runs = variants[name]
        e2e = [r.summary["end_to_end_s"] for r in runs if r.summary.get("end_to_end_s")]
        loop = [r.summary["train_loop_s"] for r in runs if r.summary.get("train_loop_s")]
        speedup = [float(v) for r in runs if (v := _value(r, "speedup")) is not None]
        foot = [float(v) / 2**20 for r in runs if (v := _value(r, "footprint_bytes")) is not None]
        foot_red = [float(v) for r in runs if (v := _value(r, "footprint_reduction")) is not None]
        grad = [v for r in runs if (v := _per_step_mean(r, "grad_allreduce_bytes")) is not None]
        delta = [v for r in runs if (v := _per_step_mean(r, "delta_sync_bytes")) is not None]
        cuts = [float(v) for r in runs if (v := _value(r, "ws_backoffs")) is not None and r.mode == "local"]
        frozen = [sum(v) for r in runs if isinstance(v := _value(r, "auto_frozen"), list)]
        ratio = f"{sgd_e2e / statistics.fmean(e2e):.3f}" if sgd_e2e and e2e else DASH
        loop_ratio = f"{sgd_loop / statistics.fmean(loop):.3f}" if sgd_loop and loop else DASH
        lines.append("| " + " | ".join([
            name, str(len(runs)),
            _mean_std([r.summary["final_test_acc"] for r in runs], "{:.2f}"),
            _mean_std([r.summary["best_test_acc"] for r in runs], "{:.2f}"),
            _mean_std(e2e, "{:.1f}"), ratio, _mean_std(loop, "{:.1f}"), loop_ratio,
            _mean_std(speedup, "{:.3f}"), _mean_std(foot, "{:.1f}"), _mean_std(foot_red, "{:.2f}"),
            _mean_std(grad, "{:,.0f}"), _mean_std(delta, "{:,.0f}"),
            _mean_std(cuts, "{:.1f}"), _mean_std([float(f) for f in frozen], "{:.1f}"),
        ]) + " |")
    return "\n".join(lines)


def local_lr_table(variants: dict[str, list[Run]]) -> str:
    """Per local variant (first seed): ``local_lr`` per epoch, and the auto-frozen stage flags."""
    rows = []
    for name, runs in sorted(variants.items()):
        r = runs[0]
        if r.mode != "local":
            continue
        lr = " ".join(f"{v:.1e}" for _, v in r.series("local_lr"))
        frozen = _value(r, "auto_frozen")
        rows.append(f"| {name} | {lr} | {frozen if frozen is not None else DASH} |")
    if not rows:
        return ""
    head = "| local variant (first seed) | local_lr per epoch | auto_frozen at the end (per stage) |"
    return "\n".join([head, "|---|---|---|", *rows])


def section(data: dict[str, dict[str, list[Run]]], plots: Path, doc: Path, command: str, order: list[str],
            note: str) -> str:
    """The generated markdown between the markers."""
    parts = [BEGIN, "", f"Generated by `{command}`. {note}".strip(), ""]
    for model, variants in data.items():
        seeds = max(len(v) for v in variants.values())
        parts += [f"### {model} ({seeds} seed{'s' if seeds != 1 else ''} per variant)", "",
                  model_table(variants, order), ""]
        lr = local_lr_table(variants)
        if lr:
            parts += [lr, ""]
        rel = Path(os.path.relpath(plots, doc.parent))  # image links relative to the doc
        parts += [f"![{model}: accuracy vs wall time]({rel / model / 'accuracy_vs_wall_time.png'})",
                  f"![{model}: boundary vs epoch]({rel / model / 'boundary_vs_epoch.png'})", ""]
    parts.append(END)
    return "\n".join(parts)


def write_section(doc: Path, text: str) -> None:
    """Replace the marked section of ``doc`` (or append it)."""
    old = doc.read_text() if doc.is_file() else ""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="the benchmark's run root: <runs>/<model>/<variant>/s<seed>")
    ap.add_argument("--doc", type=Path, required=True, help="markdown file whose marked section is rewritten")
    ap.add_argument("--plots", type=Path, required=True, help="directory for <model>/*.png")
    ap.add_argument("--command", default="bash profiling/fashion.sh", help="the command shown in the doc")
    ap.add_argument("--order", nargs="*", default=[], help="variant order in the tables")
    ap.add_argument("--note", default="", help="a sentence on the conditions (load, date, commit)")
    args = ap.parse_args(argv)
    data = load(args.runs)
    if not data:
        sys.exit(f"fashion_table: no finished run under {args.runs}")
    for model, variants in data.items():
        write_plots([runs[0] for runs in variants.values()], args.plots / model)
    text = section(data, args.plots, args.doc, args.command, args.order, args.note)
    write_section(args.doc, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
