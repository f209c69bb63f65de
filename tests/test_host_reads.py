"""No host read of a device value in the steady state of the local learner's syncs.

With the accelerator code paths forced on CPU (:func:`distlocal.hostsync.force_accelerator_paths`),
N steady-state steps of the learner + DeltaSync + auto-freeze + weak supervision make no read
but the scheduled ones: one per ``local.auto_freeze.check_every`` syncs. Without the switch the
same loop reads (free on CPU), which shows that the counter sees them.
"""

from __future__ import annotations

import math

import pytest
import torch

from distlocal.hostsync import HostReadCounter, force_accelerator_paths
from distlocal.local.autofreeze import AutoFreeze
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.local.supervision import WeakSupervision
from distlocal.models import build_model
from distlocal.parallel.env import DistEnv
from distlocal.parallel.sync import DeltaSync

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
CHECK_EVERY = 3
LEVERS = {
    "plain": {}, "direct": dict(direct=True), "sync_every2": dict(sync_every=2),
    "update_every2": dict(update_every=2), "async_bf16": dict(sync_async=True, sync_dtype="bf16"),
    "fraction_chunk": dict(sample_fraction=0.5, chunk_size=2), "oja": dict(rule="oja"),
    "hebb_direct": dict(rule="hebb", direct=True), "freeze": dict(rule="freeze"),
}


def _parts(env, rule: str = "softhebb", direct: bool = False, sync_every: int = 1, update_every: int = 1,
           sync_async: bool = False, sync_dtype: str = "fp32", sample_fraction: float = 1.0,
           chunk_size: int = 0) -> tuple[DeltaSync, WeakSupervision]:
    torch.manual_seed(0)
    learner = LocalLearner(build_model("convnet", (3, 16, 16), 4), make_rule(rule), update_every,
                           sample_fraction, chunk_size, direct=direct)
    learner.set_boundary(2)
    # A threshold nothing reaches and a window never closed: the stages stay live and checked.
    learner.auto_freeze = AutoFreeze(threshold=0.0, window=10**9, check_every=CHECK_EVERY)
    ws = WeakSupervision(window=2)
    ws.reset_reference()
    return DeltaSync(learner, env, sync_every, sync_async, sync_dtype), ws


def _steps(sync: DeltaSync, ws: WeakSupervision, steps: range) -> int:
    """What a training step asks of the learner, the sync and weak supervision; returns the syncs."""
    syncs = 0
    for step in steps:
        sync.learner.lr = 0.01 * ws.multiplier
        sync.learner.prefix_forward(X, step)
        sync.launch(step, last=False)
        syncs += sync._due_now
        result = sync.step(torch.tensor(2.0 + 0.1 * step))  # the loss stays a tensor
        if result.skipped:
            ws.backoff()
        if result.mean_loss is not None:
            ws.update(result.mean_loss)
    return syncs


def _count(env, lever: dict, n: int = 12) -> tuple[HostReadCounter, int, DeltaSync]:
    sync, ws = _parts(env, **lever)
    with force_accelerator_paths():
        _steps(sync, ws, range(2))  # warm-up: the first report is read, the lag is in steady state
        with HostReadCounter() as counter:
            syncs = _steps(sync, ws, range(2, 2 + n))
    return counter, syncs, sync


@pytest.mark.parametrize("lever", LEVERS.values(), ids=LEVERS.keys())
def test_steady_state_syncs_read_only_at_the_auto_freeze_checks(lever: dict) -> None:
    counter, syncs, sync = _count(SINGLE, lever)
    learns = lever.get("rule") != "freeze"
    assert (syncs > 0) == learns  # freeze computes no delta: nothing to sync, nothing to check
    checks = math.ceil(syncs / CHECK_EVERY) if learns else 0
    assert counter.total <= checks, counter.where
    assert set(counter.counts) <= {"tolist"}, counter.where
    assert sync.learner.skipped_updates == 0


def test_two_rank_code_path_reads_only_at_the_checks(one_rank_group) -> None:
    """The distributed branch (all-reduce, average, bf16 copy) on a 1-rank gloo group."""
    for lever in (LEVERS["plain"], LEVERS["async_bf16"], LEVERS["sync_every2"]):
        counter, syncs, _ = _count(one_rank_group, lever)
        assert counter.total <= math.ceil(syncs / CHECK_EVERY), counter.where


def test_the_same_loop_reads_per_sync_where_reads_are_free() -> None:
    """The counter is not blind: on the CPU path every sync reads its report and its finite check."""
    sync, ws = _parts(SINGLE)
    with HostReadCounter() as counter:
        syncs = _steps(sync, ws, range(6))
    assert counter.total >= 2 * syncs


def test_a_skipped_sync_is_reported_one_sync_late_and_backs_off() -> None:
    sync, ws = _parts(SINGLE)
    learner = sync.learner
    w0 = [p.detach().clone() for p in learner.local_parameters()]
    with force_accelerator_paths():
        _steps(sync, ws, range(1))
        learner.prefix_forward(X, 1)
        sync.launch(1, last=False)
        w1 = [p.detach().clone() for p in learner.local_parameters()]
        first = sync.step(torch.tensor(float("nan")))  # this sync's update is skipped on the device
        assert not first.skipped and learner.skipped_updates == 0  # ... and reported at the next one
        assert all(torch.equal(a, b) for a, b in zip(w1, learner.local_parameters()))
        learner.prefix_forward(X, 2)
        sync.launch(2, last=False)
        second = sync.step(torch.tensor(1.0))
    assert second.skipped and second.mean_loss is None
    assert learner.skipped_updates == learner.skipped_in_a_row == 1
    assert any(not torch.equal(a, b) for a, b in zip(w0, learner.local_parameters()))


@pytest.mark.parametrize("direct", [False, True], ids=["buffer", "direct"])
def test_forced_paths_give_the_cpu_paths_weights_and_losses(direct: bool) -> None:
    """The device-side checks change when the host learns, not what is applied."""
    runs = []
    for forced in (False, True):
        sync, ws = _parts(SINGLE, direct=direct)
        losses = []
        with force_accelerator_paths() if forced else torch.no_grad():
            for step in range(5):
                sync.learner.prefix_forward(X, step)
                sync.launch(step, last=False)
                losses.append(sync.step(torch.tensor(1.0 + step)).mean_loss)
        runs.append(([p.detach().clone() for p in sync.learner.local_parameters()], losses))
    (w_cpu, l_cpu), (w_dev, l_dev) = runs
    assert all(torch.equal(a, b) for a, b in zip(w_cpu, w_dev))
    assert l_dev == [None, *l_cpu[:-1]]  # one sync late
