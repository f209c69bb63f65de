"""Per-epoch memory and time accounting (DESIGN §4).

Three independent pieces, and the :class:`Profiler` that the trainer drives with them:

* :class:`ActivationCounter` / :func:`saved_activation_bytes` — the *exact* bytes autograd keeps
  for backward, per stage, counted with ``torch.autograd.graph.saved_tensors_hooks``;
* :func:`device_memory` and :func:`model_memory` — CUDA peaks / NVML / process RSS, and the
  bytes of parameters, gradients and optimizer state;
* :class:`Profiler` — phase timing on a few sampled steps per epoch, the all-SGD reference
  (boundary-0 epochs, or :meth:`Profiler.calibrate` on a throw-away copy of the model) and the
  flat metric keys of each epoch and of the run summary.

:func:`train_step` is the single-process LoCal+SGD step shared by ``profiling/bench.py`` and the
calibration, so neither re-implements the local step.
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

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
# one single-process step (bench, calibration)
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
    :meth:`distlocal.dist.sync.DeltaSync.due` decides in the trainer (a step without a delta has
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
# the profiler
# ---------------------------------------------------------------------------------------------
def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(ref: float | None, now: float | None) -> float | None:
    return ref / now if ref is not None and now else None


class Profiler:
    """Per-epoch time and memory accounting, driven by the trainer (one instance per rank).

    Per epoch: ``epoch_start`` → steps (``step_begin``/``step_end`` or ``with step(i)``; inside
    them ``with phase(name)`` and ``with activations()``) → ``epoch_end`` returns flat metrics.

    * **Sampling**: steps ``1..sample_steps`` of each epoch are timed (step 0 is warm-up; after a
      mid-epoch resume, the steps after the first one). On
      sampled steps phases are wall-timed with ``torch.cuda.synchronize()`` around them; on the
      others every call is a cheap no-op. Phases outside a step (``rebuild``) are always timed.
      Nested phases are exclusive: the optimizer step (timed by optimizer hooks, see
      :meth:`watch_optimizer`) is subtracted from an enclosing ``backward`` phase.
    * **Activations**: ``with activations()`` counts saved tensors on the first step of each
      epoch only (the untimed warm-up step, so the pack-hook callbacks never touch timed steps).
    * **Reference**: epochs at boundary 0 set ``step_time_ref_s`` (median over all their sampled
      steps) and ``activation_bytes_ref``; a run that starts with local stages calls
      :meth:`calibrate` instead.
    * Disabled (``cfg.enabled=False``): every method is a no-op and returns ``{}``.
    """

    def __init__(
        self,
        cfg: ProfilerConfig | Any | None,
        model: nn.Module,
        device: torch.device | str,
        run_dir: Path | None = None,
        verbose: bool = True,
    ) -> None:
        if cfg is None:
            from distlocal.config import ProfilerConfig

            cfg = ProfilerConfig()
        self.enabled = bool(cfg.enabled)
        self.sample_steps = int(cfg.sample_steps)
        self.calibration_steps = int(cfg.calibration_steps)
        self.model = model
        self.device = torch.device(device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.verbose = verbose
        self.memory_snapshot = bool(cfg.memory_snapshot) and self.enabled
        if self.memory_snapshot and self.device.type != "cuda":
            self._log("profiler.memory_snapshot is CUDA-only; skipped on " + self.device.type)
            self.memory_snapshot = False
        self._watched: set[int] = set()
        self._opt_handles: list[Any] = []
        # reference (all-SGD): boundary-0 epochs first, calibration otherwise
        self._ref_steps: list[float] = []
        self._ref_act: int | None = None
        self._ref_peak: int | None = None
        self._calib: dict[str, Any] | None = None
        # run totals
        self._epoch = -1
        self._loop_s = 0.0
        self._steady_s = 0.0
        self._steps = 0
        self._speedups: list[float] = []
        self._last_reduction: float | None = None
        self._reset_epoch()

    # ------------------------------------------------------------------ bookkeeping
    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"distlocal: {msg}", flush=True)

    def _reset_epoch(self) -> None:
        self._step: int | None = None  # the step in progress, None between steps
        self._sampled = False
        self._step_t0 = 0.0
        self._step_times: list[float] = []
        self._step_phases: list[dict[str, float]] = []
        self._cur: dict[str, float] = {}
        self._epoch_phases: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [name, t0, children_s]
        self._act: ActivationCounter | None = None
        self._act_measured = False
        self._snapshot_on = False
        self._epoch_t0: float | None = None
        self._last_end: float | None = None
        self._epoch_steps = 0
        self._first_step: int | None = None

    @property
    def has_reference(self) -> bool:
        """Whether an all-SGD step time is known (a boundary-0 epoch ran, or :meth:`calibrate`)."""
        return bool(self._ref_steps) or self._calib is not None

    def _recording(self) -> bool:
        return self.enabled and (self._sampled or self._step is None)

    # ------------------------------------------------------------------ epoch / step API
    def epoch_start(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Start an epoch: reset the CUDA peak counters, start the epoch clock, time ``optimizer``.

        Phases recorded since the last ``epoch_end`` (a ``rebuild`` before this call) stay in
        this epoch.
        """
        if not self.enabled:
            return
        self._epoch += 1
        if optimizer is not None:
            self.watch_optimizer(optimizer)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._epoch_t0 = time.perf_counter()

    def should_sample(self, step: int) -> bool:
        """Whether step ``step`` (0-based in the epoch) is timed.

        The ``sample_steps`` steps after the epoch's first step: ``1..sample_steps`` normally,
        ``first+1..first+sample_steps`` in an epoch a mid-epoch resume enters at step ``first``.
        """
        first = self._first_step if self._first_step is not None else 0
        return self.enabled and 1 <= step - first <= self.sample_steps

    def step_begin(self, step: int) -> None:
        """Mark the start of step ``step`` (after the batch was fetched from the loader).

        On a sampled step the time since the previous step ended (the loader) counts as ``data``.
        """
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step = step
        self._step = step
        self._sampled = self.should_sample(step)
        self._cur = {}
        if self._sampled:
            now = time.perf_counter()
            if self._last_end is not None:
                self._cur["data"] = now - self._last_end
            _sync(self.device)
            self._step_t0 = time.perf_counter()
        if self.memory_snapshot and not self._act_measured and not self._snapshot_on:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._snapshot_on = True

    def step_end(self) -> None:
        """Mark the end of the step begun by :meth:`step_begin`."""
        if not self.enabled or self._step is None:
            return
        if self._sampled:
            _sync(self.device)
            self._step_times.append(time.perf_counter() - self._step_t0)
            self._step_phases.append(self._cur)
        if self._snapshot_on:
            self._dump_snapshot()
        self._step, self._sampled, self._cur = None, False, {}
        self._epoch_steps += 1
        self._last_end = time.perf_counter()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """``with prof.step(i):`` — :meth:`step_begin` / :meth:`step_end` around a step's body."""
        self.step_begin(step)
        try:
            yield
        finally:
            self.step_end()

    def _phase_enter(self, name: str) -> None:
        _sync(self.device)
        self._stack.append([name, time.perf_counter(), 0.0])

    def _phase_exit(self) -> None:
        _sync(self.device)
        name, t0, children = self._stack.pop()
        elapsed = time.perf_counter() - t0
        target = self._cur if self._step is not None else self._epoch_phases
        target[name] = target.get(name, 0.0) + elapsed - children  # exclusive time
        if self._stack:
            self._stack[-1][2] += elapsed

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` on sampled steps (and outside steps); else a no-op."""
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

    @contextlib.contextmanager
    def activations(self) -> Iterator[None]:
        """Count bytes saved for backward inside the block, on the epoch's first step only.

        Wrap the step's forward and loss (prefix + suffix). Elsewhere a no-op.
        """
        if not self.enabled or self._act_measured:
            yield
            return
        self._act_measured = True
        stages = getattr(self.model, "stages", [self.model])
        self._act = ActivationCounter(stages)
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

        Keys: ``phase_<name>_s`` (per-step phases: median over sampled steps, a phase absent from
        a sampled step counting 0; epoch-level phases: their sum), ``step_time_s`` (median sampled
        step; absent when no step was sampled), ``step_time_ref_s``, ``speedup`` (ref / now),
        ``activation_bytes``, ``activation_bytes_stage``, ``activation_bytes_ref``,
        ``memory_reduction`` (ref / now), the :func:`device_memory` and :func:`model_memory` keys,
        ``device_memory_reduction`` (CUDA: reference peak allocated / this epoch's; ``None`` on
        CPU, whose peak RSS cannot be reset) and ``profiled_steps``. ``None`` where unknown.
        """
        if not self.enabled:
            return {}
        end = self._last_end if self._last_end is not None else time.perf_counter()
        loop_s = end - self._epoch_t0 if self._epoch_t0 is not None else 0.0
        step_time = _median(self._step_times)
        self._loop_s += loop_s
        # Steady state: the median step for every step. The all-SGD projection is built from
        # steady reference steps, so one-off costs (CUDA/cuDNN start-up, first allocations) are
        # left out on this side too.
        self._steady_s += step_time * self._epoch_steps if step_time is not None else loop_s
        self._steps += self._epoch_steps
        row: dict[str, Any] = {}
        names = sorted({n for p in self._step_phases for n in p})
        for n in names:
            row[f"phase_{n}_s"] = statistics.median(p.get(n, 0.0) for p in self._step_phases)
        for n, v in self._epoch_phases.items():
            row[f"phase_{n}_s"] = row.get(f"phase_{n}_s", 0.0) + v
        act = self._act.total if self._act is not None else None
        mem = device_memory(self.device)
        if boundary == 0:
            self._ref_steps += self._step_times
            if act is not None:
                self._ref_act = act
            peak = mem["cuda_max_allocated_bytes"]
            if peak is not None:
                self._ref_peak = max(self._ref_peak or 0, peak)
        ref_step, ref_act, ref_peak = self._reference()
        if step_time is not None:
            row["step_time_s"] = step_time
        row["step_time_ref_s"] = ref_step
        row["speedup"] = _ratio(ref_step, step_time)
        row["activation_bytes"] = act
        row["activation_bytes_stage"] = list(self._act.per_stage) if self._act is not None else None
        row["activation_bytes_ref"] = ref_act
        row["memory_reduction"] = _ratio(ref_act, act)
        row.update(mem)
        row.update(model_memory(self.model, optimizer))
        row["device_memory_reduction"] = _ratio(ref_peak, mem["cuda_max_allocated_bytes"])
        row["profiled_steps"] = len(self._step_times)
        if row["speedup"] is not None:
            self._speedups.append(row["speedup"])
        if row["memory_reduction"] is not None:
            self._last_reduction = row["memory_reduction"]
        self._reset_epoch()
        return row

    def _reference(self) -> tuple[float | None, int | None, int | None]:
        """``(step time, activation bytes, CUDA peak)`` of all-SGD: boundary-0 epochs, else calibration."""
        c = self._calib or {}
        step = _median(self._ref_steps) if self._ref_steps else c.get("step_time_s")
        act = self._ref_act if self._ref_act is not None else c.get("activation_bytes")
        peak = self._ref_peak if self._ref_peak is not None else c.get("peak_bytes")
        return step, act, peak

    # ------------------------------------------------------------------ reference by calibration
    def calibrate(
        self,
        batch_shape: Sequence[int],
        num_classes: int,
        autocast: Callable[[], AbstractContextManager] | None = None,
        steps: int | None = None,
    ) -> dict[str, Any]:
        """Measure the all-SGD reference on a throw-away copy of the model; training is untouched.

        For a run that starts with local stages (``mode=freeze`` without warm-up, a resume): one
        warm-up step (activation bytes counted) then ``steps`` (default ``calibration_steps``)
        timed full forward+backward+SGD steps of a ``deepcopy`` of the model with every parameter
        trainable, on a synthetic batch of ``batch_shape`` (the per-rank batch, ``(B, C, H, W)``)
        drawn from a private generator. The global RNG state is restored afterwards, the real
        model's weights, BN statistics and ``requires_grad`` are never touched. On CUDA the
        reference peak is the extra memory allocated during calibration (≈ an all-SGD step's
        params + grads + momentum + activations). Returns the ``calib_*`` keys it measured.
        """
        if not self.enabled:
            return {}
        steps = self.calibration_steps if steps is None else steps
        dev = self.device
        cuda_devs = [dev.index if dev.index is not None else torch.cuda.current_device()] \
            if dev.type == "cuda" else []
        ctx = autocast or contextlib.nullcontext
        times: list[float] = []
        t_start = time.perf_counter()
        with torch.random.fork_rng(devices=cuda_devs):
            if dev.type == "cuda":
                _sync(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            ref = copy.deepcopy(self.model)
            _strip_hooks(ref)
            ref.train()
            for p in ref.parameters():
                p.requires_grad_(True)
                p.grad = None
            # Throw-away optimizer; SGD with momentum, like the default trainer's, so the optimizer
            # step costs what it would.
            opt = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            gen = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(tuple(batch_shape), generator=gen, device=dev)
            y = torch.randint(num_classes, (int(batch_shape[0]),), generator=gen, device=dev)
            counter = ActivationCounter(ref.stages if hasattr(ref, "stages") else [ref])
            train_step(ref, None, opt, x, y, counter=counter, autocast=ctx)
            for _ in range(steps):
                _sync(dev)
                t0 = time.perf_counter()
                train_step(ref, None, opt, x, y, autocast=ctx)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            peak = None
            if dev.type == "cuda":
                peak = int(torch.cuda.max_memory_allocated(dev) - base)
            del ref, opt, x, y
        self._calib = {"step_time_s": _median(times), "activation_bytes": counter.total, "peak_bytes": peak}
        out = {"calib_step_time_s": self._calib["step_time_s"], "calib_activation_bytes": counter.total,
               "calib_peak_bytes": peak, "calib_s": time.perf_counter() - t_start}
        self._log(f"all-SGD reference calibrated on a model copy: step {out['calib_step_time_s']}s, "
                  f"activations {counter.total} B ({steps} steps)")
        return out

    # ------------------------------------------------------------------ run summary
    def summary(self, end_to_end_s: float | None = None) -> dict[str, Any]:
        """Run-level keys for ``summary.json``.

        * ``train_loop_s``: wall time of the epochs' step loops; ``steady_loop_s``: the same loops
          at each epoch's median sampled step time (one-off start-up costs left out);
        * ``total_steps``, ``step_time_ref_s``, ``activation_bytes_ref``, ``reference``
          (``warmup``, ``calibration`` or ``None``);
        * ``projected_sgd_s`` = reference step time × total steps (the same loop all-SGD, steady
          state) and ``projected_speedup`` = projected_sgd_s / steady_loop_s — steady state on
          both sides, so a short run's start-up does not bias it;
        * with ``end_to_end_s``: ``projected_sgd_end_to_end_s`` (this run with its steady loop
          swapped for the projection; start-up, evaluation, checkpoints unchanged) and
          ``projected_end_to_end_speedup``;
        * ``mean_speedup`` over the epochs, ``final_memory_reduction``.
        """
        if not self.enabled:
            return {}
        ref_step, ref_act, _ = self._reference()
        projected = ref_step * self._steps if ref_step is not None else None
        out: dict[str, Any] = {
            "train_loop_s": self._loop_s, "steady_loop_s": self._steady_s, "total_steps": self._steps,
            "step_time_ref_s": ref_step, "activation_bytes_ref": ref_act,
            "reference": "warmup" if self._ref_steps else ("calibration" if self._calib else None),
            "projected_sgd_s": projected, "projected_speedup": _ratio(projected, self._steady_s),
            "mean_speedup": statistics.fmean(self._speedups) if self._speedups else None,
            "final_memory_reduction": self._last_reduction,
        }
        if end_to_end_s is not None:
            out["end_to_end_s"] = end_to_end_s
            if projected is not None:
                sgd_e2e = end_to_end_s - self._steady_s + projected
                out["projected_sgd_end_to_end_s"] = sgd_e2e
                out["projected_end_to_end_speedup"] = _ratio(sgd_e2e, end_to_end_s)
        return out

    def close(self) -> None:
        """Remove the optimizer hooks (end of training)."""
        for h in self._opt_handles:
            h.remove()
        self._opt_handles, self._watched = [], set()
