"""Saved-activation accounting: the exact bytes autograd keeps for backward, per stage.

:class:`ActivationCounter` counts them with ``torch.autograd.graph.saved_tensors_hooks`` around a
forward and loss; :func:`saved_activation_bytes` is its one-call form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[tuple[str, int], int, Any]:
    """``(key, nbytes, storage)`` identifying the memory block a tensor lives in.

    Views share their base's storage, so keying on the storage's device and data pointer counts
    a tensor and all its views once, with the storage's full size (that is what stays allocated).
    Tensors without a real storage (wrapper subclasses) fall back to their own size, keyed by id.
    """
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), st.nbytes(), st
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t)), t.numel() * t.element_size(), t


def _owned_storage_keys(modules: Iterable[nn.Module]) -> set[tuple[str, int]]:
    """Storage keys of every parameter and buffer of ``modules`` (never counted as activations)."""
    keys = set()
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            keys.add(_storage_key(t)[0])
    return keys


class ActivationCounter:
    """Counts the bytes autograd saves for backward while active, per stage.

    Use as a context manager around a forward (and loss)::

        with ActivationCounter(model.stages) as c:
            out = model(x)  # a forward (and its loss)
        c.total, c.per_stage, c.other

    * **Deduplicated by storage**: a tensor saved by two ops (ReLU's output is also the next
      Linear's input) or a view of an already saved tensor adds nothing; each storage adds its
      full ``nbytes`` once.
    * **Parameters and buffers excluded**: autograd saves weights (``Linear`` saves ``W^T``, a
      view of the weight) and BatchNorm its running statistics; they live anyway and are not
      activations. Anything sharing a storage with a parameter or buffer of ``stage_modules``
      (plus ``exclude``) is skipped. A *copy* of a weight (autocast's fp16 cast) is counted.
    * **Attribution**: to the stage whose forward is running when the storage is first saved
      (forward pre-hooks/hooks on each stage). So the tensor passed from stage ``i`` to ``i+1``
      belongs to ``i`` when ``i`` saved it too, else to ``i+1``; saved outside every stage (the
      loss: log-softmax output, targets) it goes to ``other``.
    * Stages run under ``torch.no_grad()`` (the local prefix) save nothing, so they show 0.
    """

    def __init__(self, stage_modules: Sequence[nn.Module], exclude: Iterable[torch.Tensor] = ()) -> None:
        self.stage_modules = list(stage_modules)
        self._exclude_extra = list(exclude)
        self.per_stage: list[int] = [0] * len(self.stage_modules)
        self.other = 0
        self._excluded: set[tuple[str, int]] = set()
        # Storages seen, kept referenced while counting so that a freed block's address cannot be
        # reused by a later allocation and wrongly deduplicated.
        self._seen: dict[tuple[str, int], Any] = {}
        self._stack: list[int] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooks: AbstractContextManager | None = None

    @property
    def total(self) -> int:
        """All bytes counted: the stages' plus ``other``."""
        return sum(self.per_stage) + self.other

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes, storage = _storage_key(t)
        if nbytes and key not in self._excluded and key not in self._seen:
            self._seen[key] = storage
            if self._stack:
                self.per_stage[self._stack[-1]] += nbytes
            else:
                self.other += nbytes
        # detach(): returning the tensor itself would make the graph reference itself (see the
        # saved_tensors_hooks docs); the detached alias shares storage and version counter.
        return t.detach()

    def __enter__(self) -> ActivationCounter:
        self._excluded = _owned_storage_keys(self.stage_modules)
        self._excluded |= {_storage_key(t)[0] for t in self._exclude_extra}
        for i, mod in enumerate(self.stage_modules):
            self._handles.append(mod.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(mod.register_forward_hook(self._post))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _make_pre(self, i: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any) -> None:
            self._stack.append(i)
        return pre

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
        for h in self._handles:
            h.remove()
        self._handles, self._stack, self._seen = [], [], {}


def saved_activation_bytes(
    fn: Callable[[], Any], stage_modules: Sequence[nn.Module], exclude: Iterable[torch.Tensor] = ()
) -> tuple[int, list[int]]:
    """Run ``fn()`` (a forward + loss) and return ``(total, per_stage)`` bytes saved for backward.

    See :class:`ActivationCounter` for what is counted. ``total`` also includes what is saved
    outside the stages (the loss), so ``total >= sum(per_stage)``. The graph ``fn`` builds is
    dropped on return unless ``fn`` keeps it.
    """
    with ActivationCounter(stage_modules, exclude) as c:
        fn()
    return c.total, list(c.per_stage)


class CountingProbe:
    """A :class:`distlocal.step.StepProbe` that counts a step's saved bytes in ``counter`` and times
    nothing: ``train_step(parts, x, y, 0, probe=CountingProbe(c))`` (the reference, the bench)."""

    def __init__(self, counter: ActivationCounter) -> None:
        self.counter = counter

    def phase(self, name: str) -> AbstractContextManager[None]:
        """No timing."""
        return contextlib.nullcontext()

    def activations(self) -> ActivationCounter:
        """The counter, active over the step's forward and loss."""
        return self.counter
