"""The :class:`Profiler` the trainer drives: a thin facade over the package's parts.

Per epoch: ``epoch_start`` (plans it, :func:`~distlocal.profiler.timing.plan_epoch`) → steps
(``step_begin``/``step_end``; ``with footprint(...)`` around :func:`distlocal.step.train_step`, which
takes the profiler as its probe: ``phase(name)``, ``activations()``) → ``epoch_end`` returns flat
metrics (:mod:`distlocal.profiler.report`).

* Footprint: the epoch's second step by category, and the bytes saved for backward.
* Time: the timed steps' wall time over their number (no synchronisation; CUDA events); phases from
  a few synchronised *profiled* steps, kept out of ``step_time_s``.
* Reference: at boundary 0 the run's own step, else a :class:`~distlocal.profiler.reference.ReferenceStep`
  (:meth:`Profiler.attach_reference`) run a few times per epoch between the timed steps, so it sees the
  same machine load; ``speedup = step_time_ref_s / step_time_s``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distlocal.profiler.activations import ActivationCounter
from distlocal.profiler.footprint import track_footprint
from distlocal.profiler.memory import (
    MemorySnapshot,
    cuda_peak,
    device_memory,
    model_memory,
    reset_cuda_peak,
    sync_device,
)
from distlocal.profiler.reference import ReferenceStep
from distlocal.profiler.report import RunTotals, as_reference, memory_keys, time_keys
from distlocal.profiler.timeline import TimelineRecorder, maybe_record
from distlocal.profiler.timing import Clock, EpochPlan, EpochTimes, PhaseTimer, plan_epoch

if TYPE_CHECKING:
    # Only for hints: importing distlocal.config pulls in Hydra, which the profiler does not need.
    from distlocal.config import ProfilerConfig


class Profiler:
    """Per-epoch time and memory accounting, driven by the trainer (one instance per rank); see the
    module's docstring. Disabled (``cfg.enabled=False``): every method is a no-op and returns ``{}``."""

    def __init__(self, cfg: ProfilerConfig | Any | None, model: nn.Module, device: torch.device | str,
                 run_dir: Path | None = None, verbose: bool = True,
                 clock: Callable[[], float] | None = None) -> None:
        """``clock``: a stand-in for ``time.perf_counter`` (tests); it also turns CUDA events off."""
        if cfg is None:
            from distlocal.config import ProfilerConfig

            cfg = ProfilerConfig()
        self.enabled, self.model, self.verbose = bool(cfg.enabled), model, verbose
        self.sample_steps, self.reference_steps = int(cfg.sample_steps), int(cfg.reference_steps)
        self.device = torch.device(device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._clk = Clock(self.device, clock)
        self._phases = PhaseTimer(self._clk.now)
        self._snap = MemorySnapshot(bool(cfg.memory_snapshot) and self.enabled, self.device, self._log)
        self.timeline = TimelineRecorder.maybe(self.enabled and cfg.timeline, self.device, self.run_dir,
                                               self._log, lambda: not self._snap.on)
        self._watched, self._opt_handles = set[int](), list[Any]()  # timed optimizers, their hooks
        self._ref: ReferenceStep | None = None
        self._epoch, self._totals = -1, RunTotals()
        self._reset_epoch()

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"distlocal: {msg}", flush=True)

    def _reset_epoch(self) -> None:
        self._plan = EpochPlan(None, range(0), range(0), {})
        self._boundary = 0
        self._step: int | None = None  # the step in progress, None between steps
        self._sampled, self._step_t0 = False, None
        self._phases.reset()
        self._act: ActivationCounter | None = None
        self._fp: dict[str, Any] | None = None
        self._ep = EpochTimes()

    @property
    def has_reference(self) -> bool:
        """Whether a :class:`ReferenceStep` is attached (epochs with local stages get their reference)."""
        return self._ref is not None

    def _recording(self) -> bool:
        return self.enabled and (self._sampled or self._step is None)

    def _measuring(self) -> bool:
        return self.enabled and self._step is not None and self._step == self._plan.footprint_step

    def attach_reference(self, engine_factory: Callable[[nn.Module], Any],
                         batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
                         autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        """Give the profiler the run's engine factory, loader and autocast for its all-SGD reference.
        Nothing is built until an epoch with local stages starts (an ``sgd`` run pays nothing)."""
        if self.enabled:
            self._ref = ReferenceStep(self.model, engine_factory, batches, self.device, autocast)

    def epoch_start(self, optimizer: torch.optim.Optimizer | None = None, *, steps: int, boundary: int = 0,
                    first: int = 0, period: int = 1, sync_every: int = 1) -> None:
        """Start an epoch that runs steps ``first .. steps - 1`` at ``boundary``: plan it (``period`` =
        ``lcm(update_every, sync_every)``), prepare the reference when there are local stages, start
        the epoch clock and time ``optimizer``. Phases recorded since the last ``epoch_end`` (a
        ``rebuild`` before this call) stay in this epoch."""
        if not self.enabled:
            return
        self._epoch += 1
        self._boundary = boundary
        use_ref = boundary > 0 and self._ref is not None
        self._plan = plan_epoch(first, steps, period, sync_every, self.sample_steps,
                                self.reference_steps if use_ref else 0)
        if use_ref:
            t0 = self._clk.now()
            if self._ref.prepare(lambda: maybe_record(self.timeline, "reference", boundary)):
                self._log(self._ref.describe(self.reference_steps))
            self._ep.fixed_overhead_s += self._clk.now() - t0
        if optimizer is not None and id(optimizer) not in self._watched:
            self._watched.add(id(optimizer))
            self._opt_handles += self._phases.watch(optimizer, lambda: self._sampled)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._ep.t0 = self._clk.now()

    def step_begin(self, step: int) -> None:
        """Mark the start of step ``step`` (before its batch is fetched)."""
        if not self.enabled:
            return
        self._step, self._sampled = step, step in self._plan.profiled  # a dedicated profiled step
        if step == self._plan.timed.start:
            self._ep.win = [self._clk.mark()]
        if self._sampled or step == self._plan.footprint_step:
            sync_device(self.device)
            self._step_t0 = self._clk.mark()
        if step == self._plan.footprint_step:
            self._snap.start()

    def step_end(self) -> None:
        """Mark the end of the step begun by :meth:`step_begin`; then run the reference steps the
        plan puts here (inside the timing window unless it just closed)."""
        if not self.enabled or self._step is None:
            return
        step, ep = self._step, self._ep
        if self._sampled or step == self._plan.footprint_step:
            sync_device(self.device)
            ep.dedicated.append((self._step_t0, self._clk.mark()))
        self._phases.end_step(self._sampled)
        if len(ep.win) == 1 and step == self._plan.timed.stop - 1:
            ep.win.append(self._clk.mark())
        self._snap.dump(self.run_dir, self._epoch)
        self._step, self._sampled = None, False
        ep.steps += 1
        n = self._plan.reference.get(step, 0)
        if n and self._ref is not None and self._boundary > 0:
            inside = len(ep.win) == 1  # the window is open: subtract these from its time
            ep.ref_marks += [(a, b, inside) for a, b in self._ref.run_timed(n, self._clk.mark)]
        ep.last_end = self._clk.fn()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` on profiled steps (and outside steps); else a no-op."""
        if not self._recording():
            yield
            return
        self._phases.enter(name)
        try:
            yield
        finally:
            self._phases.exit(in_step=self._step is not None)

    def excluded(self) -> AbstractContextManager[None]:
        """Time that is not training (an evaluation between steps): out of the epoch's step time."""
        return self._ep.exclude(self._clk)

    @contextlib.contextmanager
    def footprint(self, modules: tuple[nn.Module, ...] = (), optimizers: tuple[Any, ...] = (),
                  local: tuple[torch.Tensor, ...] = ()) -> Iterator[None]:
        """On the epoch's footprint step, the block's (the whole step's) peak footprint by category
        (``track_footprint``; non-torch optimizers left out) and the CUDA allocator's peak."""
        if not self._measuring():
            yield
            return
        opts = tuple(o for o in optimizers if isinstance(o, torch.optim.Optimizer))
        reset_cuda_peak(self.device)
        with maybe_record(self.timeline, "run", self._boundary) as tracker, \
                track_footprint(self.device, modules, opts, local, tracker) as fp:
            yield
        self._fp = {**fp.as_metrics(), "cuda_step_peak_bytes": cuda_peak(self.device)}

    @contextlib.contextmanager
    def activations(self) -> Iterator[None]:
        """Count bytes saved for backward inside the block (a step's forward and loss), on the
        footprint step only; elsewhere a no-op."""
        if not self._measuring() or self._act is not None:
            yield
            return
        self._act = ActivationCounter(getattr(self.model, "stages", [self.model]))
        with self._act:
            yield

    def epoch_end(self, boundary: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Close the epoch; returns its flat keys for the epoch's row (``None`` where unknown): the
        phases and ``report.time_keys``, ``report.memory_keys``, ``device_memory``, ``model_memory``."""
        if not self.enabled:
            return {}
        ep, clk = self._ep, self._clk
        step_time, n_timed = ep.step_time(clk, self._plan)
        fp, act = self._fp or {}, self._act
        if boundary == 0:  # the run's own step is the all-SGD step
            ref_step, ref = step_time, as_reference(fp, act.total if act is not None else None)
        else:
            ref_step = ep.reference_time(clk) / len(ep.ref_marks) if ep.ref_marks else None
            ref = (self._ref.footprint if self._ref is not None else None) or {}
        row: dict[str, Any] = self._phases.row()
        row.update(time_keys(step_time, ref_step, n_timed, len(ep.ref_marks), len(self._phases.step_phases),
                             ep.overhead(clk, step_time)))
        row.update(memory_keys(fp, ref, act.total if act is not None else None,
                               list(act.per_stage) if act is not None else None))
        row.update(device_memory(self.device))
        row.update(model_memory(self.model, optimizer))
        self._totals.add_epoch(row, ep.loop_s(clk), ep.steps, ep.fixed_overhead_s)
        self._reset_epoch()
        return row

    def summary(self, end_to_end_s: float | None = None,
                last_row: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run-level keys for ``summary.json``, led by the headline keys of the last epoch's row
        (see :meth:`distlocal.profiler.report.RunTotals.summary`)."""
        return self._totals.summary(end_to_end_s, last_row or {}) if self.enabled else {}

    def close(self) -> None:
        """Remove the optimizer hooks, drop the reference copy; write ``profiler.timeline``'s files."""
        if self.timeline is not None:
            self.timeline.write()
        for h in self._opt_handles:
            h.remove()
        self._opt_handles, self._watched = [], set()
        if self._ref is not None:
            self._ref.close()
