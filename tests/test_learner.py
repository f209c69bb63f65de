"""The boundary-split step: local prefix under no_grad with hooks, SGD suffix, optimizer hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distlocal.config import DDPEngineConfig, TrainerConfig
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.models import build_model
from distlocal.parallel.ddp import DDPEngine
from distlocal.parallel.env import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _setup(model_name: str = "convnet", rule: str = "softhebb", **kw):
    torch.manual_seed(0)
    model = build_model(model_name, (3, 16, 16), 10)
    learner = LocalLearner(model, make_rule(rule), **kw)
    engine = DDPEngine(model, ENV, TrainerConfig(lr=0.1), DDPEngineConfig())
    return model, learner, engine


def _step(model, learner, engine, x, y, step=0):
    h = learner.prefix_forward(x, step)
    loss = F.cross_entropy(engine.forward(h), y)
    engine.backward_step(loss)
    learner.add_loss(float(loss.detach()))
    learner.pack_stats()
    learner.apply()
    return loss


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_prefix_gets_no_grad_and_leaves_the_optimizer():
    model, learner, engine = _setup()
    x, y = _batch()
    _step(model, learner, engine, x, y)  # boundary 0: momentum state for every parameter
    assert len(engine.optimizer.state) == len(list(model.parameters()))
    k = 3
    newly = learner.set_boundary(k)
    engine.set_boundary(k, newly)
    _step(model, learner, engine, x, y, step=1)
    prefix = {id(p) for s in model.stages[:k] for p in s.parameters()}
    assert prefix and {id(p) for p in newly} == prefix
    for s in model.stages[:k]:
        for p in s.parameters():
            assert p.grad is None and not p.requires_grad
    assert not prefix & {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not prefix & {id(p) for p in engine.optimizer.state}
    for s in model.stages[k:]:
        assert all(p.grad is not None for p in s.parameters())


def test_saved_for_backward_holds_nothing_from_local_stages():
    model, learner, engine = _setup()
    x, y = _batch()
    current = {"stage": None}
    for i, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__("stage", i))
    packed: dict[int, int] = {}

    def pack(t):
        packed[current["stage"]] = packed.get(current["stage"], 0) + t.numel() * t.element_size()
        return t

    def measure():
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = learner.prefix_forward(x, 0)
            loss = F.cross_entropy(engine.forward(h), y)
        engine.backward_step(loss)
        return dict(packed)

    full = measure()
    assert all(full.get(i, 0) > 0 for i in range(model.num_stages))
    k = 4
    engine.set_boundary(k, learner.set_boundary(k))
    split = measure()
    assert all(split.get(i, 0) == 0 for i in range(k))
    assert sum(split.values()) < sum(full.values())


def test_hooks_compute_the_rule_on_each_layers_own_input_and_output():
    """One local step equals applying the rule layer by layer by hand (pre-update weights)."""
    model, learner, engine = _setup("convnet_nobn", rule="oja")
    k = 3
    engine.set_boundary(k, learner.set_boundary(k))
    x, _ = _batch()
    rule = make_rule("oja")
    convs = [m for s in model.stages[:k] for m in s.modules() if isinstance(m, nn.Conv2d)]
    io = []
    hooks = [
        c.register_forward_hook(lambda m, a, out: io.append((m, a[0].clone(), out.clone()))) for c in convs
    ]
    before = [c.weight.detach().clone() for c in convs]
    learner.lr = 0.01
    learner.prefix_forward(x, 0)
    for h in hooks:
        h.remove()
    expected = []
    for (m, xi, zi), w in zip(io, before):
        dw, db = rule.delta(m, xi, zi)
        expected.append(w + 0.01 * dw)
    learner.apply()
    for c, e in zip(convs, expected):
        torch.testing.assert_close(c.weight, e, rtol=1e-5, atol=1e-7)


def test_update_every_skips_the_rule_on_other_steps():
    model, learner, _ = _setup("convnet_nobn", update_every=2)
    learner.set_boundary(2)
    learner.lr = 0.01
    x, _ = _batch()
    learner.prefix_forward(x, step=1)
    assert float(learner.delta_part.abs().sum()) == 0.0
    learner.prefix_forward(x, step=2)
    assert float(learner.delta_part.abs().sum()) > 0.0


def test_sample_fraction_uses_the_leading_part_of_the_batch():
    x, _ = _batch(8)
    _, half, _ = _setup("convnet_nobn", sample_fraction=0.5)
    _, ref, _ = _setup("convnet_nobn")
    for learner in (half, ref):
        learner.set_boundary(1)
        learner.lr = 0.01
    half.prefix_forward(x, 0)
    ref.prefix_forward(x[:4], 0)
    torch.testing.assert_close(half.buffer, ref.buffer)


def test_freeze_rule_changes_no_weight_but_bn_statistics_keep_updating():
    model, learner, engine = _setup("convnet", rule="freeze")
    engine.set_boundary(2, learner.set_boundary(2))
    w = {n: p.detach().clone() for n, p in model.stages[:2].named_parameters()}
    bn = model.stages[0].modules().__next__()
    stats = [m.running_mean.clone() for m in model.stages[0].modules() if isinstance(m, nn.BatchNorm2d)]
    x, y = _batch()
    _step(model, learner, engine, x, y)
    for n, p in model.stages[:2].named_parameters():
        assert torch.equal(p, w[n]), n
    now = [m.running_mean for m in model.stages[0].modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn is not None and any(not torch.equal(a, b) for a, b in zip(stats, now))


def test_non_finite_delta_is_never_applied_and_counted():
    model, learner, engine = _setup("convnet_nobn")
    learner.set_boundary(2)
    learner.lr = 0.01
    x, _ = _batch()
    before = [p.detach().clone() for p in model.stages[:2].parameters()]
    learner.prefix_forward(x, 0)
    learner.buffer[0] = float("nan")
    learner.apply()
    assert learner.skipped_updates == 1
    for p, b in zip(model.stages[:2].parameters(), before):
        assert torch.equal(p, b)


def test_boundary_never_moves_back_nor_onto_the_classifier():
    model, learner, _ = _setup()
    learner.set_boundary(2)
    try:
        learner.set_boundary(1)
        raise AssertionError("moved back")
    except ValueError:
        pass
    try:
        learner.set_boundary(model.num_stages)
        raise AssertionError("classifier turned local")
    except ValueError:
        pass


def _local_weights_after_steps(rule: str, steps: int = 2, **kw) -> list[torch.Tensor]:
    model, learner, engine = _setup("convnet", rule=rule, **kw)
    engine.set_boundary(3, learner.set_boundary(3))
    learner.lr = 0.01
    torch.manual_seed(5)
    for step in range(steps):
        x, y = _batch(8)
        _step(model, learner, engine, x, y, step)
    return [p.detach().clone() for p in model.stages[:3].parameters()]


@pytest.mark.parametrize("rule", ["softhebb", "hebb"])
@pytest.mark.parametrize("kw", [dict(chunk_size=3), dict(chunk_bytes=1), dict(direct=True),
                                dict(direct=True, chunk_size=2)],
                         ids=["chunk3", "bytes1", "direct", "direct_chunk"])
def test_chunking_and_direct_application_give_the_same_weights(rule: str, kw: dict) -> None:
    """Bounded temporaries and the buffer-less direct mode change the memory, not the update."""
    ref = _local_weights_after_steps(rule)
    got = _local_weights_after_steps(rule, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_direct_learner_holds_no_delta_buffer_and_skips_a_non_finite_layer():
    model, learner, engine = _setup("convnet_nobn", direct=True)
    learner.set_boundary(2)
    assert learner.buffer.numel() == learner._n_stats + 2  # statistics and loss only
    learner.lr = 0.01
    before = [p.detach().clone() for p in model.stages[:2].parameters()]
    x, _ = _batch()
    x[0, 0, 0, 0] = float("nan")  # every layer's delta turns non-finite
    learner.prefix_forward(x, 0)
    learner.apply()
    assert learner.skipped_updates == 1
    for p, b in zip(model.stages[:2].parameters(), before):
        assert torch.equal(p, b)


def test_buffer_resumes_across_direct_and_buffered_layouts():
    _, direct, _ = _setup("convnet", direct=True)
    _, buffered, _ = _setup("convnet")
    for lr in (direct, buffered):
        lr.set_boundary(2)
    direct.buffer.copy_(torch.arange(direct.buffer.numel(), dtype=torch.float32))
    buffered.load_state_dict(direct.state_dict())
    n = direct.buffer.numel()
    assert torch.equal(buffered.buffer[-n:], direct.buffer)
    assert float(buffered.buffer[:-n].abs().sum()) == 0.0
    direct.load_state_dict(buffered.state_dict())  # zero pending delta: accepted
    buffered.buffer[0] = 1.0
    with pytest.raises(ValueError, match="same world size"):
        direct.load_state_dict(buffered.state_dict())


@pytest.mark.parametrize("override", ["local.sync_dtype=fp8", "local.chunk_bytes=-1", "local.chunk_size=-2"])
def test_bad_lever_values_are_one_config_error(override: str) -> None:
    from distlocal.config import compose
    from distlocal.errors import ConfigError
    from distlocal.trainer import validate

    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
        validate(compose([override]))
