"""An ImageFolder in the ImageNet layout: ``<root>/train/<class>/<image>`` and ``<root>/val/...``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision import datasets
from torchvision import transforms as T

from distlocal.config import DataConfig
from distlocal.data.common import DataBundle, resolve_root
from distlocal.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _layout(root: Path) -> str:
    return f"'{root}/train/<class>/<image>' and '{root}/val/<class>/<image>'"


def locate_imagefolder(cfg: DataConfig) -> Path:
    """The root, with its ``train`` and ``val`` directories (nothing is listed); a
    :class:`ConfigError` saying what is missing otherwise."""
    root = resolve_root(cfg)
    layout = _layout(root)
    if not root.is_dir():
        raise ConfigError(
            f"imagefolder root '{root}' does not exist: expected {layout}; point data.root at it"
        )
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(
                f"imagefolder root '{root}' has no '{split}' directory: expected {layout}; fix data.root"
            )
    return root


def build_imagefolder(cfg: DataConfig) -> DataBundle:
    """The train and val folders under ``data.root``; val is labelled with the train class list."""
    root = locate_imagefolder(cfg)
    layout = _layout(root)
    size = int(cfg.image_size)
    if size < 1:
        raise ConfigError(f"data.image_size must be >= 1, got {size}")

    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    test_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *normalize])
    train_tf = (
        T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
        if cfg.augment
        else test_tf
    )
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(
            f"imagefolder train set unusable: {' '.join(str(exc).split())}; expected {layout}"
        ) from exc

    val_classes = sorted(e.name for e in os.scandir(root / "val") if e.is_dir())
    unknown = [c for c in val_classes if c not in train.class_to_idx]
    if unknown:
        raise ConfigError(
            f"imagefolder val has classes missing from train ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}); val classes must be a subset of train classes"
        )
    try:
        # The train mapping, not val's own: a val directory lacking a class would otherwise shift
        # every later label by one, silently.
        test = _ClassListImageFolder(str(root / "val"), train.classes, transform=test_tf)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(
            f"imagefolder val set unusable: {' '.join(str(exc).split())}; expected {layout}"
        ) from exc
    if len(test) == 0:
        raise ConfigError(f"imagefolder val set under '{root / 'val'}' has no images; expected {layout}")
    return DataBundle(train=train, test=test, in_shape=(3, size, size), num_classes=len(train.classes))


class _ClassListImageFolder(datasets.ImageFolder):
    """An ``ImageFolder`` that labels with a given class list instead of its directory's own."""

    def __init__(self, root: str, classes: list[str], transform: Callable[..., Any]) -> None:
        self._given_classes = list(classes)
        # allow_empty: a class with no val images is fine; an empty val set is caught by the caller.
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return list(self._given_classes), {c: i for i, c in enumerate(self._given_classes)}
