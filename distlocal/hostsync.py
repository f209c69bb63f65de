"""Host reads of device values: where they are free, how to avoid them, and how to count them.

On CPU reading a tensor's value (``float(t)``, ``bool(t)``, ``t.item()``) costs nothing: the value
is already in host memory. On an accelerator every such read stalls the host until the device
has drained its queue, so the next step's many small kernels cannot be queued ahead; at small
batches the step is bound by that (docs/design.md, "No host sync in the steady-state step").
Code that may read a device value asks :func:`reads_are_free` first and, where reads are not
free, keeps the value on the device (``torch.where``) or reads it late (:class:`LaggedRead`).

:func:`force_accelerator_paths` makes :func:`reads_are_free` answer ``False`` on CPU too, so the
tests exercise the accelerator branches on a machine without one; :class:`HostReadCounter`
counts the reads a piece of code makes (tests/test_hostsync.py, tests/test_host_reads.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Private: only force_accelerator_paths() sets it (tests). Module-level, so every "is this CPU?"
# decision in the package consults the same switch.
_force_accelerator = False

# Attribute that marks a host-side staging tensor (pinned on CUDA): reading it is no device read.
_HOST_MIRROR = "_distlocal_host_mirror"


def reads_are_free(device: torch.device | torch.Tensor) -> bool:
    """Whether reading a value that lives on ``device`` (or tensor) is free: CPU, not forced."""
    if isinstance(device, torch.Tensor):
        device = device.device
    return device.type == "cpu" and not _force_accelerator


@contextlib.contextmanager
def force_accelerator_paths() -> Iterator[None]:
    """Within the block, :func:`reads_are_free` is ``False`` on CPU too: the code takes the branches
    it takes on an accelerator (device-side checks, lagged reads). For tests; not thread-safe."""
    global _force_accelerator
    before, _force_accelerator = _force_accelerator, True
    try:
        yield
    finally:
        _force_accelerator = before


def zero_unless(ok: bool | torch.Tensor, *tensors: torch.Tensor | None) -> None:
    """Zero ``tensors`` in place unless ``ok``: a host branch for a ``bool``, a device-side
    ``masked_fill_`` (no read) for a 0-dim bool tensor. ``None`` entries are skipped."""
    for t in tensors:
        if t is None:
            continue
        if isinstance(ok, torch.Tensor):
            t.masked_fill_(~ok, 0)
        elif not ok:
            t.zero_()


class LaggedRead:
    """A small device vector read one call late, without waiting for the device.

    :meth:`push` starts a copy of the vector into host memory (pinned, ``non_blocking``, with a CUDA
    event recorded after it) and returns what the *previous* push carried, by then long copied:
    the event has completed unless the device is more than a whole sync period behind, so the read
    does not wait. Where reads are free (CPU) it returns the vector just pushed: no lag.
    :attr:`pending` holds the values not yet returned (checkpointed, so a resume returns them at
    the same call as the uninterrupted run).
    """

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._event: Any = None
        self.pending: list[float] | None = None  # restored from a checkpoint: returned by the next push

    def push(self, values: torch.Tensor) -> list[float] | None:
        """Start reading ``values`` (1-D); return the previous push's values (``None``: none yet)."""
        if reads_are_free(values):
            return values.tolist()
        previous = self.collect()
        self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        setattr(self._host, _HOST_MIRROR, True)
        self._host.copy_(values, non_blocking=values.is_cuda)
        if values.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        return previous

    def collect(self) -> list[float] | None:
        """The values pushed and not yet returned (waits for their copy: call at scheduled points)."""
        if self.pending is not None:
            out, self.pending = self.pending, None
            return out
        if self._host is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        out = self._host.tolist()
        self._host, self._event = None, None
        return out

    def state(self) -> list[float] | None:
        """The values in flight, as plain floats, without consuming them (a checkpoint)."""
        if self.pending is None and self._host is not None:
            self.pending = self.collect()
        return None if self.pending is None else list(self.pending)


# ------------------------------------------------------------------ counting reads
_READS = {
    torch.Tensor.item: "item", torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "to_host",
    torch.Tensor.numpy: "to_host",
}


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call is a blocking copy to the host."""
    if kwargs.get("non_blocking") or any(a is True for a in args[2:]):
        return False
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
            return True
    return False


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of tensor values made inside the ``with`` block, by kind.

    Kinds: ``item``, ``bool``, ``float``, ``int``, ``tolist`` and ``to_host`` (``.cpu()``,
    ``.numpy()`` and a blocking ``.to("cpu")``). Reads of host staging tensors
    (:class:`LaggedRead`'s) are not counted. On CPU every tensor is a host tensor, so a count taken
    under :func:`force_accelerator_paths` is the number of reads the code would make of device
    values on an accelerator. :attr:`where` keeps a short stack summary per read (for failures).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.where: list[str] = []

    @property
    def total(self) -> int:
        """All reads counted so far."""
        return sum(self.counts.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _READS.get(func)
        if kind is None and func is torch.Tensor.to and _to_host(args, kwargs):
            kind = "to_host"
        if kind is not None and args and not getattr(args[0], _HOST_MIRROR, False):
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.where.append(f"{kind} at {_caller()}")
        return func(*args, **kwargs)


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this module."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"
