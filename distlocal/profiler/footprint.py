"""Peak memory footprint of one training step, by category — the one place torch's private
``MemTracker`` is used.

``torch.distributed._tools.mem_tracker.MemTracker`` is a ``TorchDispatchMode``: it sees every tensor
allocated inside its context, on CPU and CUDA alike, and files each storage under a category
(parameter, buffer, gradient, activation, backward temporary, optimizer state). It is a private
module of torch, so everything that touches it lives here, behind :func:`measure_footprint`, and
``tests/test_footprint.py`` pins its behaviour on a hand-counted model: a torch upgrade that
changes it breaks one test and one file.

Two things are ours:

* MemTracker installs a gradient hook on every parameter of every module it enters, which raises on
  a parameter with ``requires_grad=False`` — exactly our local prefix. Modules whose parameters do
  not all require grad get no hook (their parameters have no gradient to track; a container mixing
  both is covered by its trainable children, which are entered too).
* Tensors allocated inside :func:`distlocal.local.scope.local_scope` (the local rule's delta
  computation, see ``distlocal/local/learner.py``) are filed as ``local`` instead of ``activation``,
  so the rule's temporaries show as a category of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from distlocal.local.scope import SCOPE, local_scope

# MemTracker's category (its enum member) -> our key; OTH is only ever used for the local scope and
# the tensors passed as ``local=`` below.
CATEGORIES: dict[Any, str] = {
    _MemRefType.PARAM: "param",
    _MemRefType.BUFFER: "buffer",
    _MemRefType.GRAD: "grad",
    _MemRefType.OPT: "optim",
    _MemRefType.ACT: "activation",
    _MemRefType.TEMP: "temp",
    _MemRefType.OTH: "local",
}
_TOTAL = "Total"


class _Tracker(MemTracker):
    """MemTracker that tolerates frozen parameters and files the local scope's tensors as ``local``."""

    def _track_module_params_and_buffers(
        self, module: nn.Module, install_grad_hooks: bool = True
    ) -> tuple[int, int]:
        trainable = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        if SCOPE["depth"] and reftype == _MemRefType.ACT:
            reftype = _MemRefType.OTH
        super()._track(reftype, t)


@dataclass
class Footprint:
    """The peak bytes of the measured call: ``total`` and its split by category at that moment."""

    total: int
    by_category: dict[str, int]
    local_buffer: int = 0
    """Of ``by_category["local"]``, the bytes of the ``local=`` tensors (the delta buffer): they live
    through the whole step, so this share of the peak is their size; the rest is the rule's temporaries."""

    def as_metrics(self, prefix: str = "footprint") -> dict[str, int]:
        """``{prefix}_bytes``, ``{prefix}_<category>_bytes`` for every category and
        ``{prefix}_local_buffer_bytes`` (the delta buffer's share of ``{prefix}_local_bytes``)."""
        out = {f"{prefix}_bytes": self.total}
        out.update({f"{prefix}_{k}_bytes": v for k, v in self.by_category.items()})
        out[f"{prefix}_local_buffer_bytes"] = self.local_buffer
        return out


@contextlib.contextmanager
def track_footprint(
    device: torch.device | str,
    modules: tuple[nn.Module, ...] = (),
    optimizers: tuple[torch.optim.Optimizer, ...] = (),
    local: tuple[torch.Tensor, ...] = (),
    tracker: MemTracker | None = None,
) -> Iterator[Footprint]:
    """``with track_footprint(...) as fp:`` one training step; ``fp`` is filled in on exit.

    The context-manager form of :func:`measure_footprint`, for a step written inline (the trainer's
    loop) rather than as a function. Same arguments and meaning. ``tracker``: a fresh instance of a
    subclass of this module's tracker to use instead (``distlocal/profiler/timeline.py`` records with one).
    """
    dev = torch.device(device)
    result = Footprint(0, {name: 0 for name in CATEGORIES.values()})
    result.local_buffer = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                               for t in local if t.numel()}.values())  # each storage once
    tracker = tracker if tracker is not None else _Tracker()
    tracker.track_external(*modules, *optimizers)
    for t in local:
        tracker._update_and_maybe_create_winfos(t, _MemRefType.OTH)
    SCOPE["tracking"] += 1
    try:
        with tracker:
            yield result
    finally:
        SCOPE["tracking"] -= 1
    snaps = tracker.get_tracker_snapshot("peak")
    # MemTracker keys CUDA devices with an index; match on type (one device per process here).
    snap = next((s for d, s in snaps.items() if d.type == dev.type), {})
    result.by_category = {name: int(snap.get(ref, 0)) for ref, name in CATEGORIES.items()}
    result.total = int(snap.get(_TOTAL, 0))


def measure_footprint(
    fn: Callable[[], Any],
    device: torch.device | str,
    modules: tuple[nn.Module, ...] = (),
    optimizers: tuple[torch.optim.Optimizer, ...] = (),
    local: tuple[torch.Tensor, ...] = (),
) -> Footprint:
    """Run ``fn()`` once (one training step) and return the peak footprint on ``device``.

    ``modules`` and ``optimizers`` that exist before ``fn`` runs are registered first, so their
    parameters, buffers, existing gradients and optimizer state count from the start; ``local``
    tensors (the learner's delta buffer) count as ``local``. Anything allocated inside ``fn`` is
    tracked as it is created. The batch itself, created before, is not counted. A fresh tracker per
    call: MemTracker supports one iteration per tracker.
    """
    with track_footprint(device, modules, optimizers, local) as fp:
        fn()
    return fp


__all__ = ["CATEGORIES", "Footprint", "local_scope", "measure_footprint", "track_footprint"]
