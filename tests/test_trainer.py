"""The Trainer in-process: a 2-step fit on synthetic data, one step by hand, the state_dict round trip."""

from __future__ import annotations

import json

import pytest
import torch

from distlocal import checkpoint
from distlocal.config import compose
from distlocal.errors import ConfigError
from distlocal.parallel.env import DistEnv
from distlocal.trainer import Trainer

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["data=synthetic", "data.shape=[3,16,16]", "data.num_classes=4", "data.train_size=32",
        "data.test_size=8", "model=convnet", "mode=local", "trainer.epochs=1", "trainer.batch_size=8",
        "trainer.max_steps_per_epoch=2", "trainer.progress=false", "trainer.device=cpu",
        "wandb.mode=disabled", "profiler.enabled=false"]
# The checkpoint's keys as every checkpoint so far has written them: old checkpoints must still load.
CHECKPOINT_KEYS = {"model", "epoch", "step_in_epoch", "mid_epoch", "global_step", "epoch_sums", "boundary",
                   "boundaries", "learner", "engine", "scheduler", "weak_supervision", "schedule", "best_acc",
                   "acc", "world_size", "rng", "transition", "clocks", "tta"}


def _build(tmp_path, name: str, *extra: str) -> Trainer:
    return Trainer.build(compose([*TINY, *extra]), tmp_path / name, ENV)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_fit_two_steps_writes_one_row_and_the_summary(tmp_path) -> None:
    trainer = _build(tmp_path, "run")
    summary = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    assert trainer.loop.global_step == 2 and trainer.loop.epoch_sums[1] == 16  # two batches of 8
    assert summary["boundary_per_epoch"] == [trainer.learner.boundary] == [rows[0]["boundary"]]
    assert summary["final_test_acc"] == rows[0]["test_acc"]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_train_step_updates_prefix_locally_and_suffix_by_sgd(tmp_path) -> None:
    trainer = _build(tmp_path, "run")
    trainer.move_boundary(2)
    assert trainer.learner.boundary == trainer.engine.boundary == 2
    prefix, suffix = trainer.model.stages[:2], trainer.model.stages[2:]
    before_p, before_s = _params(prefix), _params(suffix)
    batches = iter(trainer.data.train)
    trainer.train_step(0, batches)
    assert trainer.loop.global_step == 1 and trainer.loop.epoch_sums[1] == 8
    # The prefix got no gradient: it moved by its local rule alone (synced and applied every step).
    assert all(p.grad is None for p in prefix.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_p, _params(prefix)))
    assert any(not torch.equal(a, b) for a, b in zip(before_s, _params(suffix)))


def test_move_boundary_never_moves_back(tmp_path) -> None:
    trainer = _build(tmp_path, "run")
    trainer.move_boundary(3)
    trainer.move_boundary(1)  # a target behind the boundary is no move
    assert trainer.learner.boundary == trainer.engine.boundary == 3


def test_state_dict_round_trip_continues_bit_exact(tmp_path) -> None:
    a = _build(tmp_path, "a", "local.sync_every=2")
    a.move_boundary(2)
    batches = iter(a.data.train)
    a.train_step(0, batches)  # mid sync period: the learner's buffer holds an unsynced delta
    a.loop.step_in_epoch, a.loop.mid_epoch, a.loop.epoch = 1, True, 0
    state = a.state_dict()
    assert set(state) == CHECKPOINT_KEYS
    assert state["boundary"] == 2 and state["epoch_sums"] == [[a.loop.epoch_sums[0], 8.0]]

    # Through the file, as a resume reads it (weights_only); it also unshares a's optimizer tensors.
    b = _build(tmp_path, "b", "local.sync_every=2")
    b.load_state_dict(checkpoint.load(checkpoint.save(tmp_path / "ckpt", state)))
    assert b.learner.boundary == b.engine.boundary == 2
    assert b.loop == a.loop and b.learner.pending_steps == a.learner.pending_steps == 1
    assert torch.equal(b.learner.buffer, a.learner.buffer)
    # The same next batch on both: the same sync, the same SGD step, the same weights to the bit.
    x, y = next(batches)
    for t in (a, b):
        t.train_step(1, iter([(x, y)]))
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(pa, pb)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()


def test_a_checkpoint_missing_keys_is_one_clear_error(tmp_path) -> None:
    trainer = _build(tmp_path, "run")
    trainer.loop.epoch = 0
    state = trainer.state_dict()
    del state["weak_supervision"], state["transition"]
    with pytest.raises(ConfigError, match="lacks weak_supervision, transition"):
        _build(tmp_path, "other").load_state_dict(state)


def test_rule_freeze_is_an_alias_of_mode_freeze_that_warns(tmp_path) -> None:
    """One spelling of the freezing baseline: ``local.rule=freeze`` under ``mode=local`` runs, and
    is recorded, as ``mode=freeze``."""
    with pytest.warns(UserWarning, match="spelled mode=freeze"):
        trainer = _build(tmp_path, "run", "local.rule=freeze")
    assert trainer.cfg.mode == "freeze" and trainer.learner.rule.name == "freeze"
    assert trainer.fit()["mode"] == "freeze"
