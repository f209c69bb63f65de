"""Pieces shared by the CIFAR-style model builders: weight init, spatial bookkeeping, the head."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Torchvision-style init: kaiming-normal convs, unit/zero norms, small-normal linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def can_pool(hw: tuple[int, int]) -> bool:
    """Whether a 2x2/stride-2 max-pool still leaves at least one pixel on both axes."""
    return min(hw) >= 2


def pooled(hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size after MaxPool2d(2)."""
    return hw[0] // 2, hw[1] // 2


def classifier(in_features: int, num_classes: int) -> nn.Sequential:
    """The classifier stage every CIFAR-style model ends with: global pool, flatten, linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes))
