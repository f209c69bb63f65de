"""Timing: the profiler's clock, the epoch's plan (which step is measured how), the phases of the
profiled steps and the time stamps from which an epoch's step time is computed."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from distlocal.profiler.memory import sync_device


def default_clock() -> float:
    """The profiler's clock on CPU (tests replace it with a fake one)."""
    return time.perf_counter()


class Clock:
    """Time stamps: a recorded CUDA event (no synchronisation) on CUDA, else the host clock.

    ``fn``: a stand-in for :func:`default_clock` (tests); it also turns CUDA events off.
    """

    def __init__(self, device: torch.device, fn: Callable[[], float] | None = None) -> None:
        self.device = device
        self.fn = fn or default_clock
        self.events = fn is None and device.type == "cuda"

    def mark(self) -> Any:
        """A time stamp, without waiting for the device."""
        if self.events:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return self.fn()

    def elapsed(self, a: Any, b: Any) -> float:
        """Seconds between two :meth:`mark` stamps."""
        if isinstance(a, torch.cuda.Event):
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return float(b - a)

    def now(self) -> float:
        """The host clock once the device has caught up."""
        sync_device(self.device)
        return self.fn()


@dataclass
class EpochPlan:
    """Which steps of an epoch do what (steps are 0-based in the epoch).

    * ``footprint_step``: the dedicated, untimed step whose peak footprint and saved activations
      are measured (MemTracker and the saved-tensor hooks slow it down);
    * ``profiled``: dedicated steps timed phase by phase (synchronised), kept out of ``step_time_s``;
    * ``timed``: the ordinary steps whose wall time gives ``step_time_s``;
    * ``reference``: ``{step: n}``, run ``n`` all-SGD reference steps right after run step ``step``.

    ``profiled`` and ``timed`` each span a whole number of lever periods (``lcm(update_every,
    sync_every)`` steps), so each holds exactly one delta per ``update_every`` steps and one
    all-reduce per ``sync_every`` steps, whatever the levers say.
    """

    footprint_step: int | None
    profiled: range
    timed: range
    reference: dict[int, int]


def plan_epoch(first: int, steps: int, period: int = 1, sync_every: int = 1,
               sample_steps: int = 3, reference_steps: int = 0) -> EpochPlan:
    """The :class:`EpochPlan` of an epoch that runs steps ``first .. steps - 1``.

    Step ``first`` warms up (the optimizer state exists after it, also in a run's very first
    step), step ``first + 1`` is the footprint step. The whole periods after it form the window; its first
    ``ceil(sample_steps / period)`` periods are profiled, as long as at least one period is left
    to time. The last step of an epoch always syncs (the epoch-end flush): when that flush is off
    the ``sync_every`` grid it is left out of the window, so it cannot add an extra all-reduce to
    a period. ``reference_steps`` reference steps are spread evenly over the timed steps (several
    after one step when there are more reference steps than timed steps). An epoch too short for a
    whole period has no timed steps (``step_time_s`` is then unknown, never a biased figure).
    """
    if first >= steps:
        return EpochPlan(None, range(0), range(0), {})
    fp_step = min(first + 1, steps - 1)
    start = fp_step + 1
    end = steps
    if steps % sync_every and end - start >= 1:
        end -= 1  # the off-grid epoch-end flush
    periods = max(0, end - start) // period
    prof_periods = min(math.ceil(sample_steps / period), periods - 1) if periods > 1 else 0
    profiled = range(start, start + prof_periods * period)
    timed = range(profiled.stop, start + periods * period)
    ref: dict[int, int] = {}
    if len(timed) and reference_steps > 0:
        for j in range(reference_steps):
            s = timed.start + (j * len(timed)) // reference_steps + len(timed) // (2 * reference_steps)
            s = min(s, timed.stop - 1)
            ref[s] = ref.get(s, 0) + 1
    return EpochPlan(fp_step, profiled, timed, ref)


