"""The model registry: a name and the data shape in, a :class:`StagedModel` out."""

from __future__ import annotations

from collections.abc import Callable

from distlocal.errors import ConfigError
from distlocal.models.convnet import convnet, convnet_nobn
from distlocal.models.mobilenet import mobilenetv2
from distlocal.models.resnet import resnet18, resnet34, resnet50
from distlocal.models.staged import StagedModel
from distlocal.models.vgg import vgg11, vgg16_bn
from distlocal.models.vit import vit_mini, vit_tiny

__all__ = ["StagedModel", "build_model", "model_names"]

_TV_PREFIX = "tv:"

_REGISTRY: dict[str, Callable[[tuple[int, int, int], int], StagedModel]] = {
    "convnet": convnet,
    "convnet_nobn": convnet_nobn,
    "mobilenetv2": mobilenetv2,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg11": vgg11,
    "vgg16_bn": vgg16_bn,
    "vit_mini": vit_mini,
    "vit_tiny": vit_tiny,
}


def model_names() -> list[str]:
    """Sorted names of the registered models (``tv:<name>`` models are not listed)."""
    return sorted(_REGISTRY)


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """Build model ``name`` for inputs of shape ``(C, H, W)`` and ``num_classes`` outputs.

    ``name`` is a registered name or ``tv:<torchvision model name>``; anything else raises
    :class:`ConfigError`.
    """
    in_shape = (int(in_shape[0]), int(in_shape[1]), int(in_shape[2]))
    if name.startswith(_TV_PREFIX):
        # Imported late: torchvision's model zoo is only needed for tv: models.
        from distlocal.models.torchvision_adapter import build_torchvision_model

        return build_torchvision_model(name[len(_TV_PREFIX) :], in_shape, num_classes)
    if name not in _REGISTRY:
        valid = ", ".join(model_names())
        raise ConfigError(f"unknown model '{name}'; valid models: {valid}, or tv:<torchvision model name>")
    return _REGISTRY[name](in_shape, num_classes)
