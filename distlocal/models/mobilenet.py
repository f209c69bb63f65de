"""CIFAR MobileNetV2: stride-1 stem and second block group, one stage per inverted-residual block."""

from __future__ import annotations

import torch
from torch import nn

from distlocal.models.common import classifier, init_weights
from distlocal.models.staged import StagedModel

# (expansion t, out channels c, repeats n, first stride s). The ImageNet table has s=2 for the
# 24-channel group; CIFAR ports set it to 1 (and the stem stride to 1) so 32x32 ends at 4x4.
_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, linear 1x1 project; residual when the shape is unchanged."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def mobilenetv2(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """CIFAR MobileNetV2: stem, 17 inverted-residual stages, 1x1-conv-1280 stage, classifier."""
    stages: list[nn.Module] = [_conv_bn_relu6(in_shape[0], 32, 3)]
    names = ["stem"]
    in_ch = 32
    for t, c, n, s in _CFG:
        for i in range(n):
            stages.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
            names.append(f"block{len(names)}")
            in_ch = c
    stages.append(_conv_bn_relu6(in_ch, 1280, 1))
    names.append("conv_last")
    stages.append(classifier(1280, num_classes))
    names.append("classifier")
    model = StagedModel(stages, names)
    init_weights(model)
    return model