class PhaseTimer:
    """Exclusive time of nested phases: per profiled step (their median per phase) and outside
    steps (summed over the epoch, e.g. ``rebuild``)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.reset()

    def reset(self) -> None:
        """A new epoch."""
        self.step_phases: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.epoch_phases: dict[str, float] = {}
        self.stack: list[list[Any]] = []  # [name, t0, children_s]

    def enter(self, name: str) -> None:
        """Phase ``name`` starts now."""
        self.stack.append([name, self.now(), 0.0])

    def exit(self, in_step: bool) -> None:
        """The innermost phase ends now; its time less its children's goes to the step in progress
        (``in_step``) or to the epoch."""
        name, t0, children = self.stack.pop()
        elapsed = self.now() - t0
        target = self.cur if in_step else self.epoch_phases
        target[name] = target.get(name, 0.0) + elapsed - children
        if self.stack:
            self.stack[-1][2] += elapsed

    def innermost(self) -> str | None:
        """The name of the phase in progress, if any."""
        return self.stack[-1][0] if self.stack else None

    def watch(self, optimizer: torch.optim.Optimizer, recording: Callable[[], bool]) -> list[Any]:
        """Time ``optimizer.step`` as the ``optimizer`` phase while ``recording()``; returns the hook
        handles. The engine's ``backward_step`` runs backward and the optimizer step in one call;
        step hooks split them without touching the engine."""
        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if recording():
                self.enter("optimizer")

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self.innermost() == "optimizer":
                self.exit(in_step=True)

        return [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def end_step(self, sampled: bool) -> None:
        """A step ended: keep its phases if it was a profiled one."""
        if sampled:
            self.step_phases.append(self.cur)
        self.cur = {}

    def row(self) -> dict[str, float]:
        """``phase_<name>_s``: the median over the profiled steps, plus the epoch-level phases."""
        row: dict[str, float] = {}
        for n in sorted({n for p in self.step_phases for n in p}):
            row[f"phase_{n}_s"] = statistics.median(p.get(n, 0.0) for p in self.step_phases)
        for n, v in self.epoch_phases.items():
            row[f"phase_{n}_s"] = row.get(f"phase_{n}_s", 0.0) + v
        return row


@dataclass
class EpochTimes:
    """The time stamps of one epoch and what they give."""

    t0: float | None = None  # the epoch clock's start (host)
    last_end: float | None = None  # the last step's end (host)
    steps: int = 0
    win: list[Any] = field(default_factory=list)  # marks: [window start, window end]
    ref_marks: list[tuple[Any, Any, bool]] = field(default_factory=list)  # (start, end, inside the window)
    dedicated: list[tuple[Any, Any]] = field(default_factory=list)  # footprint and profiled steps
    excluded: list[tuple[Any, Any, bool]] = field(default_factory=list)  # evaluations: (start, end, inside)
    fixed_overhead_s: float = 0.0  # the reference copy's build and measured step

    def step_time(self, clock: Clock, plan: EpochPlan) -> tuple[float | None, int]:
        """``(step_time_s, timed_steps)``: the window's time less the reference steps and excluded
        spans (evaluations) inside it, over its steps; ``(None, 0)`` when the epoch had no whole window."""
        n_timed = len(plan.timed) if len(self.win) == 2 else 0
        if not n_timed:
            return None, 0
        inside = sum(clock.elapsed(a, b) for a, b, ins in self.ref_marks + self.excluded if ins)
        return (clock.elapsed(*self.win) - inside) / n_timed, n_timed

    @contextlib.contextmanager
    def exclude(self, clock: Clock) -> Iterator[None]:
        """Keep the block (an evaluation between steps) out of the step time and the loop time."""
        a, inside = clock.mark(), len(self.win) == 1
        try:
            yield
        finally:
            self.excluded.append((a, clock.mark(), inside))

    def reference_time(self, clock: Clock) -> float:
        """All reference steps' time."""
        return sum(clock.elapsed(a, b) for a, b, _ in self.ref_marks)

    def overhead(self, clock: Clock, step_time: float | None) -> float:
        """What the measurements added: the reference steps, the dedicated steps' excess over a timed
        step and the reference's fixed cost."""
        dedicated = sum(clock.elapsed(a, b) for a, b in self.dedicated)
        excess = max(0.0, dedicated - (step_time or 0.0) * len(self.dedicated))
        return self.reference_time(clock) + excess + self.fixed_overhead_s

    def loop_s(self, clock: Clock) -> float:
        """The epoch's loop on the host clock, from the epoch start to the last step's end, less the
        excluded spans (evaluations between steps)."""
        end = self.last_end if self.last_end is not None else clock.fn()
        excluded = sum(clock.elapsed(a, b) for a, b, _ in self.excluded)
        return end - self.t0 - excluded if self.t0 is not None else 0.0
