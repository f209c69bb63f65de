"""Averaging the local prefix's flat buffer across ranks: one coalesced all-reduce per sync."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from distlocal.errors import ConfigError
from distlocal.local.learner import LocalLearner, SyncResult
from distlocal.parallel.env import DistEnv

SYNC_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


__all__ = ["SYNC_DTYPES", "DeltaSync", "SyncResult", "average_buffers"]


class DeltaSync:
    """Every ``sync_every`` steps, average the learner's buffer across ranks and apply it.

    The buffer holds the accumulated ``lr * delta`` of every local layer, the running statistics
    of the prefix BatchNorm layers and the loss of the steps since the last sync; one all-reduce
    (a sum, then the learner divides by the world size) makes them identical on every rank, so the
    replicas stay equal without the prefix ever entering the gradient all-reduce. With
    ``sync_async`` the all-reduce is launched right after the prefix forward and awaited only
    before the deltas are applied, so it overlaps the suffix's forward and backward.

    A sync period in which no delta was computed (``local.update_every``) sends nothing: the prefix
    BN running statistics are averaged at the next sync instead, which is exact because their
    update is linear in the batch statistics (the average over ranks of k EMA steps is the EMA of
    the rank-averaged statistics), and at the epoch end by :func:`average_buffers`.

    ``sync_dtype="bf16"`` sends the delta part of the buffer as bfloat16 (half its bytes; BN
    statistics and the loss slots stay float32, in a second, small all-reduce). Every rank then
    applies the same bf16-rounded average, so the replicas stay identical to each other; they
    differ from an fp32 run by the rounding (docs/profiling.md gives the measured drift).

    What a sync reports to the host (:class:`SyncResult`: the rank-averaged loss weak supervision
    feeds on, and whether the update was skipped) is read without waiting for the device: on CPU at
    once, on an accelerator one sync late (the previous sync's report, copied into pinned memory
    while this period ran; :class:`distlocal.hostsync.LaggedRead`). Weak supervision and the
    divergence stop therefore act one sync later there; the unread report is in the checkpoint.

    A step calls :meth:`launch` after the prefix forward and :meth:`step` after the backward;
    ``timer(name)`` (the profiler's ``phase``) times the all-reduce and the apply as ``"sync"``.
    """

    def __init__(self, learner: LocalLearner, env: DistEnv, sync_every: int = 1,
                 sync_async: bool = False, sync_dtype: str = "fp32",
                 timer: Callable[[str], AbstractContextManager[None]] = (
                     lambda name: contextlib.nullcontext())):
        if sync_every < 1:
            raise ValueError("local.sync_every must be >= 1")
        if sync_dtype not in SYNC_DTYPES:
            raise ConfigError(f"unknown local.sync_dtype '{sync_dtype}'; valid: {', '.join(SYNC_DTYPES)}")
        self.sync_dtype = sync_dtype
        self.learner = learner
        self.env = env
        self.sync_every = sync_every
        self.sync_async = sync_async
        self.timer = timer
        self._due_now = False  # launch() decided that this step syncs
        self._works: list[dist.Work] = []
        self._low: torch.Tensor | None = None  # the bf16 copy of the delta part in flight
        self.bytes_sent = 0
        self.calls = 0
        self.seconds = 0.0

    def is_sync_step(self, step: int) -> bool:
        """Whether step ``step`` (0-based within the epoch) ends a sync period."""
        return (step + 1) % self.sync_every == 0

    def due(self, step: int, last: bool) -> bool:
        """Whether to sync after step ``step``: at the end of a sync period (or the epoch's ``last``
        step) in which a delta was computed; asked after the prefix forward."""
        return self.learner.has_local and self.learner.delta_pending and (self.is_sync_step(step) or last)

    def launch(self, step: int, last: bool) -> None:
        """After the prefix forward of step ``step``: decide whether this step syncs (a delta was
        computed in this period, see :meth:`due`); with ``sync_async`` start the all-reduce now, so
        it overlaps the suffix's forward and backward."""
        self._due_now = self.due(step, last)
        if self._due_now and self.sync_async:
            with self.timer("sync"):
                self.start()

    def step(self, loss: float | torch.Tensor) -> SyncResult:
        """After the backward: record the step's ``loss`` in the buffer and, if :meth:`launch` said
        so, finish the sync (start it first when not async) and apply the averaged update."""
        # The loss rides in the buffer's loss slots; an async all-reduce holds the buffer until
        # finish(), so its loss goes in afterwards and counts towards the next period.
        if not self.sync_async:
            self.learner.add_loss(loss)
        result = SyncResult(None, False)
        if self._due_now:
            with self.timer("sync"):
                if not self.sync_async:
                    self.start()
                report = self.finish()  # identical on every rank
            result = report if report is not None else result
            self._due_now = False
        if self.sync_async:
            self.learner.add_loss(loss)  # the buffer is free again
        return result

    def start(self) -> None:
        """Pack the BN statistics and launch the all-reduce (async or not)."""
        if not self.learner.has_local:
            return
        self.learner.pack_stats()
        if not self.env.distributed:
            return
        t0 = time.perf_counter()
        buf, delta = self.learner.buffer, self.learner.delta_part
        parts = [buf]
        if self.sync_dtype != "fp32" and delta.numel():
            self._low = delta.to(SYNC_DTYPES[self.sync_dtype])
            parts = [self._low, buf[delta.numel():]]
        for t in parts:
            work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=self.sync_async)
            if work is not None:
                self._works.append(work)
            self.bytes_sent += t.numel() * t.element_size()
        self.calls += 1
        self.seconds += time.perf_counter() - t0

    def finish(self) -> SyncResult | None:
        """Wait for the all-reduce, average and apply; returns the report the host can read now
        (:meth:`LocalLearner.apply`)."""
        if not self.learner.has_local:
            return None
        if self.env.distributed:
            t0 = time.perf_counter()
            for work in self._works:
                work.wait()
            self._works = []
            self.learner.average(self.env.world_size, self._low)
            self._low = None
            self.seconds += time.perf_counter() - t0
        return self.learner.apply()

    def reset_counters(self) -> None:
        """Start a new epoch's byte and time counts."""
        self.bytes_sent, self.calls, self.seconds = 0, 0, 0.0


def average_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Average every floating-point buffer (BatchNorm running statistics) across ranks.

    Called at epoch end, before evaluation: DDP's ``broadcast_buffers`` copies rank 0's suffix
    statistics at the start of each forward, but every rank then updates them with its own shard,
    so without this the replicas (and their test accuracy) drift apart. One coalesced all-reduce.
    """
    if not env.distributed:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(env.world_size)
    off = 0
    for b in bufs:
        b.copy_(flat[off: off + b.numel()].view_as(b))
        off += b.numel()
