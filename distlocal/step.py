"""One LoCal+SGD training step: the single place a step happens.

:func:`train_step` is what ``Trainer.train_step`` runs, what the all-SGD reference runs (its learner
at boundary 0, behind its own engine, :mod:`distlocal.profiler.reference`) and what
``profiling/bench.py`` times (through a 1-process engine built as the trainer builds one). So the
speedup, the bench and the docs' figures measure the step users run, and nothing can drift apart:
``tests/test_step.py`` checks the trainer's and the bench's steps give bit-identical weights and that
the reference is this step at boundary 0.

The profiler measures it from outside: its footprint wraps the call, and a :class:`StepProbe`
(the profiler itself) times the phases and counts the bytes saved for backward from inside, through
context managers. Nothing here reads a value back to the host: the loss comes back as a detached
device tensor, and the caller decides when to read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    # Hints only: the profiler's reference imports this module, and the learner imports the
    # profiler's footprint; importing them here at run time would close a circle.
    from torch import nn
    from torch.optim.lr_scheduler import LRScheduler

    from distlocal.local.learner import LocalLearner
    from distlocal.parallel.engine import Engine
    from distlocal.parallel.sync import DeltaSync, SyncResult


class StepProbe(Protocol):
    """What measures a step from inside: the profiler's ``phase`` and ``activations``."""

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Time the block as phase ``name``."""

    def activations(self) -> AbstractContextManager[Any]:
        """Count the bytes autograd saves for backward inside the block."""


class _NoProbe:
    """A probe that measures nothing."""

    def phase(self, name: str) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def activations(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


NO_PROBE: StepProbe = _NoProbe()


@dataclass
class StepParts:
    """The parts a step runs through: the learner (prefix), the engine (suffix, optimizer), the
    delta sync, the LR scheduler (``None``: the LR stays) and the autocast of the run's precision."""

    learner: LocalLearner
    engine: Engine
    sync: DeltaSync
    scheduler: LRScheduler | None = None
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext


class StepResult(NamedTuple):
    """What a step returns: its loss (detached, on the device) and what the sync did."""

    loss: torch.Tensor
    synced: SyncResult


def train_step(parts: StepParts, x: torch.Tensor, y: torch.Tensor, step: int, last: bool = False,
               probe: StepProbe = NO_PROBE) -> StepResult:
    """One LoCal+SGD step of ``parts`` on the batch ``(x, y)`` (already on the device).

    The prefix runs under ``no_grad`` (the learner's hooks accumulate ``lr * delta``), the sync is
    launched (with ``sync_async`` its all-reduce overlaps the suffix), the suffix runs with the loss,
    the engine runs backward, the gradient all-reduce and the optimizer step, the scheduler moves the
    LR, and the sync applies the averaged deltas when it is due. ``step`` is the step's index in the
    epoch (it decides delta and sync steps); ``last``: the epoch's last step (it always syncs).
    At boundary 0 this is a plain all-SGD step.
    """
    learner, engine, sync = parts.learner, parts.engine, parts.sync
    with probe.activations():                         # bytes saved for backward: prefix + suffix + loss
        with probe.phase("prefix"), parts.autocast():
            h = learner.prefix_forward(x, step)       # local stages: no graph, deltas in hooks
        sync.launch(step, last)                       # no delta, no sync; async: the all-reduce starts
        with probe.phase("suffix_fwd"), parts.autocast():
            out = engine.forward(h)
            loss = F.cross_entropy(out.float(), y)
    with probe.phase("backward"):                     # optimizer.step is timed apart (hooks)
        engine.backward_step(loss)                    # suffix grads + their all-reduce + the step
    if parts.scheduler is not None:
        parts.scheduler.step()                        # the SGD lr moves per step (warm-up, cosine)
    loss = loss.detach()
    # The loss rides in the sync buffer as a device tensor: the step itself never waits on the device.
    return StepResult(loss, sync.step(loss))


def set_boundary(learner: LocalLearner, engine: Engine, target: int) -> list[nn.Parameter]:
    """Move the learner's boundary to ``target`` and rebuild the engine over the new suffix; returns
    the newly local parameters. The one way a boundary moves (trainer, bench)."""
    newly = learner.set_boundary(target)
    engine.set_boundary(target, newly)
    return newly
