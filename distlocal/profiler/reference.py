"""The all-SGD reference: the step the run is compared with, run the way the run runs its own.

A boundary-0 copy of the model behind its own engine, stepped by :func:`distlocal.step.train_step`
(the run's step, its learner at boundary 0): no second implementation of a step exists.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.parallel.sync import DeltaSync
from distlocal.profiler.activations import ActivationCounter, CountingProbe
from distlocal.profiler.footprint import track_footprint
from distlocal.profiler.memory import cuda_peak, reset_cuda_peak
from distlocal.profiler.report import fmt_bytes
from distlocal.step import StepParts, train_step


def strip_hooks(model: nn.Module) -> None:
    """Drop module hooks copied along by ``deepcopy`` (the learner's closures refer to the original)."""
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                     "_forward_hooks_always_called"):
            d = getattr(m, attr, None)
            if d is not None:
                d.clear()


class ReferenceStep:
    """The all-SGD step the run is compared with, run the way the run runs its own steps.

    A boundary-0 copy of the model (every parameter trainable, the learner's hooks dropped) behind
    its own engine from ``engine_factory`` (the run's factory: DDP or DeepSpeed, the run's
    ``trainer.optimizer`` and precision), fed real batches from ``batches()`` (a second iterator
    over the run's training loader) and the run's ``autocast``. One :meth:`run` is what the
    trainer does at boundary 0: load the batch, :func:`distlocal.step.train_step` with a learner at
    boundary 0, read the loss. The copy never touches the run: its own weights, BN statistics,
    optimizer state and loader iterator; the caller keeps the global RNG out of it
    (``fork_rng``). Under DDP every rank must call :meth:`run` at the same point (it all-reduces
    gradients).
    """

    def __init__(self, model: nn.Module, engine_factory: Callable[[nn.Module], Any],
                 batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
                 device: torch.device, autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        self.source = model
        self.engine_factory = engine_factory
        self.batches = batches
        self.device = device
        self.autocast = autocast or contextlib.nullcontext
        self.model: nn.Module | None = None
        self.parts: StepParts | None = None
        self.footprint: dict[str, Any] | None = None  # measure()'s keys, taken once
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def engine(self) -> Any:
        """The copy's engine (``None`` before :meth:`build`)."""
        return self.parts.engine if self.parts is not None else None

    def build(self) -> None:
        """Copy the model (boundary 0) and build its engine, learner and sync; idempotent."""
        if self.model is not None:
            return
        ref = copy.deepcopy(self.source)
        strip_hooks(ref)
        ref.train()
        for p in ref.parameters():
            p.requires_grad_(True)
            p.grad = None
        self.model = ref
        engine = self.engine_factory(ref)
        # At boundary 0 the learner has no local stage and the sync never sends: the step is all-SGD.
        learner = LocalLearner(ref, make_rule("freeze"))
        self.parts = StepParts(learner, engine, DeltaSync(learner, engine.env), autocast=self.autocast)

    def load_weights(self) -> None:
        """Take the run's current weights and BN statistics (the copy then learns on its own)."""
        assert self.model is not None
        with torch.no_grad():
            self.model.load_state_dict(self.source.state_dict())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of the copy's own pass over the loader, on the device."""
        if self._it is None:
            self._it = self.batches()
        try:
            x, y = next(self._it)
        except StopIteration:
            self._it = self.batches()
            x, y = next(self._it)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def run(self) -> float:
        """One all-SGD step as the trainer runs one: fetch the batch, step, read the loss."""
        assert self.parts is not None
        return float(train_step(self.parts, *self.next_batch(), step=0).loss)

    def measure(self, timeline: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
                ) -> dict[str, Any]:
        """One untimed step measured: ``footprint_ref_*``, ``activation_bytes_ref`` and
        ``cuda_step_peak_ref_bytes``. The batch is created before the measurement, as the run's.
        ``timeline()`` yields the tracker to measure with (``profiler.timeline``) or ``None``."""
        assert self.parts is not None and self.model is not None
        opts = tuple(o for o in (getattr(self.engine, "optimizer", None),)
                     if isinstance(o, torch.optim.Optimizer))
        x, y = self.next_batch()
        probe = CountingProbe(ActivationCounter(getattr(self.model, "stages", [self.model])))
        reset_cuda_peak(self.device)
        with timeline() as tracker, track_footprint(self.device, (self.model,), opts, tracker=tracker) as fp:
            train_step(self.parts, x, y, step=0, probe=probe)
        del x, y
        return {**fp.as_metrics("footprint_ref"), "activation_bytes_ref": probe.counter.total,
                "cuda_step_peak_ref_bytes": cuda_peak(self.device)}

    def _forked_rng(self) -> AbstractContextManager[None]:
        """The run's RNG (CPU and this device) restored on exit: the copy never moves it."""
        devs = []
        if self.device.type == "cuda":
            devs = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        return torch.random.fork_rng(devices=devs)

    def prepare(self, timeline: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> bool:
        """Epoch start: build the copy (first time), load the run's weights, restart the loader and,
        the first time, :meth:`measure` a step after one warm-up step (so that its optimizer state
        exists, as in the run's footprint step). Returns whether it measured."""
        with self._forked_rng():
            self.build()
            self.load_weights()
            self.reset_iterator()
            if self.footprint is not None:
                return False
            self.run()
            self.footprint = self.measure(timeline)
            return True

    def describe(self, steps_per_epoch: int) -> str:
        """The line a run logs once the reference is measured."""
        return (f"all-SGD reference: a boundary-0 copy behind its own {type(self.engine).__name__}, "
                f"{steps_per_epoch} steps per epoch between the run's; peak footprint "
                f"{fmt_bytes((self.footprint or {}).get('footprint_ref_bytes'), binary=True)}")

    def run_timed(self, n: int, mark: Callable[[], Any]) -> list[tuple[Any, Any]]:
        """``n`` steps between two run steps, each between two ``mark()`` stamps (the run's RNG is
        left as it was)."""
        marks = []
        with self._forked_rng():
            for _ in range(n):
                t0 = mark()
                self.run()
                marks.append((t0, mark()))
        return marks

    def reset_iterator(self) -> None:
        """A new epoch: the next :meth:`run` starts a fresh pass over the loader."""
        self._it = None

    def close(self) -> None:
        """Drop the copy and its engine."""
        self.model, self.parts, self._it = None, None, None
