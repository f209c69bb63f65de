"""CIFAR-style VGG: one stage per conv (plus the max-pool that follows it), global-pool classifier."""

from __future__ import annotations

from torch import nn

from distlocal.models.common import can_pool, classifier, init_weights, pooled
from distlocal.models.staged import StagedModel

_CFG11: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
_CFG16: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip


def _build(
    cfg: list[int | str], in_shape: tuple[int, int, int], num_classes: int, batchnorm: bool
) -> StagedModel:
    c, h, w = in_shape
    hw = (h, w)
    stages: list[list[nn.Module]] = []
    for item in cfg:
        if item == "M":
            # Inputs smaller than 32x32 run out of pixels before the last pools: skip those.
            if can_pool(hw):
                stages[-1].append(nn.MaxPool2d(2))
                hw = pooled(hw)
            continue
        assert isinstance(item, int)
        layers: list[nn.Module] = [nn.Conv2d(c, item, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU(inplace=True))
        stages.append(layers)
        c = item
    modules: list[nn.Module] = [nn.Sequential(*layers) for layers in stages]
    modules.append(classifier(c, num_classes))
    names = [f"conv{i + 1}" for i in range(len(stages))] + ["classifier"]
    model = StagedModel(modules, names)
    init_weights(model)
    return model


def vgg11(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """VGG-11 without BatchNorm or dropout (8 conv stages): deterministic, for exact multi-rank tests."""
    return _build(_CFG11, in_shape, num_classes, batchnorm=False)


def vgg16_bn(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """VGG-16 with BatchNorm (13 conv-BN-ReLU stages)."""
    return _build(_CFG16, in_shape, num_classes, batchnorm=True)
