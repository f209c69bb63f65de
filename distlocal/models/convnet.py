"""``convnet`` / ``convnet_nobn``: a tiny 6-conv net, fast enough for tests and the default run."""

from __future__ import annotations

from torch import nn

from distlocal.models.common import can_pool, classifier, init_weights, pooled
from distlocal.models.staged import StagedModel

_WIDTHS = (32, 32, 64, 64, 128, 128)
_POOL_AFTER = (1, 3, 5)


def _build(in_shape: tuple[int, int, int], num_classes: int, batchnorm: bool) -> StagedModel:
    c, h, w = in_shape
    hw = (h, w)
    stages: list[nn.Module] = []
    names: list[str] = []
    for i, width in enumerate(_WIDTHS):
        # With BN the conv bias is redundant (BN's shift replaces it); without BN it is needed.
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        # Small inputs (e.g. 8x8 in tests) would pool down to nothing: skip the pool instead.
        if i in _POOL_AFTER and can_pool(hw):
            layers.append(nn.MaxPool2d(2))
            hw = pooled(hw)
        stages.append(nn.Sequential(*layers))
        names.append(f"conv{i + 1}")
        c = width
    stages.append(classifier(c, num_classes))
    names.append("classifier")
    model = StagedModel(stages, names)
    init_weights(model)
    return model


def convnet(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """6 conv-BN-ReLU stages (32,32,64,64,128,128, pool after 2, 4, 6) and a linear classifier."""
    return _build(in_shape, num_classes, batchnorm=True)


def convnet_nobn(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """``convnet`` without BatchNorm (biased convs): no batch statistics, so exact across ranks."""
    return _build(in_shape, num_classes, batchnorm=False)
