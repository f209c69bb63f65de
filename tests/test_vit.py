"""Vision transformers: vit_tiny/vit_mini, the tv:vit_* adapter, local rules on token-wise Linears.

Durations, measured only on 2 cores at load average 10-20 (several times an idle run): the
in-process tests 129 s, 90 s of it tv:vit_b_16 at 224x224 (build, check, one local step); the two
``dist`` tests are 6 short vit_mini runs of 3 epochs x 3 steps on 16x16 inputs.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import WORKER, check_ok, run, torchrun
from test_resume import _assert_same_run
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from distlocal.config import DDPEngineConfig, TrainerConfig
from distlocal.errors import ConfigError
from distlocal.local.learner import LocalLearner, unruled_note, unruled_parameters
from distlocal.local.rules import make_rule
from distlocal.models import StagedModel, build_model
from distlocal.models.tv_vit import MHAAsLinears, resize_pos_embedding, stage_tv_vit
from distlocal.parallel.ddp import DDPEngine
from distlocal.parallel.env import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _local_step(model: StagedModel, boundary: int, x: torch.Tensor, y: torch.Tensor) -> LocalLearner:
    """One LoCal+SGD step (softhebb prefix ``[0, boundary)``, SGD suffix), direct as one process runs it."""
    learner = LocalLearner(model, make_rule("softhebb"), direct=True)
    learner.lr = 1e-2
    engine = DDPEngine(model, ENV, TrainerConfig(lr=0.1), DDPEngineConfig())
    engine.set_boundary(boundary, learner.set_boundary(boundary))
    loss = F.cross_entropy(engine.forward(learner.prefix_forward(x, 0)), y)
    engine.backward_step(loss)
    learner.apply()
    assert torch.isfinite(loss)
    return learner


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _check_local_prefix(model: StagedModel, before: dict[str, torch.Tensor], boundary: int) -> None:
    """Every Linear/Conv weight of the prefix moved by the rule; norms and unruled parameters did not."""
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    frozen = set(unruled_parameters(model, boundary))
    for i, stage in enumerate(model.stages[:boundary]):
        for name, mod in stage.named_modules():
            full = f"stages.{i}.{name}"
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                assert f"{full}.weight" in moved, full
            elif isinstance(mod, nn.LayerNorm):  # affine frozen in a local stage, as BN's is
                assert not {f"{full}.weight", f"{full}.bias"} & moved, full
    assert not frozen & moved
    assert all(p.grad is None for s in model.stages[:boundary] for p in s.parameters())


@pytest.mark.parametrize(("name", "stages"), [("vit_tiny", 11), ("vit_mini", 8)])
def test_vit_blocks_hold_only_linear_and_layernorm_weights(name: str, stages: int) -> None:
    model = build_model(name, (3, 32, 32), 10)
    assert model.num_stages == stages
    assert model.stage_names[0] == "stem" and model.stage_names[-1] == "classifier"
    for block in model.stages[1:-1]:
        owners = {type(m) for m in block.modules() if next(m.parameters(recurse=False), None) is not None}
        assert owners == {nn.Linear, nn.LayerNorm}
    # Fixed sin-cos positions and mean pooling: nothing in any stage escapes the rule.
    assert unruled_parameters(model, model.num_stages - 1) == []
    assert unruled_note(model) == ""


def test_local_vit_step_updates_every_linear_and_freezes_layernorm() -> None:
    torch.manual_seed(0)
    model = build_model("vit_mini", (1, 8, 8), 10)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    before = _snapshot(model)
    _local_step(model, 4, x, y)
    _check_local_prefix(model, before, 4)


def test_bad_patch_tiling_is_one_line() -> None:
    for name, shape in (("vit_tiny", (3, 30, 32)), ("tv:vit_b_16", (3, 224, 200))):
        with pytest.raises(ConfigError, match=r"patches, which do not tile inputs of") as info:
            build_model(name, shape, 10)
        assert "\n" not in str(info.value)


def test_mha_as_linears_is_the_same_attention() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(48, 3, batch_first=True).eval()
    nn.init.normal_(mha.in_proj_bias)  # torchvision zero-inits it: a swapped bias would not show
    nn.init.normal_(mha.out_proj.bias)
    x = torch.randn(2, 5, 48)
    lin = MHAAsLinears.from_mha(mha).eval()
    assert torch.allclose(lin(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        lin(x, x.clone(), x)


def test_unruled_parameters_names_attention_no_rule_reaches() -> None:
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.mha(x, x, x, need_weights=False)[0])

    model = StagedModel([Wrap(), nn.Sequential(nn.Flatten(1), nn.Linear(8, 3))], ["attn", "classifier"])
    names = unruled_parameters(model, 1)
    # out_proj is a Linear, but MHA's forward never calls it: no hook would ever fire.
    assert names == ["stages.0.mha.in_proj_weight", "stages.0.mha.in_proj_bias",
                     "stages.0.mha.out_proj.weight", "stages.0.mha.out_proj.bias"]
    assert unruled_note(model) == " | frozen when local, no rule reaches them: " + ", ".join(names)
    two = StagedModel([Wrap(), Wrap(), model.stages[1]], ["a", "b", "classifier"])
    assert unruled_note(two).endswith("stages.0.mha.out_proj.bias and 4 more")


def test_resize_pos_embedding_keeps_the_class_row_and_the_grid() -> None:
    pos = torch.randn(1, 1 + 4 * 4, 6)
    assert torch.allclose(resize_pos_embedding(pos, (4, 4), (4, 4)), pos, atol=1e-6)
    wide = resize_pos_embedding(pos, (4, 4), (4, 6))
    assert wide.shape == (1, 1 + 24, 6) and torch.equal(wide[:, 0], pos[:, 0])


def _small_tv_vit(image_size: int = 32) -> VisionTransformer:
    """torchvision's ViT class at a test size, with a random head (torchvision zero-inits it)."""
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                            mlp_dim=64, num_classes=7)
    nn.init.normal_(vit.heads.head.weight)
    return vit.eval()


