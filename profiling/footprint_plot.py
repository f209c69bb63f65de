"""The peak footprint of a step by category, per run, its all-SGD reference beside it:
``footprint_by_category.png``, written by ``profiling/compare.py`` (``--epoch N`` adds a panel).

Each run gets two stacked bars: its own step (solid) and its all-SGD reference (hatched), split
into the categories of :mod:`distlocal.profiler.breakdown` (parameters, BN buffers, gradients, optimizer
state, activations alive at the peak, backward temporaries, local-rule temporaries, delta buffer).
One panel for the last epoch that has a footprint, one for the chosen epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from distlocal.profiler.breakdown import SHOWN, from_row  # noqa: E402

PNG = "footprint_by_category.png"


class _Run(Protocol):
    name: str
    rows: list[dict[str, Any]]


def pick_row(rows: Sequence[Mapping[str, Any]], epoch: int | None) -> Mapping[str, Any] | None:
    """The row of ``epoch`` (``None``: the last row with a footprint); ``None`` when there is none."""
    with_fp = [r for r in rows if r.get("footprint_bytes") is not None]
    if epoch is None:
        return with_fp[-1] if with_fp else None
    return next((r for r in with_fp if r.get("epoch") == epoch), None)


def bars(runs: Sequence[_Run], epoch: int | None) -> list[tuple[str, dict[str, int] | None]]:
    """``(label, categories)`` of each bar of a panel: per run its step, then its reference;
    ``None`` categories where the run has no such footprint at that epoch."""
    out: list[tuple[str, dict[str, int] | None]] = []
    for r in runs:
        row = pick_row(r.rows, epoch)
        at = "" if row is None else f"\nepoch {row.get('epoch')}, k={row.get('boundary', '?')}"
        out.append((f"{r.name}{at}", from_row(row) if row is not None else None))
        out.append(("all-SGD ref", from_row(row, ref=True) if row is not None else None))
    return out


def _panel(ax: Any, runs: Sequence[_Run], epoch: int | None) -> None:
    items = bars(runs, epoch)
    xs = [i + (i // 2) * 0.6 for i in range(len(items))]  # a gap between runs
    labelled = False  # the legend's entries come from the first bar drawn
    for x, (label, cats) in zip(xs, items):
        ref = label == "all-SGD ref"
        if cats is None:
            ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize="small")
            continue
        bottom = 0.0
        for key, name, colour in SHOWN:
            v = cats[key] / 2**20
            ax.bar(x, v, bottom=bottom, color=colour, label=None if labelled else name,
                   hatch="//" if ref else None, edgecolor="white" if ref else None, lw=0)
            bottom += v
        labelled = True
        ax.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(xs, [lbl for lbl, _ in items], fontsize="x-small")
    ax.set(ylabel="MiB at the step's peak",
           title="last epoch with a footprint" if epoch is None else f"epoch {epoch}")
    ax.grid(alpha=0.3, axis="y")
    ax.margins(y=0.1)  # room for the totals above the bars


def write(runs: Sequence[_Run], out: Path, epoch: int | None = None) -> Path:
    """Write :data:`PNG` in ``out``: the last epoch, and ``epoch`` beside it when given."""
    out.mkdir(parents=True, exist_ok=True)
    epochs = [None] if epoch is None else [None, epoch]
    width = max(4.0, 1.1 * len(runs) * 2 + 1.0)
    fig, axes = plt.subplots(1, len(epochs), figsize=(width * len(epochs) + 2.2, 4.6),
                             squeeze=False, sharey=True)
    for ax, e in zip(axes[0], epochs):
        _panel(ax, runs, e)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="center right", fontsize="small",
               title="hatched: all-SGD reference", title_fontsize="x-small")
    fig.suptitle("Peak memory footprint of a training step, by category")
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (width * len(epochs) + 2.2), 1))
    path = out / PNG
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
