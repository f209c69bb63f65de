"""The DDP engine in-process on a 1-rank gloo group (conftest): the boundary leaves the optimizer
and the DDP buckets, the communication counters, the factory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distlocal.config import DDPEngineConfig, TrainerConfig
from distlocal.errors import ConfigError
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.models import build_model
from distlocal.parallel.build import build_engine
from distlocal.parallel.ddp import DDPEngine


def _engine(env) -> tuple[DDPEngine, LocalLearner]:
    torch.manual_seed(0)
    model = build_model("convnet", (3, 16, 16), 4)
    engine = build_engine(DDPEngineConfig(), model, env, TrainerConfig(lr=0.1))
    return engine, LocalLearner(model, make_rule("softhebb"))


def _step(engine: DDPEngine, learner: LocalLearner) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    engine.backward_step(F.cross_entropy(engine.forward(learner.prefix_forward(x, 0)), y))


def _suffix_bytes(engine: DDPEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.suffix_parameters())


def test_set_boundary_drops_the_prefix_from_optimizer_and_buckets(one_rank_group) -> None:
    engine, learner = _engine(one_rank_group)
    assert isinstance(engine, DDPEngine) and isinstance(engine.wrapped, DistributedDataParallel)
    newly = learner.set_boundary(2)
    engine.set_boundary(2, newly)
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert newly and not in_optimizer & {id(p) for p in newly}
    assert in_optimizer == {id(p) for p in engine.suffix_parameters()}
    assert len(engine.rebuild_ms) == 1
    _step(engine, learner)
    # The rebuilt wrapper reduces the suffix's gradients only (DDP may pad its buckets a little).
    sent = engine.comm_stats()["grad_allreduce_bytes"]
    assert _suffix_bytes(engine) <= sent <= _suffix_bytes(engine) + 1024
    assert all(p.grad is None for p in newly)


def test_comm_stats_count_since_the_last_reset(one_rank_group) -> None:
    engine, learner = _engine(one_rank_group)
    _step(engine, learner)
    _step(engine, learner)
    full = engine.comm_stats()
    assert full["rebuild_ms"] == 0.0
    assert full["grad_allreduce_bytes"] == engine.grad_allreduce_bytes / 2 > 0  # per step
    engine.reset_comm_stats()
    assert engine.comm_stats() == {"rebuild_ms": 0.0, "grad_allreduce_bytes": 0.0}
    engine.set_boundary(1, learner.set_boundary(1))
    _step(engine, learner)
    stats = engine.comm_stats()
    assert stats["rebuild_ms"] == engine.rebuild_ms[-1] > 0
    assert stats["grad_allreduce_bytes"] < full["grad_allreduce_bytes"]  # stage 0 left the all-reduce
    engine.reset_comm_stats()
    assert engine.comm_stats()["rebuild_ms"] == 0.0 and len(engine.rebuild_ms) == 1  # the history stays


def test_state_dict_round_trip_keeps_the_momentum(one_rank_group) -> None:
    engine, learner = _engine(one_rank_group)
    _step(engine, learner)
    other, _ = _engine(one_rank_group)
    other.load_state_dict(engine.state_dict())
    for p, q in zip(engine.suffix_parameters(), other.suffix_parameters()):
        mine, theirs = engine.optimizer.state[p], other.optimizer.state[q]
        assert torch.equal(mine["momentum_buffer"], theirs["momentum_buffer"])


def test_build_engine_names_the_valid_engines(one_rank_group) -> None:
    model = build_model("convnet", (3, 16, 16), 4)
    bad = DDPEngineConfig(name="horovod")
    with pytest.raises(ConfigError, match="unknown engine 'horovod'; valid: ddp, deepspeed"):
        build_engine(bad, model, one_rank_group, TrainerConfig())