def test_tv_vit_matches_torchvision_and_accepts_non_square_inputs() -> None:
    ref = _small_tv_vit()
    staged = stage_tv_vit(copy.deepcopy(ref), "tv:small", (3, 32, 32)).eval()
    assert staged.stage_names == ["stem", "encoder_layer_0", "encoder_layer_1", "classifier"]
    assert sum(p.numel() for p in staged.parameters()) == sum(p.numel() for p in ref.parameters())
    assert not any(isinstance(m, nn.MultiheadAttention) for m in staged.modules())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = staged(x)
        assert torch.allclose(out, ref(x), atol=1e-5)
        split = staged.forward_range(staged.forward_range(x, 0, 2), 2, staged.num_stages)
        assert torch.allclose(split, out, atol=1e-6)
    wide = stage_tv_vit(_small_tv_vit(), "tv:small", (1, 32, 48))
    assert wide.stages[0].pos_embedding.shape == (1, 1 + 4 * 6, 32)
    assert wide(torch.randn(2, 1, 32, 48)).shape == (2, 7)


def test_tv_vit_check_catches_a_wrong_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    real = MHAAsLinears.from_mha

    def dropped_out_proj(mha: nn.MultiheadAttention) -> MHAAsLinears:
        new = real(mha)
        nn.init.zeros_(new.proj.weight)
        return new

    monkeypatch.setattr(MHAAsLinears, "from_mha", staticmethod(dropped_out_proj))
    vit = _small_tv_vit()
    nn.init.zeros_(vit.heads.head.weight)  # as torchvision builds it: only the heads' input shows the fault
    with pytest.raises(ConfigError, match="differs from torchvision's"):
        stage_tv_vit(vit, "tv:small", (3, 32, 32))


def test_tv_vit_b_16_at_224_builds_and_takes_a_local_step() -> None:
    torch.manual_seed(0)
    model = build_model("tv:vit_b_16", (3, 224, 224), 10)
    assert model.stage_names == ["stem", *(f"encoder_layer_{i}" for i in range(12)), "classifier"]
    frozen = unruled_parameters(model, model.num_stages - 1)
    assert frozen == ["stages.0.class_token", "stages.0.pos_embedding"]
    # Every block local (only the head trains): one forward, every block's rule, one tiny backward.
    boundary = model.num_stages - 1
    before = _snapshot(model)
    _local_step(model, boundary, torch.randn(1, 3, 224, 224), torch.tensor([3]))
    _check_local_prefix(model, before, boundary)


