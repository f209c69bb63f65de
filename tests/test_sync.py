"""DeltaSync in-process: sync_every accumulation, the epoch-end flush, the loss slots, the skipped
signal, async ordering and bf16 bytes (the all-reduces on a 1-rank gloo group, see conftest)."""

from __future__ import annotations

import pytest
import torch

from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.models import build_model
from distlocal.parallel.env import DistEnv
from distlocal.parallel.sync import DeltaSync, SyncResult

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _learner(update_every: int = 1) -> LocalLearner:
    torch.manual_seed(0)
    learner = LocalLearner(build_model("convnet", (3, 16, 16), 4), make_rule("softhebb"), update_every)
    learner.set_boundary(2)
    learner.lr = 0.01
    return learner


def _prefix(learner: LocalLearner) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in learner.local_parameters()])


def _step(sync: DeltaSync, step: int, loss: float, last: bool = False) -> SyncResult:
    """What Trainer.train_step asks of the sync around one step's prefix forward and backward."""
    sync.learner.prefix_forward(X, step)
    sync.launch(step, last=last)
    return sync.step(loss)


def test_sync_every_accumulates_and_applies_once_per_period() -> None:
    learner = _learner()
    sync = DeltaSync(learner, SINGLE, sync_every=3)
    w0 = _prefix(learner)
    assert _step(sync, 0, 1.0) == SyncResult(None, False)
    assert _step(sync, 1, 2.0) == SyncResult(None, False)
    assert torch.equal(_prefix(learner), w0) and learner.pending_steps == 2
    assert _step(sync, 2, 3.0) == SyncResult(pytest.approx(2.0), False)  # the period's mean loss
    assert not torch.equal(_prefix(learner), w0) and learner.pending_steps == 0


def test_the_epochs_last_step_flushes_a_partial_period() -> None:
    learner = _learner()
    sync = DeltaSync(learner, SINGLE, sync_every=4)
    assert _step(sync, 0, 1.0).mean_loss is None
    assert _step(sync, 1, 2.0, last=True) == SyncResult(pytest.approx(1.5), False)
    assert not learner.delta_pending


def test_a_period_without_a_delta_sends_nothing_and_keeps_its_loss() -> None:
    learner = _learner(update_every=2)  # step 1 computes no delta
    sync = DeltaSync(learner, SINGLE, sync_every=1)
    assert _step(sync, 0, 1.0).mean_loss == pytest.approx(1.0)
    assert _step(sync, 1, 2.0) == SyncResult(None, False)
    assert _step(sync, 2, 4.0).mean_loss == pytest.approx(3.0)  # steps 1 and 2


def test_a_non_finite_update_is_skipped_and_signalled() -> None:
    learner = _learner()
    sync = DeltaSync(learner, SINGLE, sync_every=1)
    w0 = _prefix(learner)
    learner.prefix_forward(X, 0)
    learner.buffer[0] = float("nan")  # a diverged delta
    sync.launch(0, last=False)
    assert sync.step(1.0).skipped
    assert torch.equal(_prefix(learner), w0) and learner.skipped_updates == learner.skipped_in_a_row == 1
    assert _step(sync, 1, 1.0) == SyncResult(pytest.approx(1.0), False)
    assert learner.skipped_in_a_row == 0


def test_async_starts_at_launch_and_its_loss_counts_in_the_next_sync(one_rank_group, monkeypatch) -> None:
    learner = _learner()
    sync = DeltaSync(learner, one_rank_group, sync_every=1, sync_async=True)
    started: list[int] = []
    monkeypatch.setattr(sync, "start", lambda: (started.append(1), DeltaSync.start(sync)))
    learner.prefix_forward(X, 0)
    sync.launch(0, last=False)
    assert started == [1] and sync.calls == 1  # in flight before the suffix runs
    # The buffer is in flight during the step: its loss goes in after the sync, for the next one.
    assert sync.step(5.0) == SyncResult(None, False)
    assert _step(sync, 1, 7.0).mean_loss == pytest.approx(5.0)
    assert started == [1, 1] and sync.bytes_sent == 2 * learner.delta_bytes


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bytes_sent_and_bf16_rounding(one_rank_group, monkeypatch, dtype: str) -> None:
    learner = _learner()
    sync = DeltaSync(learner, one_rank_group, sync_every=1, sync_dtype=dtype)
    averaged: list[torch.Tensor] = []
    average = learner.average

    def spy(world_size: int, low: torch.Tensor | None = None) -> None:
        average(world_size, low)
        averaged.append(learner.delta_part.clone())

    monkeypatch.setattr(learner, "average", spy)
    _step(sync, 0, 1.0)
    n_delta, n = learner.delta_part.numel(), learner.buffer.numel()
    assert n_delta > 0 and len(averaged) == 1
    if dtype == "fp32":
        assert sync.bytes_sent == 4 * n
    else:  # the delta part as bf16, the BN statistics and loss slots as fp32
        assert sync.bytes_sent == 2 * n_delta + 4 * (n - n_delta)
        assert torch.equal(averaged[0], averaged[0].bfloat16().float())
        assert averaged[0].abs().sum() > 0


def test_learner_average_takes_the_low_precision_part_back_and_divides() -> None:
    learner = _learner()
    n_delta = learner.delta_part.numel()
    learner.buffer.copy_(torch.arange(learner.buffer.numel(), dtype=torch.float32))
    low = torch.full((n_delta,), 6.0, dtype=torch.bfloat16)
    learner.average(2, low)
    assert torch.equal(learner.buffer[:n_delta], torch.full((n_delta,), 3.0))
    assert torch.equal(learner.buffer[n_delta:],
                       torch.arange(n_delta, learner.buffer.numel(), dtype=torch.float32) / 2)
