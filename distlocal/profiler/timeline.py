"""One step's memory over time (``profiler.timeline=true``): the run's LoCal+SGD step and its
all-SGD reference step side by side, as ``memory_timeline.png`` and the raw data as
``memory_timeline.json`` in the run directory.

* Everywhere: the footprint step's own MemTracker (:mod:`distlocal.profiler.footprint`; the same pass that
  gives ``footprint_*``, so the curve's peak *is* ``footprint_bytes``) records the bytes of every
  category after each allocation and free, with the phase it happened in (forward, backward,
  optimizer, after it). Drawn as stacked areas, by the categories of :mod:`distlocal.profiler.breakdown`.
* On CUDA also the caching allocator's own trace (``torch.cuda.memory._record_memory_history``,
  read back with ``torch.cuda.memory._snapshot``): the bytes allocated after each ``alloc`` and
  ``free_completed`` event, every tensor included (the batch, the NCCL buffers), no categories.
  Drawn as a second row. A CPU run never calls these.

Which step: the footprint step (docs/profiling.md) of the first epoch with local stages and the
reference's measured step of that epoch (both are measured at that epoch). A run whose boundary never leaves 0
(``mode=sgd``) draws its first epoch's step alone: there, the run's step is the all-SGD step.
The files are written when training ends (:meth:`TimelineRecorder.write`), outside every epoch.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from distlocal.profiler.breakdown import SHOWN, split
from distlocal.profiler.footprint import CATEGORIES, _Tracker

PHASE_COLOURS = {"forward": "#f2f2f2", "backward": "#e0e8f4", "optimizer": "#f6ead8", "after": "#ffffff"}
CUDA_MAX_ENTRIES = 200_000
"""Allocator events kept (a ring buffer; one step of the models here stays far below)."""


class TimelineTracker(_Tracker):
    """The footprint's tracker that also keeps the bytes of each category after every change.

    ``samples`` holds, per change while the tracker is entered (and once on entering), ``phase``
    and the bytes of every MemTracker category on ``device``'s type; ``local_buffer`` is what is
    filed ``local`` on entering: the ``local=`` tensors of
    :func:`distlocal.profiler.footprint.track_footprint` (the delta buffer), registered before the step.
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.dev_type = torch.device(device).type
        self.samples: dict[str, list[Any]] = {"phase": [], **{c: [] for c in CATEGORIES.values()}}
        self.local_buffer = 0
        self._on = False

    def __enter__(self) -> TimelineTracker:
        out = super().__enter__()
        self._on = True
        self._sample()
        # Entering, nothing of the step exists yet: what is filed ``local`` is the registered buffer.
        self.local_buffer = self.samples["local"][0]
        return out

    def __exit__(self, *args: Any) -> None:
        self._on = False  # frees after the step (its batch, the graph) are not the step's
        super().__exit__(*args)

    def _update_snap(self, *args: Any, **kwargs: Any) -> None:
        super()._update_snap(*args, **kwargs)
        if self._on:
            self._sample()

    def _phase(self) -> str:
        """The step's phase, moving forward only: outside the backward hooks and the optimizer step,
        a change belongs to the last phase entered (the graph freed as the backward ends) or, once
        the optimizer is done, to ``after`` (the scheduler, the delta sync and its application)."""
        last = self.samples["phase"][-1] if self.samples["phase"] else "forward"
        if self._in_opt:
            return "optimizer"
        if self._mod_tracker.is_bw:
            return "backward"
        return "after" if last in ("optimizer", "after") else last

    def _sample(self) -> None:
        snap = next((s for d, s in self._curr_mem_snap.items() if d.type == self.dev_type), {})
        self.samples["phase"].append(self._phase())
        for ref, name in CATEGORIES.items():
            self.samples[name].append(int(snap.get(ref, 0)))