# ---------------------------------------------------------------- trainer runs (subprocesses)
# Synthetic 3x16x16 (16 tokens): the smallest input that still makes attention mix several tokens.
RUN = ["data=synthetic", "data.shape=[3,16,16]", "data.train_size=256", "data.test_size=64",
       "model=vit_mini", "mode=local", "trainer.epochs=3", "trainer.batch_size=16",
       "trainer.max_steps_per_epoch=3", "trainer.deterministic=true", "schedule.warmup_epochs=1",
       "schedule.step=2", "wandb.mode=disabled", "trainer.progress=false", "local.lr=1e-2"]
TIMEOUT = 300  # per run, a hang guard: each takes ~10-20 s on 2 idle cores


def _weights(out):
    return torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    x = torch.cat([a[k].double().reshape(-1) for k in a])
    y = torch.cat([b[k].double().reshape(-1) for k in a])
    return float((x - y).norm() / x.norm())


@pytest.mark.dist
@pytest.mark.timeout(3 * TIMEOUT)
def test_local_vit_two_ranks_equal_one_process_ddp_and_deepspeed(tmp_path) -> None:
    """LayerNorm has no batch statistics and attention mixes tokens of one sample only, so, as for
    convnet_nobn, 2 ranks (half the batch each) compute the same step as 1 process: the deltas
    are means over samples x tokens and the gradients are all-reduced means. Only float32
    summation order differs, hence the same bound as test_distributed's (1e-5 of the model's norm)."""
    one, ddp, ds = tmp_path / "one", tmp_path / "ddp", tmp_path / "ds"
    check_ok(run([sys.executable, str(WORKER), str(one), *RUN], timeout=TIMEOUT))
    check_ok(torchrun([str(WORKER), str(ddp), *RUN], timeout=TIMEOUT))
    check_ok(torchrun([str(WORKER), str(ds), *RUN, "engine=deepspeed", "engine.zero_stage=1"],
                      timeout=TIMEOUT, DS_ACCELERATOR="cpu"))
    rows = [json.loads(line) for line in (ddp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["boundary"] for r in rows] == [0, 2, 4]
    # The footprint by category is logged, and nothing of a local block is saved for backward.
    assert {"footprint_activation_bytes", "footprint_local_bytes", "footprint_grad_bytes"} <= set(rows[-1])
    assert rows[-1]["activation_bytes_stage"][:4] == [0, 0, 0, 0]
    assert all(s > 0 for s in rows[-1]["activation_bytes_stage"][4:])
    w1 = _weights(one)
    assert _relative_gap(w1, _weights(ddp)) < 1e-5
    assert _relative_gap(w1, _weights(ds)) < 1e-5


@pytest.mark.dist
@pytest.mark.slow  # vit_tiny's 4M parameters: ~1 min of CPU; make test MARKS=slow runs it
@pytest.mark.timeout(2 * TIMEOUT)
def test_vit_tiny_on_digits_two_ranks_equal_one_process(tmp_path) -> None:
    """The registered ViT itself (9 blocks, width 192), local on digits (32x32: 64 tokens): 2 DDP
    ranks give the one process's weights within float32 summation order, as vit_mini above."""
    args = ["data=digits", "model=vit_tiny", "mode=local", "trainer.epochs=3", "trainer.batch_size=16",
            "trainer.max_steps_per_epoch=3", "trainer.deterministic=true", "schedule.warmup_epochs=1",
            "schedule.step=5", "wandb.mode=disabled", "trainer.progress=false", "profiler.enabled=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    check_ok(run([sys.executable, str(WORKER), str(one), *args], timeout=TIMEOUT))
    check_ok(torchrun([str(WORKER), str(two), *args], timeout=TIMEOUT))
    rows = [json.loads(line) for line in (two / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["boundary"] for r in rows] == [0, 5, 10]  # the stem and all 9 blocks local at the end
    assert _relative_gap(_weights(one), _weights(two)) < 1e-5


@pytest.mark.dist
@pytest.mark.timeout(3 * TIMEOUT)
def test_local_vit_resume_is_exact(tmp_path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*RUN, "resume=auto"]
    check_ok(run([sys.executable, str(WORKER), str(full), *args], timeout=TIMEOUT))
    check_ok(run([sys.executable, str(WORKER), str(cut), *args], timeout=TIMEOUT, EXIT_AFTER_EPOCH="1"))
    check_ok(run([sys.executable, str(WORKER), str(cut), *args], timeout=TIMEOUT))
    _assert_same_run(full, cut)
