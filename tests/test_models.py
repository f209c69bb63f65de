"""The model registry: every model is a clean partition into stages that computes the right function."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from distlocal.errors import ConfigError
from distlocal.models import StagedModel, build_model, model_names

NUM_CLASSES = 7  # not 10, so a stray hard-coded CIFAR head would show
SHAPE = (3, 32, 32)
TV_MODELS = ["tv:resnet18", "tv:mobilenet_v2", "tv:vgg11"]
ALL_MODELS = model_names() + TV_MODELS


@functools.cache
def _built(name: str, in_shape: tuple[int, int, int] = SHAPE) -> StagedModel:
    # Cached: building tv:vgg11 (130M parameters) once per test would dominate the file's runtime.
    torch.manual_seed(0)
    return build_model(name, in_shape, NUM_CLASSES).eval()


def _input(in_shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    return torch.randn((2, *in_shape), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_stages_partition_parameters(name: str) -> None:
    model = _built(name)
    per_stage = [id(p) for stage in model.stages for p in stage.parameters()]
    assert len(per_stage) == len(set(per_stage)), "a parameter is in more than one stage"
    assert set(per_stage) == {id(p) for p in model.parameters()}
    assert len(model.stage_names) == model.num_stages
    assert model.stage_names[-1] == "classifier"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_stages_in_order_equal_forward(name: str) -> None:
    model, x = _built(name), _input()
    with torch.no_grad():
        full = model(x)
        h = x
        for stage in model.stages:
            h = stage(h)
        assert torch.equal(h, full)
        # Any boundary: prefix then suffix is the whole forward, which is what LoCal+SGD relies on.
        for k in range(1, model.num_stages):
            split = model.forward_range(model.forward_range(x, 0, k), k, model.num_stages)
            assert torch.allclose(split, full, atol=1e-6)
    assert full.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_classifier_stage_has_the_head(name: str) -> None:
    last = _built(name).stages[-1]
    linears = [m for m in last.modules() if isinstance(m, nn.Linear)]
    assert linears and linears[-1].out_features == NUM_CLASSES
    # The head is the classifier stage's alone: no earlier stage ends in a num_classes Linear.
    for stage in _built(name).stages[:-1]:
        assert not any(isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES for m in stage.modules())


@pytest.mark.parametrize("name", TV_MODELS)
def test_torchvision_model_matches_original(name: str) -> None:
    torch.manual_seed(0)  # same seed as _built: identical random weights
    ref = torchvision.models.get_model(name[3:], weights=None, num_classes=NUM_CLASSES).eval()
    staged, x = _built(name), _input()
    assert sum(p.numel() for p in staged.parameters()) == sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        assert torch.allclose(staged(x), ref(x), atol=1e-5)


def test_torchvision_resnet18_stages() -> None:
    names = _built("tv:resnet18").stage_names
    assert names == ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["classifier"]


def test_torchvision_builds_in_train_mode_without_touching_global_rng() -> None:
    torch.manual_seed(3)
    model = build_model("tv:resnet18", SHAPE, NUM_CLASSES)
    after_build = torch.rand(1)
    torch.manual_seed(3)
    torchvision.models.get_model("resnet18", weights=None, num_classes=NUM_CLASSES)
    assert torch.equal(torch.rand(1), after_build)  # the equality check drew from a private generator
    assert model.training


@pytest.mark.parametrize("name", model_names())
def test_one_channel_tiny_inputs(name: str) -> None:
    shape = (1, 8, 8)
    model = _built(name, shape)
    out = model(_input(shape))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_torchvision_one_channel() -> None:
    shape = (1, 32, 32)
    assert _built("tv:resnet18", shape)(_input(shape)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(
    ("name", "shape", "pools"),
    [
        ("vgg11", (3, 32, 32), 5),
        ("vgg11", (1, 8, 8), 3),
        ("convnet", (3, 32, 32), 3),
        ("convnet", (1, 4, 4), 2),
    ],
)
def test_pools_stop_at_one_pixel(name: str, shape: tuple[int, int, int], pools: int) -> None:
    model = _built(name, shape)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert model(_input(shape)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", ["convnet_nobn", "vgg11"])
def test_exact_models_have_no_batchnorm_or_dropout(name: str) -> None:
    for m in _built(name).modules():
        assert not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))


@pytest.mark.parametrize("name", ["convnet_nobn", "vgg11"])
def test_same_seed_same_weights(name: str) -> None:
    # Ranks build their replicas independently from one seed; they must start identical.
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        states.append(build_model(name, SHAPE, NUM_CLASSES).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_stage_counts() -> None:
    assert model_names() == sorted(model_names())
    counts = {name: _built(name).num_stages for name in model_names()}
    assert counts == {
        "convnet": 7, "convnet_nobn": 7, "mobilenetv2": 20, "resnet18": 10,
        "resnet34": 18, "resnet50": 18, "vgg11": 9, "vgg16_bn": 14, "vit_mini": 8, "vit_tiny": 11,
    }  # fmt: skip


def _one_line_error(name: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_model(name, SHAPE, NUM_CLASSES)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_model_names_valid_ones() -> None:
    message = _one_line_error("resnet99")
    assert "unknown model 'resnet99'" in message
    assert all(name in message for name in model_names())
    assert "tv:<torchvision model name>" in message


def test_unknown_torchvision_model() -> None:
    message = _one_line_error("tv:resnet99")
    assert "not a torchvision classification model" in message
    assert "torchvision.models.list_models(module=torchvision.models)" in message


@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet:FutureWarning")
def test_non_chain_torchvision_model_is_rejected() -> None:
    # googlenet's children include auxiliary heads its eval forward never calls.
    message = _one_line_error("tv:googlenet")
    assert "cannot be cut into stages generically" in message
    assert "convnet" in message
