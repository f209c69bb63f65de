"""CIFAR-10/100 from the python-pickle batches (``data.download=true`` lets torchvision fetch them)."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from distlocal.config import DataConfig
from distlocal.data.common import DataBundle, resolve_root
from distlocal.errors import ConfigError

# Per-channel statistics of the CIFAR training sets (pixel std, not the often-copied
# 0.2023/0.1994/0.2010, which is the std of per-image means).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def expected(self, root: Path) -> str:
        if self.folder == "cifar-10-batches-py":
            names = "data_batch_1..5,test_batch,batches.meta"
        else:
            names = ",".join((*self.train_files, *self.test_files, self.meta_file))
        return f"'{root / self.folder}/{{{names}}}'"


_CIFAR: dict[str, _CifarLayout] = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}


class CifarDataset(Dataset):
    """CIFAR-10/100 from the python-pickle batches, kept in memory as uint8 HWC.

    Reads the same files as ``torchvision.datasets.CIFAR10/100`` but checks their structure
    instead of their md5, so a local subset or a fixture in the same format loads too (torchvision
    0.29 refuses any file whose md5 differs from the official archive's).
    """

    def __init__(
        self,
        data: np.ndarray,
        targets: list[int],
        classes: list[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.data = data
        self.targets = targets
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # PIL, as torchvision's CIFAR does, so the standard PIL-based transforms apply unchanged.
        img: Any = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _load_pickle(path: Path) -> dict[str, Any]:
    # The CIFAR format is pickle, which can execute code: only point data.root at trusted files
    # (the same trust torchvision's reader asks for). latin1 reads the official Python-2 pickles.
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # any unpickling failure means "not a CIFAR batch"
        raise ConfigError(f"cannot read CIFAR file '{path}' ({type(exc).__name__}); replace it") from exc
    if not isinstance(entry, dict):
        raise ConfigError(f"CIFAR file '{path}' does not hold a dict; replace it with a CIFAR python batch")
    # Python-3-written batches have bytes keys (b'data'), the official ones str keys under latin1.
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in entry.items()}


def _read_cifar_split(
    directory: Path, files: Sequence[str], layout: _CifarLayout
) -> tuple[np.ndarray, list[int]]:
    chunks: list[np.ndarray] = []
    targets: list[int] = []
    for name in files:
        path = directory / name
        entry = _load_pickle(path)
        if "data" not in entry or layout.label_key not in entry:
            raise ConfigError(f"CIFAR file '{path}' lacks the 'data' or '{layout.label_key}' key; replace it")
        data = np.asarray(entry["data"])
        labels = [int(v) for v in entry[layout.label_key]]
        if (
            data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32
            or len(labels) != len(data)
        ):
            raise ConfigError(
                f"CIFAR file '{path}' holds data {data.dtype}{tuple(data.shape)} with {len(labels)} labels;"
                f" expected uint8 (N, 3072) with N labels; replace it"
            )
        if labels and not 0 <= min(labels) <= max(labels) < layout.num_classes:
            raise ConfigError(f"CIFAR file '{path}' has labels outside [0, {layout.num_classes}); replace it")
        chunks.append(data)
        targets.extend(labels)
    # Channel-planar rows (R 1024, G 1024, B 1024) -> HWC images for PIL.
    images = np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), targets


def _missing(layout: _CifarLayout, directory: Path) -> list[str]:
    return [f for f in layout.files() if not (directory / f).is_file()]


def locate_cifar(name: str, cfg: DataConfig) -> Path:
    """The CIFAR directory under ``data.root`` with every file present (nothing is read);
    a :class:`ConfigError` naming what is missing otherwise."""
    layout = _CIFAR[name]
    root = resolve_root(cfg)
    missing = _missing(layout, root / layout.folder)
    if missing:
        # Name the missing files only for a partial copy; "all of them" adds nothing.
        partial = f" (missing {', '.join(missing)})" if len(missing) < len(layout.files()) else ""
        raise ConfigError(
            f"{name} not found under '{root}': expected {layout.expected(root)}{partial};"
            " point data.root at a local copy or set data.download=true"
        )
    return root / layout.folder


def build_cifar(name: str, cfg: DataConfig) -> DataBundle:
    """CIFAR-10 or CIFAR-100 (``name``) from ``data.root``, downloaded there first if allowed."""
    layout = _CIFAR[name]
    root = resolve_root(cfg)
    directory = root / layout.folder
    if cfg.download and _missing(layout, directory):
        # torchvision fetches the official archive and verifies its md5; we then read the files.
        tv_cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            tv_cls(str(root), train=True, download=True)
        except Exception as exc:  # network or disk failure
            raise ConfigError(
                f"downloading {name} into '{root}' failed ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())}); place a local copy there and set data.download=false"
            ) from exc
    locate_cifar(name, cfg)

    meta = _load_pickle(directory / layout.meta_file)
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta.get(layout.names_key, [])]
    if len(classes) != layout.num_classes:
        raise ConfigError(
            f"CIFAR meta file '{directory / layout.meta_file}' lists {len(classes)} "
            f"'{layout.names_key}', expected {layout.num_classes}; replace it"
        )
    train_x, train_y = _read_cifar_split(directory, layout.train_files, layout)
    test_x, test_y = _read_cifar_split(directory, layout.test_files, layout)

    normalize = [T.ToTensor(), T.Normalize(layout.mean, layout.std)]
    test_tf = T.Compose(normalize)
    train_tf = (
        T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
        if cfg.augment
        else test_tf
    )
    return DataBundle(
        train=CifarDataset(train_x, train_y, classes, train_tf),
        test=CifarDataset(test_x, test_y, classes, test_tf),
        in_shape=(3, 32, 32),
        num_classes=layout.num_classes,
        train_plain=CifarDataset(train_x, train_y, classes, test_tf),
    )
