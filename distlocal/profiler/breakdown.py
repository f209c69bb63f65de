"""The peak footprint of a step by category, as a user reads it: the one mapping from the
footprint keys (``distlocal/profiler/footprint.py``) to the categories that the plots
(``profiling/footprint_plot.py``, ``distlocal/profiler/timeline.py``) and the wandb table show.

What each category holds, honestly (MemTracker files each storage by where it was allocated):

* ``param``, ``buffer`` (BatchNorm statistics), ``grad``, ``optim`` (optimizer state): as named;
* ``activation``: tensors made in the forward that are alive at the peak. At the peak (in the
  backward or the optimizer step) these are mostly the tensors saved for backward, but not only
  (the loss, a live forward output); the exact bytes saved for backward are ``activation_bytes``;
* ``temp``: tensors made in the backward (incoming gradients of activations) alive at the peak;
* ``local_temp``: the local rule's temporaries alive at the peak (``local`` less the buffer);
* ``local_buffer``: the learner's flat delta buffer (deltas, prefix BN statistics, the loss), which
  lives through the whole step. One process with ``sync_every=1`` has no deltas in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SHOWN: tuple[tuple[str, str, str], ...] = (
    ("param", "parameters", "#4c72b0"),
    ("buffer", "BN buffers", "#8172b2"),
    ("grad", "gradients", "#dd8452"),
    ("optim", "optimizer state", "#937860"),
    ("activation", "activations (alive at peak)", "#c44e52"),
    ("temp", "backward temporaries", "#da8bc3"),
    ("local_temp", "local-rule temporaries", "#55a868"),
    ("local_buffer", "delta buffer", "#8c8c8c"),
)
"""``(key, label, colour)`` of each category shown, bottom of a stack first."""


def split(by_category: Mapping[str, int | None], local_buffer: int | None) -> dict[str, int]:
    """The shown categories from MemTracker's (``param`` … ``local``) and the delta buffer's bytes.

    ``local`` is split into the buffer and the rest; a missing category counts 0. An older run
    without ``local_buffer`` shows all of ``local`` as temporaries.
    """
    local = by_category.get("local") or 0
    buf = min(local_buffer or 0, local)
    out = {k: int(by_category.get(k) or 0) for k, _, _ in SHOWN if k not in ("local_temp", "local_buffer")}
    out["local_temp"] = local - buf
    out["local_buffer"] = buf
    return out


def from_row(row: Mapping[str, Any], ref: bool = False) -> dict[str, int] | None:
    """The shown categories of a ``metrics.jsonl`` row, the run's step or (``ref``) its all-SGD
    reference; ``None`` when the row has no such footprint."""
    prefix = "footprint_ref" if ref else "footprint"
    if row.get(f"{prefix}_bytes") is None:
        return None
    cats = {k: row.get(f"{prefix}_{k}_bytes") for k in ("param", "buffer", "grad", "optim", "activation",
                                                         "temp", "local")}
    return split(cats, row.get(f"{prefix}_local_buffer_bytes"))


TABLE_COLUMNS = ["epoch", "boundary", "step", *(label + " MiB" for _, label, _ in SHOWN), "total MiB"]


def table_rows(rows: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """Rows of the breakdown table (:data:`TABLE_COLUMNS`): per epoch, the run's step and its
    all-SGD reference, each category in MiB; epochs without a footprint are left out."""
    out = []
    for r in rows:
        for ref, name in ((False, "run"), (True, "all-SGD ref")):
            cats = from_row(r, ref)
            if cats is None:
                continue
            mib = [round(cats[k] / 2**20, 4) for k, _, _ in SHOWN]
            out.append([r.get("epoch"), r.get("boundary"), name, *mib, round(sum(cats.values()) / 2**20, 4)])
    return out