def _trace_bytes(trace: list[dict[str, Any]], start: int) -> list[int]:
    """Bytes allocated after each ``alloc`` / ``free_completed`` of an allocator trace, from ``start``."""
    out, now = [start], start
    for e in trace:
        if e.get("action") == "alloc":
            now += int(e["size"])
        elif e.get("action") == "free_completed":
            now -= int(e["size"])
        else:
            continue
        out.append(now)
    return out


@contextlib.contextmanager
def cuda_trace(device: torch.device, owned: bool = True) -> Iterator[dict[str, Any]]:
    """Record the CUDA allocator's events over the block; the yielded dict gets ``allocated``
    (bytes after each event, from the bytes allocated at the start) on exit.

    ``owned=False``: the history is already being recorded (``profiler.memory_snapshot``), so it is
    neither started, cleared nor stopped here; the events before the block are skipped by count.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    out: dict[str, Any] = {"allocated": []}
    torch.cuda.synchronize(device)
    start = int(torch.cuda.memory_allocated(device))
    skip = 0
    if owned:
        torch.cuda.memory._record_memory_history("all", context=None, max_entries=CUDA_MAX_ENTRIES,
                                                 clear_history=True)
    else:
        skip = len(torch.cuda.memory._snapshot(device)["device_traces"][index])
    try:
        yield out
        torch.cuda.synchronize(device)
        trace = torch.cuda.memory._snapshot(device)["device_traces"][index]
        out["allocated"] = _trace_bytes(trace[skip:], start)
    finally:
        if owned:
            torch.cuda.memory._record_memory_history(enabled=None)


def maybe_record(recorder: TimelineRecorder | None, which: str,
                 boundary: int) -> contextlib.AbstractContextManager[Any]:
    """``recorder.record(which, boundary)`` when there is a recorder that wants this step (it yields
    the tracker to measure with), else a context that yields ``None`` (``track_footprint``'s own)."""
    if recorder is None or not recorder.wanted(boundary):
        return contextlib.nullcontext(None)
    return recorder.record(which, boundary)


class TimelineRecorder:
    """The profiler's side of ``profiler.timeline``: which steps to record, recording them, the files.

    The profiler asks :meth:`wanted` at a footprint step, wraps that step and the reference's
    measured step in :meth:`record` (passing the yielded tracker to ``track_footprint``), and calls
    :meth:`write` at the end of training.
    """

    def __init__(self, device: torch.device | str, run_dir: Path, log: Callable[[str], None] = print,
                 cuda_owned: Callable[[], bool] = lambda: True) -> None:
        """``cuda_owned``: whether the CUDA history is free for this recorder (see :func:`cuda_trace`)."""
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.log = log
        self.cuda_owned = cuda_owned
        self.data: dict[str, Any] = {}  # "run", "reference": the recorded steps; "boundary"
        self._local_done = False

    @classmethod
    def maybe(cls, enabled: bool, device: torch.device, run_dir: Path | None, log: Callable[[str], None],
              cuda_owned: Callable[[], bool]) -> TimelineRecorder | None:
        """The recorder of ``profiler.timeline`` (``enabled``), on rank 0 only (it alone writes the run
        directory), or ``None``."""
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        return cls(device, run_dir, log, cuda_owned) if enabled and run_dir is not None and rank0 else None

    def wanted(self, boundary: int) -> bool:
        """Whether the run's footprint step of this epoch is recorded (see the module docstring)."""
        return not self._local_done and (boundary > 0 or "run" not in self.data)

    @contextlib.contextmanager
    def record(self, which: str, boundary: int) -> Iterator[TimelineTracker]:
        """Record one step as ``which`` (``"run"`` or ``"reference"``); yields the tracker to measure with."""
        tracker = TimelineTracker(self.device)
        cuda = cuda_trace(self.device, self.cuda_owned()) if self.device.type == "cuda" else None
        with cuda if cuda is not None else contextlib.nullcontext({}) as trace:
            yield tracker
        if which == "run":
            self._local_done = boundary > 0
            self.data["boundary"] = boundary
            if boundary == 0:
                self.data.pop("reference", None)  # the run's own step is the reference
        self.data[which] = {"samples": tracker.samples, "local_buffer": tracker.local_buffer,
                            "cuda_allocated": trace.get("allocated")}

    def write(self) -> list[Path]:
        """``memory_timeline.json`` and ``memory_timeline.png`` of what was recorded (nothing if no
        step was); returns the paths written."""
        if "run" not in self.data:
            return []
        js, png = self.run_dir / "memory_timeline.json", self.run_dir / "memory_timeline.png"
        js.write_text(json.dumps({"device": str(self.device), **self.data}) + "\n")
        draw(self.data, png)
        self.log(f"memory timeline of a step written to {png} (data: {js.name})")
        return [js, png]


def stacked(step: dict[str, Any]) -> dict[str, list[int]]:
    """The shown categories (:data:`distlocal.profiler.breakdown.SHOWN`) of each sample of a recorded step."""
    s = step["samples"]
    n = len(s["phase"])
    rows = [split({c: s[c][i] for c in CATEGORIES.values()}, step["local_buffer"]) for i in range(n)]
    return {k: [r[k] for r in rows] for k, _, _ in SHOWN}


def _phase_spans(phases: list[str]) -> list[tuple[str, int, int]]:
    """``(phase, first, last)`` of each run of equal phases."""
    spans: list[tuple[str, int, int]] = []
    for i, p in enumerate(phases):
        if spans and spans[-1][0] == p:
            spans[-1] = (p, spans[-1][1], i)
        else:
            spans.append((p, i, i))
    return spans


def _panel(ax: Any, step: dict[str, Any], title: str) -> None:
    """One step's stacked categories over its allocation events, phases shaded, peak marked."""
    cats = stacked(step)
    xs = list(range(len(step["samples"]["phase"])))
    for phase, a, b in _phase_spans(step["samples"]["phase"]):
        ax.axvspan(a - 0.5, b + 0.5, color=PHASE_COLOURS[phase], lw=0)
    ax.stackplot(xs, *[[v / 2**20 for v in cats[k]] for k, _, _ in SHOWN],
                 labels=[lbl for _, lbl, _ in SHOWN], colors=[c for _, _, c in SHOWN])
    totals = [sum(v) for v in zip(*cats.values())]
    peak = max(totals, default=0)
    ax.axhline(peak / 2**20, color="k", lw=0.8, ls="--")
    ax.set(title=f"{title}\npeak {peak / 2**20:.2f} MiB", xlabel="allocation / free event (MemTracker)")
    ax.grid(alpha=0.3, axis="y")


def draw(data: dict[str, Any], path: Path) -> None:
    """The PNG of :meth:`TimelineRecorder.write` from its recorded ``data``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    steps = [("run", f"LoCal+SGD step (boundary {data['boundary']}: stages [0, {data['boundary']}) local)")]
    if data["boundary"] == 0:
        steps = [("run", "all-SGD step (boundary 0: the run's own step is the reference)")]
    elif "reference" in data:
        steps.append(("reference", "all-SGD reference step (boundary-0 copy)"))
    cuda = any(data[w].get("cuda_allocated") for w, _ in steps)
    fig, axes = plt.subplots(2 if cuda else 1, len(steps), figsize=(6.0 * len(steps), 7.5 if cuda else 4.2),
                             squeeze=False, sharey="row")
    for j, (which, title) in enumerate(steps):
        _panel(axes[0][j], data[which], title)
        if cuda:
            alloc = data[which].get("cuda_allocated") or []
            axes[1][j].plot([v / 2**20 for v in alloc], color="k", lw=1)
            axes[1][j].set(title="CUDA caching allocator: bytes allocated (all tensors)",
                           xlabel="allocator event (alloc / free_completed)")
            axes[1][j].grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("MiB")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="center right", fontsize="small",
               title="shaded: forward, backward, optimizer", title_fontsize="x-small")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
