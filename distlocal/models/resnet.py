"""CIFAR ResNets (3x3 stride-1 stem, no max-pool): one stage per residual block."""

from __future__ import annotations

import torch
from torch import nn

from distlocal.models.common import classifier, init_weights
from distlocal.models.staged import StagedModel


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity when shapes match, else the 1x1-conv + BN projection (ResNet option B)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: the block input is the previous stage's output and must stay intact.
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand by 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _build(
    block: type[BasicBlock] | type[Bottleneck],
    depths: tuple[int, int, int, int],
    in_shape: tuple[int, int, int],
    num_classes: int,
) -> StagedModel:
    stem = nn.Sequential(
        nn.Conv2d(in_shape[0], 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
    )
    stages: list[nn.Module] = [stem]
    names = ["stem"]
    in_ch = 64
    for layer, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
        for i in range(depth):
            stride = 2 if layer > 0 and i == 0 else 1
            stages.append(block(in_ch, planes, stride))
            names.append(f"layer{layer + 1}.{i}")
            in_ch = planes * block.expansion
    stages.append(classifier(in_ch, num_classes))
    names.append("classifier")
    model = StagedModel(stages, names)
    init_weights(model)
    return model


def resnet18(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """CIFAR ResNet-18: stem, 8 BasicBlock stages, classifier."""
    return _build(BasicBlock, (2, 2, 2, 2), in_shape, num_classes)


def resnet34(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """CIFAR ResNet-34: stem, 16 BasicBlock stages, classifier."""
    return _build(BasicBlock, (3, 4, 6, 3), in_shape, num_classes)


def resnet50(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """CIFAR ResNet-50: stem, 16 Bottleneck stages, classifier."""
    return _build(Bottleneck, (3, 4, 6, 3), in_shape, num_classes)
