"""The training clocks: wall, process CPU and (on CUDA) device time of the training loop.

Every clock runs only while the loop trains: :meth:`TrainClocks.pause` stops it before an
evaluation and :meth:`TrainClocks.resume` starts it again, so evaluation time is in none of them.

* **wall** (``time.perf_counter``): what ``epoch_time_s`` always measured; it stretches with the
  machine's load.
* **CPU** (``time.process_time``): the CPU time of this rank's process, every thread of it (torch's
  intra-op threads, the gloo/DDP communication threads), user + system. It does *not* include
  DataLoader worker processes (``data.num_workers > 0``): their decoding work is another process's.
  Time a rank spends blocked (waiting for a slower rank, for a page fault, for the scheduler to
  give it a core) is not CPU time, which is why other processes on the machine barely move it.
* **device** (CUDA events): the summed event time of the training steps, one event pair per step,
  read only where the host synchronises anyway (an evaluation, the epoch end), never per step.

Across ranks: CPU time is summed (the compute a run costs) and its max reported too; device time
takes the max (the slowest rank's steps); wall time is rank 0's, as ``epoch_time_s`` always was (the
ranks' loops start apart: a rank that waits in the first collective while rank 0 still sets up
would count that wait).
Cumulative values survive a resume: a checkpoint carries the reduced totals (:meth:`state_dict`),
and the restored run adds this process's own time to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from distlocal.parallel.env import DistEnv, all_gather_floats

# The per-rank values gathered at a reading, in this order.
_FIELDS = ("epoch_wall", "epoch_cpu", "epoch_device", "total_wall", "total_cpu", "total_device")


class TrainClocks:
    """One rank's training clocks (see the module doc); ``cpu``/``wall`` are replaceable for tests."""

    def __init__(self, device: torch.device | str, cpu: Callable[[], float] = time.process_time,
                 wall: Callable[[], float] = time.perf_counter) -> None:
        self._cpu, self._wall = cpu, wall
        self.device = torch.device(device)
        self._events = self.device.type == "cuda"
        self._base = {"wall": 0.0, "cpu": 0.0, "cpu_max": 0.0, "device": 0.0}  # restored from a checkpoint
        self._own = {"wall": 0.0, "cpu": 0.0, "device": 0.0}  # this process's time, before the epoch
        self._epoch = {"wall": 0.0, "cpu": 0.0, "device": 0.0}  # this process's time in the epoch
        self._t0: tuple[float, float] | None = None  # (wall, cpu) where the running segment began
        self._pending: list[tuple[Any, Any]] = []  # CUDA event pairs of steps not yet read
        self._step_start: Any = None

    @property
    def has_device(self) -> bool:
        """Whether a device clock runs (CUDA)."""
        return self._events

    # ------------------------------------------------------------------ running
    def start_epoch(self) -> None:
        """Zero the epoch's time and start the clock (the epoch's first training step is next)."""
        self._epoch = {"wall": 0.0, "cpu": 0.0, "device": 0.0}
        self.resume()

    def resume(self) -> None:
        """Start (again) counting training time."""
        self._t0 = (self._wall(), self._cpu())

    def pause(self) -> float:
        """Stop counting (before an evaluation, at the epoch end); returns the epoch's wall time so far."""
        if self._t0 is not None:
            w0, c0 = self._t0
            self._epoch["wall"] += self._wall() - w0
            self._epoch["cpu"] += self._cpu() - c0
            self._t0 = None
        return self._epoch["wall"]

    def step_begin(self) -> None:
        """Record a CUDA event before a step (no-op off CUDA)."""
        if self._events:
            self._step_start = torch.cuda.Event(enable_timing=True)
            self._step_start.record()

    def step_end(self) -> None:
        """Record a CUDA event after a step; the pair is read later (no synchronisation here)."""
        if self._events and self._step_start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._step_start, end))
            self._step_start = None

    def _drain(self) -> None:
        """Add the recorded steps' event time to the epoch's device time (synchronises on the last)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self._epoch["device"] += sum(a.elapsed_time(b) for a, b in self._pending) / 1e3
            self._pending = []

    def end_epoch(self) -> None:
        """Fold the (paused) epoch into this process's totals; call after the epoch's last reading."""
        self._drain()
        for k in self._own:
            self._own[k] += self._epoch[k]
        self._epoch = {"wall": 0.0, "cpu": 0.0, "device": 0.0}

    # ------------------------------------------------------------------ readings
    def read(self, env: DistEnv) -> dict[str, float | None]:
        """The clocks reduced across ranks (a collective: every rank calls it).

        ``epoch_*``: the epoch so far; ``train_*``: the run so far (restored totals included).
        Device keys are ``None`` off CUDA.
        """
        self._drain()
        ep = dict(self._epoch)
        if self._t0 is not None:  # read while running (a mid-epoch checkpoint): the segment so far counts
            ep["wall"] += self._wall() - self._t0[0]
            ep["cpu"] += self._cpu() - self._t0[1]
        mine = [ep["wall"], ep["cpu"], ep["device"], self._own["wall"] + ep["wall"],
                self._own["cpu"] + ep["cpu"], self._own["device"] + ep["device"]]
        ranks = [dict(zip(_FIELDS, r)) for r in all_gather_floats(mine, env)]

        def mx(k: str) -> float:
            return max(r[k] for r in ranks)

        cpu = sum(r["total_cpu"] for r in ranks)
        dev = self._events
        return {
            "epoch_cpu_s": sum(r["epoch_cpu"] for r in ranks), "epoch_cpu_max_s": mx("epoch_cpu"),
            "epoch_device_s": mx("epoch_device") if dev else None,
            "train_wall_s": self._base["wall"] + ranks[0]["total_wall"],
            "train_cpu_s": self._base["cpu"] + cpu,
            "train_cpu_max_s": self._base["cpu_max"] + mx("total_cpu"),
            "train_device_s": self._base["device"] + mx("total_device") if dev else None,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, env: DistEnv) -> dict[str, float]:
        """The reduced totals so far (a collective), for the checkpoint: plain floats."""
        r = self.read(env)
        return {"wall": r["train_wall_s"], "cpu": r["train_cpu_s"], "cpu_max": r["train_cpu_max_s"],
                "device": r["train_device_s"] or 0.0}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a checkpoint's totals (on any world size): this process's time adds to them."""
        self._base = {k: float(state[k]) for k in self._base}
        self._own = {"wall": 0.0, "cpu": 0.0, "device": 0.0}
        self._epoch = {"wall": 0.0, "cpu": 0.0, "device": 0.0}
