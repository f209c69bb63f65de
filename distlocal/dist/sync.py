"""Averaging the local prefix's flat buffer across ranks: one coalesced all-reduce per sync."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from distlocal.dist.env import DistEnv
from distlocal.local.learner import LocalLearner


class DeltaSync:
    """Every ``sync_every`` steps, average the learner's buffer across ranks and apply it.

    The buffer holds the accumulated ``lr * delta`` of every local layer, the running statistics
    of the prefix BatchNorm layers and the loss of the steps since the last sync; one
    ``all_reduce(AVG)`` makes them identical on every rank, so the replicas stay equal without
    the prefix ever entering the gradient all-reduce. With ``sync_async`` the all-reduce is
    launched right after the prefix forward and awaited only before the deltas are applied, so
    it overlaps the suffix's forward and backward.
    """

    def __init__(self, learner: LocalLearner, env: DistEnv, sync_every: int = 1, sync_async: bool = False):
        if sync_every < 1:
            raise ValueError("local.sync_every must be >= 1")
        self.learner = learner
        self.env = env
        self.sync_every = sync_every
        self.sync_async = sync_async
        self._work: dist.Work | None = None
        self.bytes_sent = 0
        self.calls = 0
        self.seconds = 0.0

    def is_sync_step(self, step: int) -> bool:
        """Whether step ``step`` (0-based within the epoch) ends a sync period."""
        return (step + 1) % self.sync_every == 0

    def start(self) -> None:
        """Pack the BN statistics and launch the all-reduce (async or not)."""
        if not self.learner.has_local:
            return
        self.learner.pack_stats()
        if not self.env.distributed:
            return
        t0 = time.perf_counter()
        buf = self.learner.buffer
        self._work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=self.sync_async)
        self.bytes_sent += buf.numel() * buf.element_size()
        self.calls += 1
        self.seconds += time.perf_counter() - t0

    def finish(self) -> float | None:
        """Wait for the all-reduce, average and apply; returns the rank-averaged loss it carried."""
        if not self.learner.has_local:
            return None
        if self.env.distributed:
            t0 = time.perf_counter()
            if self._work is not None:
                self._work.wait()
                self._work = None
            # gloo has no AVG op: sum, then divide (the same on every rank, so still identical).
            self.learner.buffer.div_(self.env.world_size)
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
