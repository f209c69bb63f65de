"""Per-epoch memory and time accounting (docs/profiling.md, docs/design.md).

The pieces, and the :class:`Profiler` that the trainer drives with them:

* :class:`ActivationCounter` / :func:`saved_activation_bytes` — the *exact* bytes autograd keeps
  for backward, per stage, counted with ``torch.autograd.graph.saved_tensors_hooks``;
* :func:`device_memory` and :func:`model_memory` — CUDA peaks / NVML / process RSS, and the
  bytes of parameters, gradients and optimizer state; the peak footprint of a step by category
  comes from :mod:`distlocal.footprint`;
* :func:`plan_epoch` — which step of an epoch is measured, profiled, timed, and where the
  reference steps go; :class:`ReferenceStep` — the all-SGD step, through the run's own engine;
* :class:`Profiler` — the flat metric keys of each epoch and of the run summary, and
  :func:`headline`, the line a run ends with.

:func:`train_step` is the single-process LoCal+SGD step of ``profiling/bench.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from distlocal.footprint import CATEGORIES, track_footprint

if TYPE_CHECKING:
    # Only for hints: importing distlocal.config pulls in Hydra, which the profiler and
    # profiling/bench.py do not otherwise need (they run on bare PyTorch images).
    from distlocal.config import ProfilerConfig

PHASES = ("data", "prefix", "sync", "suffix_fwd", "backward", "optimizer", "rebuild")
"""Phase names the trainer uses; :meth:`Profiler.phase` accepts any name."""


# ---------------------------------------------------------------------------------------------
# activation memory
# ---------------------------------------------------------------------------------------------
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
            loss = F.cross_entropy(model(x), y)
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


# ---------------------------------------------------------------------------------------------
# device and model memory
# ---------------------------------------------------------------------------------------------
_NVML: dict[str, Any] = {}  # {"ok": bool} once initialised (or failed) — NVML is tried once per process


def nvml_used_bytes(device_index: int = 0) -> int | None:
    """Device memory in use (all processes) as NVML reports it; ``None`` when NVML is unavailable.

    ``nvidia-ml-py`` imports fine without a driver and raises ``NVMLError_LibraryNotFound`` at
    ``nvmlInit``: that (and any NVML error) yields ``None``, never an exception. The device is
    found by UUID when torch knows it, so ``CUDA_VISIBLE_DEVICES`` remapping is respected.
    """
    try:
        import pynvml
    except ImportError:
        return None
    if "ok" not in _NVML:
        try:
            pynvml.nvmlInit()
            _NVML["ok"] = True
        except pynvml.NVMLError:
            _NVML["ok"] = False
    if not _NVML["ok"]:
        return None
    handle = None
    try:
        uuid = str(getattr(torch.cuda.get_device_properties(device_index), "uuid", "") or "")
        if uuid:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except (pynvml.NVMLError, RuntimeError, AssertionError):
        handle = None  # no CUDA in torch, or a UUID NVML does not know: fall back to the index
    try:
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        return None


def rss_bytes() -> tuple[int | None, int | None]:
    """``(peak, current)`` resident set size of this process in bytes.

    The peak (``getrusage``) is the whole process lifetime's and cannot be reset, so it only grows
    from epoch to epoch. The current RSS comes from ``/proc/self/statm`` (Linux; ``None`` elsewhere).
    """
    peak: int | None = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = peak if sys.platform == "darwin" else peak * 1024
    current = None
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return peak, current


def device_memory(device: torch.device) -> dict[str, int | None]:
    """Peak/used device memory and host RSS; every key present, ``None`` where not applicable.

    CUDA keys: ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes`` (since the last
    ``torch.cuda.reset_peak_memory_stats``) and ``nvml_used_bytes``; ``None`` on CPU.
    Host keys, always: ``peak_rss_bytes``, ``rss_bytes``.
    """
    peak, current = rss_bytes()
    out: dict[str, int | None] = {
        "cuda_max_allocated_bytes": None, "cuda_max_reserved_bytes": None, "nvml_used_bytes": None,
        "peak_rss_bytes": peak, "rss_bytes": current,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        out["nvml_used_bytes"] = nvml_used_bytes(device.index if device.index is not None else 0)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """``param_bytes`` (all parameters), ``grad_bytes`` (those with a ``.grad``), ``optim_state_bytes``
    (every tensor in ``optimizer.state``: momentum, Adam moments, step counters)."""
    params = list({id(p): p for p in model.parameters()}.values())
    state = 0
    if optimizer is not None:
        for s in optimizer.state.values():
            state += sum(_nbytes(v) for v in s.values() if isinstance(v, torch.Tensor))
    return {
        "param_bytes": sum(_nbytes(p) for p in params),
        "grad_bytes": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optim_state_bytes": state,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# one single-process step (profiling/bench.py)
# ---------------------------------------------------------------------------------------------
def train_step(
    model: nn.Module,
    learner: Any,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int = 0,
    counter: ActivationCounter | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
    sync_every: int = 1,
) -> torch.Tensor:
    """One single-process LoCal+SGD step, as the trainer runs it with ``sync_every=1``.

    Prefix under ``no_grad`` (the learner's hooks accumulate ``lr * delta``), suffix forward,
    loss, backward, optimizer step, then the deltas and prefix BN statistics are applied. With
    ``learner=None`` (or a learner at boundary 0) it is a plain all-SGD step of ``model``.
    ``counter``, if given, is active over the forward and loss only. Returns the detached loss.
    ``sync_every``: the deltas are applied after steps ``k·sync_every − 1`` that computed one, as
    :meth:`distlocal.parallel.sync.DeltaSync.due` decides in the trainer (a step without a delta has
    nothing to apply on one process).
    """
    ctx = autocast or contextlib.nullcontext
    boundary = learner.boundary if learner is not None else 0
    with counter if counter is not None else contextlib.nullcontext():
        with ctx():
            h = learner.prefix_forward(x, step) if learner is not None else x
            out = model.forward_range(h, boundary, model.num_stages)
            loss = F.cross_entropy(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if learner is not None and learner.has_local and learner.delta_pending and (step + 1) % sync_every == 0:
        learner.pack_stats()  # what DeltaSync.start/finish do on one process
        learner.apply()
    return loss.detach()


def _strip_hooks(model: nn.Module) -> None:
    """Drop module hooks copied along by ``deepcopy`` (the learner's closures refer to the original)."""
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                     "_forward_hooks_always_called"):
            d = getattr(m, attr, None)
            if d is not None:
                d.clear()


# ---------------------------------------------------------------------------------------------
# the epoch's plan: which step is measured how
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the all-SGD reference
# ---------------------------------------------------------------------------------------------
class ReferenceStep:
    """The all-SGD step the run is compared with, run the way the run runs its own steps.

    A boundary-0 copy of the model (every parameter trainable, the learner's hooks dropped) behind
    its own engine from ``engine_factory`` (the run's factory: DDP or DeepSpeed, the run's
    ``trainer.optimizer`` and precision), fed real batches from ``batches()`` (a second iterator
    over the run's training loader) and the run's ``autocast``. One :meth:`run` is what the
    trainer does at boundary 0: load the batch, forward, loss, backward + all-reduce + optimizer
    step, read the loss. The copy never touches the run: its own weights, BN statistics, optimizer
    state and loader iterator; the caller keeps the global RNG out of it (``fork_rng``). Under DDP
    every rank must call :meth:`run` at the same point (it all-reduces gradients).
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
        self.engine: Any = None
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def build(self) -> None:
        """Copy the model (boundary 0) and build its engine; idempotent."""
        if self.model is not None:
            return
        ref = copy.deepcopy(self.source)
        _strip_hooks(ref)
        ref.train()
        for p in ref.parameters():
            p.requires_grad_(True)
            p.grad = None
        self.model = ref
        self.engine = self.engine_factory(ref)

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

    def step(self, x: torch.Tensor, y: torch.Tensor,
             forward_ctx: Callable[[], AbstractContextManager] | None = None) -> float:
        """One all-SGD step on ``(x, y)`` (``forward_ctx`` around its forward and loss, e.g. an
        :class:`ActivationCounter`); returns the loss."""
        with (forward_ctx or contextlib.nullcontext)(), self.autocast():
            out = self.engine.forward(x)
            loss = F.cross_entropy(out.float(), y)
        self.engine.backward_step(loss)
        return float(loss.detach())

    def run(self) -> float:
        """One all-SGD step as the trainer runs one: fetch the batch, then :meth:`step`."""
        return self.step(*self.next_batch())

    def reset_iterator(self) -> None:
        """A new epoch: the next :meth:`run` starts a fresh pass over the loader."""
        self._it = None

    def close(self) -> None:
        """Drop the copy and its engine."""
        self.model, self.engine, self._it = None, None, None


# ---------------------------------------------------------------------------------------------
# the profiler
# ---------------------------------------------------------------------------------------------
def _clock() -> float:
    """The profiler's clock on CPU (tests replace it with a fake one)."""
    return time.perf_counter()


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(ref: float | None, now: float | None) -> float | None:
    return ref / now if ref is not None and now else None


HEADLINE_KEYS = ("end_to_end_s", "speedup", "footprint_ref_bytes", "footprint_bytes", "footprint_reduction",
                 "activation_bytes_ref", "activation_bytes", "activation_reduction",
                 "grad_allreduce_bytes", "delta_sync_bytes", "comm_bytes_per_step")
"""The keys a run leads with (``summary.json``, the wandb summary, the last stdout line)."""


class Profiler:
    """Per-epoch time and memory accounting, driven by the trainer (one instance per rank).

    Per epoch: ``epoch_start`` (plans the epoch, see :func:`plan_epoch`) → steps
    (``step_begin``/``step_end``; inside them ``with footprint(...)``, ``with activations()``,
    ``with phase(name)``) → ``epoch_end`` returns flat metrics.

    * **Footprint** (``footprint_*``): the peak bytes of the epoch's second step by category
      (:mod:`distlocal.footprint`), and the bytes saved for backward (``activation_bytes``).
    * **Time** (``step_time_s``): the wall time of the epoch's timed steps (every step but the
      dedicated ones, in whole lever periods) over their number. No synchronisation on them; on
      CUDA, events. ``phase_<name>_s`` come from a few dedicated *profiled* steps (synchronised
      phase by phase), kept out of ``step_time_s``.
    * **Reference** (``step_time_ref_s``, ``footprint_ref_*``, ``activation_bytes_ref``): in an
      epoch at boundary 0 the run's own step. Otherwise a :class:`ReferenceStep` (see
      :meth:`attach_reference`): a few all-SGD steps per epoch, spread between the timed steps so
      they see the same machine load, excluded from the run's time; their footprint is measured
      once, on the copy's second step. ``speedup = step_time_ref_s / step_time_s``.
    * Disabled (``cfg.enabled=False``): every method is a no-op and returns ``{}``.
    """

    def __init__(
        self,
        cfg: ProfilerConfig | Any | None,
        model: nn.Module,
        device: torch.device | str,
        run_dir: Path | None = None,
        verbose: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock``: a stand-in for ``time.perf_counter`` (tests); it also turns CUDA events off."""
        if cfg is None:
            from distlocal.config import ProfilerConfig

            cfg = ProfilerConfig()
        self.enabled = bool(cfg.enabled)
        self.sample_steps = int(cfg.sample_steps)
        self.reference_steps = int(cfg.reference_steps)
        self.model = model
        self.device = torch.device(device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.verbose = verbose
        self._clock = clock or _clock
        self._events = clock is None and self.device.type == "cuda"
        self.memory_snapshot = bool(cfg.memory_snapshot) and self.enabled
        if self.memory_snapshot and self.device.type != "cuda":
            self._log("profiler.memory_snapshot is CUDA-only; skipped on " + self.device.type)
            self.memory_snapshot = False
        self._watched: set[int] = set()
        self._opt_handles: list[Any] = []
        self._ref: ReferenceStep | None = None
        self._ref_fp: dict[str, Any] | None = None  # the copy's footprint keys, measured once
        # run totals
        self._epoch = -1
        self._loop_s = 0.0
        self._steady_s = 0.0
        self._sgd_s = 0.0  # the reference step time x the steps of each epoch
        self._steps = 0
        self._overhead_s = 0.0
        self._speedups: list[float] = []
        self._reset_epoch()

    # ------------------------------------------------------------------ bookkeeping
    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"distlocal: {msg}", flush=True)

    def _reset_epoch(self) -> None:
        self._plan = EpochPlan(None, range(0), range(0), {})
        self._boundary = 0
        self._step: int | None = None  # the step in progress, None between steps
        self._sampled = False
        self._step_t0: Any = None
        self._step_phases: list[dict[str, float]] = []
        self._cur: dict[str, float] = {}
        self._epoch_phases: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [name, t0, children_s]
        self._act: ActivationCounter | None = None
        self._fp: dict[str, Any] | None = None
        self._snapshot_on = False
        self._epoch_t0: float | None = None
        self._last_end: float | None = None
        self._epoch_steps = 0
        self._win: list[Any] = []  # marks: [window start, window end]
        self._ref_marks: list[tuple[Any, Any, bool]] = []  # (start, end, inside the window)
        self._dedicated: list[tuple[Any, Any]] = []  # footprint and profiled steps
        self._excluded: list[tuple[Any, Any, bool]] = []  # (start, end, inside the window): evaluations
        self._fixed_overhead_s = 0.0  # the copy's build and first (measured) step

    def _mark(self) -> Any:
        """A time stamp: a recorded CUDA event (no synchronisation) or the clock."""
        if self._events:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return self._clock()

    def _elapsed(self, a: Any, b: Any) -> float:
        if isinstance(a, torch.cuda.Event):
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return float(b - a)

    def _now(self) -> float:
        _sync(self.device)
        return self._clock()

    @property
    def has_reference(self) -> bool:
        """Whether a :class:`ReferenceStep` is attached (epochs with local stages get their reference)."""
        return self._ref is not None

    def _recording(self) -> bool:
        return self.enabled and (self._sampled or self._step is None)

    def _cuda_devs(self) -> list[int]:
        if self.device.type != "cuda":
            return []
        return [self.device.index if self.device.index is not None else torch.cuda.current_device()]

    # ------------------------------------------------------------------ reference
    def attach_reference(self, engine_factory: Callable[[nn.Module], Any],
                         batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
                         autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        """Give the profiler the run's engine factory, loader and autocast for its all-SGD reference.

        Nothing is built until an epoch with local stages starts (an ``sgd`` run pays nothing).
        """
        if self.enabled:
            self._ref = ReferenceStep(self.model, engine_factory, batches, self.device, autocast)

    def _run_reference(self, n: int) -> None:
        """``n`` timed reference steps (between two run steps; the run's RNG is left as it was)."""
        assert self._ref is not None
        inside = len(self._win) == 1  # the window is open: subtract these from its time
        with torch.random.fork_rng(devices=self._cuda_devs()):
            for _ in range(n):
                t0 = self._mark()
                self._ref.run()
                self._ref_marks.append((t0, self._mark(), inside))

    def _prepare_reference(self) -> None:
        """Epoch start with local stages: build the copy (first time), load the run's weights and
        (first time) measure its footprint and saved activations on an untimed step, after one
        warm-up step so that its optimizer state exists, as in the run's footprint step."""
        assert self._ref is not None
        t0 = self._now()
        with torch.random.fork_rng(devices=self._cuda_devs()):
            self._ref.build()
            self._ref.load_weights()
            self._ref.reset_iterator()
            if self._ref_fp is None:
                ref = self._ref
                assert ref.model is not None
                opts = tuple(o for o in (getattr(ref.engine, "optimizer", None),)
                             if isinstance(o, torch.optim.Optimizer))
                ref.run()
                x, y = ref.next_batch()  # created before the measurement, as the run's batch is
                act = ActivationCounter(getattr(ref.model, "stages", [ref.model]))
                self._cuda_reset()
                with track_footprint(self.device, modules=(ref.model,), optimizers=opts) as fp:
                    ref.step(x, y, forward_ctx=lambda: act)
                del x, y
                self._ref_fp = {**fp.as_metrics("footprint_ref"), "activation_bytes_ref": act.total,
                                "cuda_step_peak_ref_bytes": self._cuda_peak()}
                self._log(f"all-SGD reference: a boundary-0 copy behind its own {type(ref.engine).__name__}, "
                          f"{self.reference_steps} steps per epoch between the run's; peak footprint "
                          f"{fmt_bytes(fp.total, binary=True)}")
        self._fixed_overhead_s += self._now() - t0

    def _cuda_reset(self) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _cuda_peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        _sync(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    # ------------------------------------------------------------------ epoch / step API
    def epoch_start(self, optimizer: torch.optim.Optimizer | None = None, *, steps: int, boundary: int = 0,
                    first: int = 0, period: int = 1, sync_every: int = 1) -> None:
        """Start an epoch that runs steps ``first .. steps - 1`` at ``boundary``: plan it (see
        :func:`plan_epoch`; ``period`` = ``lcm(update_every, sync_every)``), prepare the reference
        when there are local stages, start the epoch clock and time ``optimizer``.

        Phases recorded since the last ``epoch_end`` (a ``rebuild``
        before this call) stay in this epoch.
        """
        if not self.enabled:
            return
        self._epoch += 1
        self._boundary = boundary
        use_ref = boundary > 0 and self._ref is not None
        self._plan = plan_epoch(first, steps, period, sync_every, self.sample_steps,
                                self.reference_steps if use_ref else 0)
        if use_ref:
            self._prepare_reference()
        if optimizer is not None:
            self.watch_optimizer(optimizer)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._epoch_t0 = self._now()

    @property
    def plan(self) -> EpochPlan:
        """This epoch's plan (set by :meth:`epoch_start`)."""
        return self._plan

    def should_sample(self, step: int) -> bool:
        """Whether step ``step`` (0-based in the epoch) is one of the dedicated profiled steps."""
        return self.enabled and step in self._plan.profiled

    def step_begin(self, step: int) -> None:
        """Mark the start of step ``step`` (before its batch is fetched)."""
        if not self.enabled:
            return
        self._step = step
        self._sampled = self.should_sample(step)
        self._cur = {}
        if step == self._plan.timed.start:
            self._win = [self._mark()]
        if self._sampled or step == self._plan.footprint_step:
            _sync(self.device)
            self._step_t0 = self._mark()
        if self.memory_snapshot and step == self._plan.footprint_step and not self._snapshot_on:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._snapshot_on = True

    def step_end(self) -> None:
        """Mark the end of the step begun by :meth:`step_begin`; then run the reference steps the
        plan puts here."""
        if not self.enabled or self._step is None:
            return
        step = self._step
        if self._sampled or step == self._plan.footprint_step:
            _sync(self.device)
            self._dedicated.append((self._step_t0, self._mark()))
        if self._sampled:
            self._step_phases.append(self._cur)
        if len(self._win) == 1 and step == self._plan.timed.stop - 1:
            self._win.append(self._mark())
        if self._snapshot_on:
            self._dump_snapshot()
        self._step, self._sampled, self._cur = None, False, {}
        self._epoch_steps += 1
        n = self._plan.reference.get(step, 0)
        if n and self._ref is not None and self._boundary > 0:
            self._run_reference(n)  # inside the window unless it just closed (its last step)
        self._last_end = self._clock()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """``with prof.step(i):`` — :meth:`step_begin` / :meth:`step_end` around a step's body."""
        self.step_begin(step)
        try:
            yield
        finally:
            self.step_end()

    def _phase_enter(self, name: str) -> None:
        self._stack.append([name, self._now(), 0.0])

    def _phase_exit(self) -> None:
        name, t0, children = self._stack.pop()
        elapsed = self._now() - t0
        target = self._cur if self._step is not None else self._epoch_phases
        target[name] = target.get(name, 0.0) + elapsed - children  # exclusive time
        if self._stack:
            self._stack[-1][2] += elapsed

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time that is not training (a periodic evaluation between steps): kept out of the timed
        window (``step_time_s``) and of ``train_loop_s``."""
        if not self.enabled:
            yield
            return
        a, inside = self._mark(), len(self._win) == 1
        try:
            yield
        finally:
            self._excluded.append((a, self._mark(), inside))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` on profiled steps (and outside steps); else a no-op."""
        if not self._recording():
            yield
            return
        self._phase_enter(name)
        try:
            yield
        finally:
            self._phase_exit()

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Time ``optimizer.step`` as the ``optimizer`` phase (idempotent per optimizer).

        The engine's ``backward_step`` runs backward and the optimizer step in one call; step
        hooks split them without touching the engine.
        """
        if not self.enabled or id(optimizer) in self._watched:
            return
        self._watched.add(id(optimizer))

        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._recording() and self._step is not None:
                self._phase_enter("optimizer")

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._stack and self._stack[-1][0] == "optimizer":
                self._phase_exit()

        self._opt_handles += [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def _measuring(self) -> bool:
        return self.enabled and self._step is not None and self._step == self._plan.footprint_step

    @contextlib.contextmanager
    def footprint(self, modules: tuple[nn.Module, ...] = (), optimizers: tuple[Any, ...] = (),
                  local: tuple[torch.Tensor, ...] = ()) -> Iterator[None]:
        """Measure the peak footprint of the block (the whole step) on the epoch's footprint step.

        ``modules``/``optimizers``/``local`` as :func:`distlocal.footprint.track_footprint`
        (optimizers that are not ``torch.optim.Optimizer`` are left out). On CUDA the allocator's
        peak over the step is read too (reset before it). Elsewhere a no-op.
        """
        if not self._measuring():
            yield
            return
        opts = tuple(o for o in optimizers if isinstance(o, torch.optim.Optimizer))
        self._cuda_reset()
        with track_footprint(self.device, modules, opts, local) as fp:
            yield
        self._fp = {**fp.as_metrics(), "cuda_step_peak_bytes": self._cuda_peak()}

    @contextlib.contextmanager
    def activations(self) -> Iterator[None]:
        """Count bytes saved for backward inside the block, on the footprint step only.

        Wrap the step's forward and loss (prefix + suffix). Elsewhere a no-op.
        """
        if not self._measuring() or self._act is not None:
            yield
            return
        self._act = ActivationCounter(getattr(self.model, "stages", [self.model]))
        with self._act:
            yield

    def _dump_snapshot(self) -> None:
        self._snapshot_on = False
        if self.run_dir is None:
            torch.cuda.memory._record_memory_history(enabled=None)
            return
        path = self.run_dir / f"memory_snapshot_epoch{self._epoch}.pickle"
        try:
            torch.cuda.memory._dump_snapshot(str(path))
            self._log(f"memory snapshot written to {path} (open with https://pytorch.org/memory_viz)")
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    def epoch_end(self, boundary: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Close the epoch and return its flat metric keys (merge them into the epoch's row).

        Time: ``step_time_s`` (timed steps' wall time / their number; ``None`` when the epoch had
        no whole lever period to time), ``step_time_ref_s``, ``speedup`` (ref / this),
        ``timed_steps``, ``reference_steps``, ``profiled_steps``, ``phase_<name>_s`` (per-step
        phases: median over the profiled steps; epoch-level phases such as ``rebuild``: their
        sum) and ``profiler_overhead_s`` (what the measurements added to the epoch: the reference
        steps, and the dedicated steps' excess over a timed step). Memory: ``footprint_bytes``,
        ``footprint_<category>_bytes``, ``footprint_ref_bytes`` (and its categories),
        ``footprint_reduction`` (ref / this), ``cuda_step_peak_bytes`` / ``cuda_step_peak_ref_bytes``
        (CUDA allocator peak over the measured step; ``None`` on CPU), ``activation_bytes``,
        ``activation_bytes_stage``, ``activation_bytes_ref``, ``activation_reduction`` (ref / this),
        and the :func:`device_memory` and :func:`model_memory` keys. ``None`` where unknown.
        """
        if not self.enabled:
            return {}
        end = self._last_end if self._last_end is not None else self._clock()
        loop_s = end - self._epoch_t0 if self._epoch_t0 is not None else 0.0
        n_timed = len(self._plan.timed) if len(self._win) == 2 else 0
        ref_in = sum(self._elapsed(a, b) for a, b, inside in self._ref_marks if inside)
        ref_all = sum(self._elapsed(a, b) for a, b, _ in self._ref_marks)
        excl_in = sum(self._elapsed(a, b) for a, b, inside in self._excluded if inside)
        loop_s -= sum(self._elapsed(a, b) for a, b, _ in self._excluded)
        step_time = (self._elapsed(*self._win) - ref_in - excl_in) / n_timed if n_timed else None
        row: dict[str, Any] = {}
        names = sorted({n for p in self._step_phases for n in p})
        for n in names:
            row[f"phase_{n}_s"] = statistics.median(p.get(n, 0.0) for p in self._step_phases)
        for n, v in self._epoch_phases.items():
            row[f"phase_{n}_s"] = row.get(f"phase_{n}_s", 0.0) + v
        fp = self._fp or {}
        act = self._act.total if self._act is not None else None
        n_ref = len(self._ref_marks)
        if boundary == 0:  # the run's own step is the all-SGD step
            ref_step = step_time
            ref_fp = {k.replace("footprint_", "footprint_ref_", 1): v for k, v in fp.items()
                      if k.startswith("footprint_")}
            ref_act, ref_peak = act, fp.get("cuda_step_peak_bytes")
        else:
            ref_step = ref_all / n_ref if n_ref else None
            ref_fp = {k: v for k, v in (self._ref_fp or {}).items() if k.startswith("footprint_ref_")}
            ref_act = (self._ref_fp or {}).get("activation_bytes_ref")
            ref_peak = (self._ref_fp or {}).get("cuda_step_peak_ref_bytes")
        row["step_time_s"] = step_time
        row["step_time_ref_s"] = ref_step
        row["speedup"] = _ratio(ref_step, step_time)
        row["timed_steps"] = n_timed
        row["reference_steps"] = n_ref
        row["profiled_steps"] = len(self._step_phases)
        dedicated = sum(self._elapsed(a, b) for a, b in self._dedicated)
        excess = max(0.0, dedicated - (step_time or 0.0) * len(self._dedicated))
        row["profiler_overhead_s"] = ref_all + excess + self._fixed_overhead_s
        fp_keys = ("footprint_bytes", *(f"footprint_{c}_bytes" for c in CATEGORIES.values()))
        row.update({k: fp.get(k) for k in fp_keys})
        row.update(ref_fp)
        row["footprint_reduction"] = _ratio(ref_fp.get("footprint_ref_bytes"), fp.get("footprint_bytes"))
        row["cuda_step_peak_bytes"] = fp.get("cuda_step_peak_bytes")
        row["cuda_step_peak_ref_bytes"] = ref_peak
        row["activation_bytes"] = act
        row["activation_bytes_stage"] = list(self._act.per_stage) if self._act is not None else None
        row["activation_bytes_ref"] = ref_act
        row["activation_reduction"] = _ratio(ref_act, act)
        row.update(device_memory(self.device))
        row.update(model_memory(self.model, optimizer))
        # Run totals: the epoch's loop at its timed step time, and the same steps all-SGD.
        # (the copy's build and measured steps happen before the epoch clock starts)
        self._loop_s += loop_s - (row["profiler_overhead_s"] - self._fixed_overhead_s)
        self._overhead_s += row["profiler_overhead_s"]
        if step_time is not None:
            self._steady_s += step_time * self._epoch_steps
            self._sgd_s += (ref_step or step_time) * self._epoch_steps
        self._steps += self._epoch_steps
        if row["speedup"] is not None:
            self._speedups.append(row["speedup"])
        self._reset_epoch()
        return row

    # ------------------------------------------------------------------ run summary
    def summary(self, end_to_end_s: float | None = None,
                last_row: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run-level keys for ``summary.json``, led by :data:`HEADLINE_KEYS`.

        The headline is the last epoch's (the configuration the run ends in): ``speedup``,
        ``footprint_*``, ``activation_*``, ``grad_allreduce_bytes`` and ``delta_sync_bytes`` (per
        step) from ``last_row``, ``comm_bytes_per_step`` their sum, ``end_to_end_s``. Then:
        ``mean_speedup`` over the epochs, ``final_activation_reduction``, ``train_loop_s`` (the
        epochs' loops without the profiler's own overhead), ``profiler_overhead_s``,
        ``total_steps``, ``projected_sgd_s`` (every epoch's steps at that epoch's reference step
        time), ``steady_loop_s`` (the same steps at the epoch's timed step time),
        ``projected_speedup`` (their ratio) and, with ``end_to_end_s``,
        ``projected_sgd_end_to_end_s`` / ``projected_end_to_end_speedup`` (this run with its steady
        loop swapped for the all-SGD one; start-up, evaluation and checkpoints unchanged).
        """
        if not self.enabled:
            return {}
        row = last_row or {}
        out: dict[str, Any] = {"end_to_end_s": end_to_end_s}
        for k in HEADLINE_KEYS[1:-1]:
            out[k] = row.get(k)
        g, d = row.get("grad_allreduce_bytes"), row.get("delta_sync_bytes")
        out["comm_bytes_per_step"] = (g or 0) + (d or 0) if g is not None or d is not None else None
        projected = self._sgd_s if self._steady_s else None
        out.update({
            "mean_speedup": statistics.fmean(self._speedups) if self._speedups else None,
            "final_activation_reduction": row.get("activation_reduction"),
            "train_loop_s": self._loop_s, "profiler_overhead_s": self._overhead_s,
            "total_steps": self._steps, "projected_sgd_s": projected, "steady_loop_s": self._steady_s,
            "projected_speedup": _ratio(projected, self._steady_s),
        })
        if end_to_end_s is not None and projected is not None:
            sgd_e2e = end_to_end_s - self._overhead_s - self._steady_s + projected
            out["projected_sgd_end_to_end_s"] = sgd_e2e
            out["projected_end_to_end_speedup"] = _ratio(sgd_e2e, end_to_end_s - self._overhead_s)
        return out

    def close(self) -> None:
        """Remove the optimizer hooks and drop the reference copy (end of training)."""
        for h in self._opt_handles:
            h.remove()
        self._opt_handles, self._watched = [], set()
        if self._ref is not None:
            self._ref.close()


# ---------------------------------------------------------------------------------------------
# the line a run ends with
# ---------------------------------------------------------------------------------------------
def fmt_bytes(n: float | None, binary: bool = False) -> str:
    """``1536 -> '1.5 KB'`` (decimal units; ``binary``: KiB, MiB, ...); ``'?'`` for ``None``."""
    if n is None:
        return "?"
    base, units = ((1024.0, ("B", "KiB", "MiB", "GiB", "TiB")) if binary
                   else (1000.0, ("B", "KB", "MB", "GB", "TB")))
    v, u = float(n), units[0]
    for u in units:
        if abs(v) < base or u == units[-1]:
            break
        v /= base
    return f"{v:.0f} {u}" if u == "B" or v >= 100 else f"{v:.3g} {u}"


def _x(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}x" if v >= 100 else f"{v:.2f}x"


def headline(summary: dict[str, Any]) -> str:
    """The one line a run ends with, from the :data:`HEADLINE_KEYS` of its summary, e.g.
    ``end-to-end 20.6 s | speedup 1.21x vs all-SGD step | peak footprint 161 -> 98 MiB (1.64x) |
    activations 35 MB -> 18 KB (1954x) | grad + delta 5.2 KB + 0.6 MB per step``."""
    s = summary
    e2e = s.get("end_to_end_s")
    return " | ".join([
        f"end-to-end {e2e:.1f} s" if e2e is not None else "end-to-end ?",
        f"speedup {_x(s.get('speedup'))} vs all-SGD step",
        f"peak footprint {fmt_bytes(s.get('footprint_ref_bytes'), True)} -> "
        f"{fmt_bytes(s.get('footprint_bytes'), True)} ({_x(s.get('footprint_reduction'))})",
        f"activations {fmt_bytes(s.get('activation_bytes_ref'))} -> {fmt_bytes(s.get('activation_bytes'))} "
        f"({_x(s.get('activation_reduction'))})",
        f"grad + delta {fmt_bytes(s.get('grad_allreduce_bytes'))} + "
        f"{fmt_bytes(s.get('delta_sync_bytes'))} per step",
    ])
