"""Data sets and (distributed) data loaders.

``build_datasets`` turns a :class:`~distlocal.config.DataConfig` into a :class:`DataBundle` (train and
test sets, the input shape and the class count); ``build_loaders`` wraps a bundle in the per-rank
loaders the trainer iterates.

Nothing here downloads unless ``data.download=true`` (CIFAR only): the default data set, ``digits``,
is scikit-learn's bundled copy of the UCI hand-written digits, so a fresh checkout trains offline.
``fashion_mnist`` reads the IDX files Debian's ``dataset-fashion-mnist`` package installs.

``data.val_fraction > 0`` holds out a seeded part of the train set as a validation set (``val``),
evaluated without augmentation: tuning is done on it, never on the test set.

Sampling (see :func:`build_loaders`): every run, one process or many, draws its training order
from one ``DistributedSampler`` whose permutation depends only on ``seed + epoch`` and the data set
length, so a 1-process run with batch ``W*B`` and a ``W``-rank run with per-rank batch ``B`` see the
same *set* of samples at every step.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.mnist import read_image_file, read_label_file

from distlocal.config import DataConfig
from distlocal.errors import ConfigError

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "fashion_mnist", "imagefolder", "synthetic")

# Per-channel statistics of the CIFAR training sets (pixel std, not the often-copied
# 0.2023/0.1994/0.2010, which is the std of per-image means).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixel statistics of the Fashion-MNIST training images (28x28, before padding).
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the files (the default ``data.root``)."""
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

DIGITS_SIZE = 32
"""Digits are upsampled from 8x8 so that CIFAR-style networks (stride-2 stages) apply unchanged."""
DIGITS_SPLIT_SEED = 0
SYNTHETIC_SEED = 1234
SYNTHETIC_CACHE_BYTES = 256 * 2**20
"""A synthetic split at most this large is materialised once; larger ones are generated per item."""


@dataclass
class DataBundle:
    """What a model and the trainer need to know about a data set."""

    train: Dataset
    test: Dataset
    in_shape: tuple[int, int, int]
    """(C, H, W) of one input sample as the model sees it."""
    num_classes: int
    val: Dataset | None = None
    """Held-out part of the train set (``data.val_fraction > 0``), never augmented."""
    train_plain: Dataset | None = None
    """The train samples without augmentation (same indices as ``train``); the validation split is
    taken from it. ``None``: the data set cannot hold out a validation split."""


# --------------------------------------------------------------------------------------------------
# Entry points


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Build the train and test sets named by ``cfg.name``.

    Raises :class:`ConfigError` (one line, says what to do) for an unknown name, a missing or
    malformed local copy, or an invalid synthetic shape.
    """
    name = str(cfg.name)
    if name == "digits":
        bundle = _build_digits()
    elif name in ("cifar10", "cifar100"):
        bundle = _build_cifar(name, cfg)
    elif name == "fashion_mnist":
        bundle = _build_fashion_mnist(cfg)
    elif name == "imagefolder":
        bundle = _build_imagefolder(cfg)
    elif name == "synthetic":
        bundle = _build_synthetic(cfg)
    else:
        raise ConfigError(f"unknown data set '{name}'; valid: {', '.join(DATASETS)}")
    return _hold_out_val(bundle, float(cfg.val_fraction), int(cfg.val_seed), name)


def _hold_out_val(bundle: DataBundle, fraction: float, seed: int, name: str) -> DataBundle:
    """Split ``fraction`` of the train samples off as ``bundle.val`` (a seeded permutation).

    The split depends on ``data.val_seed`` alone, not on ``trainer.seed``: runs with different
    seeds are tuned on the same held-out samples. The validation samples come from the
    un-augmented view of the train set, so validation accuracy is not blurred by random crops.
    """
    if fraction == 0.0:
        return bundle
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {fraction}")
    if bundle.train_plain is None:
        raise ConfigError(f"data set '{name}' has its own validation split; set data.val_fraction=0")
    n = len(bundle.train)  # type: ignore[arg-type]
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ConfigError(f"data.val_fraction={fraction} leaves no training sample of {n}; lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])
    return DataBundle(
        train=Subset(bundle.train, train_idx),
        test=bundle.test,
        in_shape=bundle.in_shape,
        num_classes=bundle.num_classes,
        val=Subset(bundle.train_plain, val_idx),
        train_plain=Subset(bundle.train_plain, train_idx),
    )


def build_loaders(
    bundle: DataBundle,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = True,
    *,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Per-rank train and test loaders, plus the train sampler (call ``set_epoch`` on it every epoch).

    ``batch_size`` is the per-rank batch. The train order always comes from
    ``DistributedSampler(num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)``
    -- also for ``world_size == 1`` -- so there is one code path and the order is a function of
    ``seed + epoch`` alone. ``drop_last`` applies to the train loader's last partial batch.

    What holds, for the same ``seed``, epoch and data set: at step ``k`` the union of the ``W`` ranks'
    batches (per-rank batch ``B``, ``drop_last=True``) is exactly the batch of a 1-process run with
    batch ``W*B`` -- the same sample set, in a different (interleaved) order -- and both runs take
    ``len(train) // (W*B)`` steps. Not equal: random augmentation draws (they come from each
    process's / worker's own RNG), and with ``drop_last=False`` the final partial batch.

    The test loader does not shuffle; with ``world_size > 1`` rank ``r`` evaluates samples
    ``r, r+W, r+2W, ...`` without padding, so every test sample is evaluated exactly once across ranks
    and all-reduced sums of correct / seen are exact. Ranks may then run a different number of test
    batches (by at most one): do not issue collectives per test batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}; set trainer.batch_size")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size}); check the launcher")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")

    n_train = len(bundle.train)  # type: ignore[arg-type]
    per_rank = n_train // world_size
    if drop_last and per_rank < batch_size:
        raise ConfigError(
            f"per-rank batch {batch_size} exceeds the {per_rank} training samples per rank "
            f"({n_train} over {world_size} ranks), so an epoch has no step; lower trainer.batch_size"
        )

    train_sampler: DistributedSampler = DistributedSampler(
        bundle.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    # The loader's generator only seeds worker processes (the sampler has its own): distinct per
    # rank so augmentation differs across ranks, yet reproducible run to run.
    generator = torch.Generator()
    generator.manual_seed(seed * 100_003 + rank)
    common: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        # Re-forking workers every epoch costs seconds on big data sets; the samplers live in the
        # main process, so set_epoch still takes effect with persistent workers.
        "persistent_workers": num_workers > 0,
    }
    train_loader = DataLoader(
        bundle.train,
        batch_size=batch_size,
        sampler=train_sampler,
        drop_last=drop_last,
        generator=generator,
        **common,
    )
    test_loader = build_eval_loader(
        bundle.test, batch_size, rank, world_size, num_workers, pin_memory=pin_memory)
    return train_loader, test_loader, train_sampler


def build_eval_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0, *,
    pin_memory: bool = False,
) -> DataLoader:
    """An evaluation loader (test or validation set): rank ``r`` takes samples ``r, r+W, ...``
    in order, without padding (:class:`ShardSampler`), so all-reduced sums count each sample once."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank=rank, world_size=world_size),  # type: ignore[arg-type]
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class ShardSampler(Sampler[int]):
    """In-order, non-padding shard of ``range(length)``: rank ``r`` gets ``r, r+W, r+2W, ...``.

    Unlike ``DistributedSampler(shuffle=False)`` it never repeats samples to even out the shards,
    so metrics summed over ranks count every sample exactly once.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length = length
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


# --------------------------------------------------------------------------------------------------
# digits


def _build_digits() -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn: no download
    images = torch.as_tensor(digits.images, dtype=torch.float32)  # (N, 8, 8), values 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)),
        test_size=0.2,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    # Resize once at build time and keep the tensors in memory: 1,797 images x 3 x 32 x 32 floats
    # is ~22 MB, and no per-item transform keeps loading free.
    x = F.interpolate(
        images.unsqueeze(1), size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False
    )
    x = (x / 16.0).repeat(1, 3, 1, 1)
    idx_train_t = torch.as_tensor(idx_train, dtype=torch.long)
    idx_test_t = torch.as_tensor(idx_test, dtype=torch.long)
    x_train, x_test = x[idx_train_t], x[idx_test_t]
    # Statistics of the train split only, so nothing about the test set leaks into the inputs.
    # The three channels are copies, so one scalar mean/std is the per-channel one.
    mean, std = x_train.mean(), x_train.std()
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    train = TensorDataset(x_train, labels[idx_train_t])
    return DataBundle(
        train=train,
        test=TensorDataset(x_test, labels[idx_test_t]),
        in_shape=(3, DIGITS_SIZE, DIGITS_SIZE),
        num_classes=10,
        train_plain=train,  # digits are never augmented
    )


# --------------------------------------------------------------------------------------------------
# CIFAR


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


def _resolve_root(cfg: DataConfig) -> Path:
    if cfg.root is None or str(cfg.root).strip() == "":
        raise ConfigError(f"data set '{cfg.name}' needs a local directory; set data.root=<path>")
    # Relative to where the user launched from, also if Hydra was told to chdir into the run dir.
    from hydra.utils import to_absolute_path

    return Path(to_absolute_path(os.path.expanduser(str(cfg.root)))).resolve()


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


def _build_cifar(name: str, cfg: DataConfig) -> DataBundle:
    layout = _CIFAR[name]
    root = _resolve_root(cfg)
    directory = root / layout.folder
    missing = [f for f in layout.files() if not (directory / f).is_file()]
    if missing and cfg.download:
        # torchvision fetches the official archive and verifies its md5; we then read the files.
        tv_cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            tv_cls(str(root), train=True, download=True)
        except Exception as exc:  # network or disk failure
            raise ConfigError(
                f"downloading {name} into '{root}' failed ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())}); place a local copy there and set data.download=false"
            ) from exc
        missing = [f for f in layout.files() if not (directory / f).is_file()]
    if missing:
        # Name the missing files only for a partial copy; "all of them" adds nothing.
        partial = f" (missing {', '.join(missing)})" if len(missing) < len(layout.files()) else ""
        raise ConfigError(
            f"{name} not found under '{root}': expected {layout.expected(root)}{partial};"
            " point data.root at a local copy or set data.download=true"
        )

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


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files, gzipped or raw)


class FashionMNIST(Dataset):
    """Images decoded once into one uint8 tensor ``(N, 1, 32, 32)`` (28x28 zero-padded by 2).

    ``__getitem__`` works on tensors only (no PIL): scale and normalise, then, with ``augment``,
    the standard random crop (padding 4) and horizontal flip, drawn from the process's torch RNG.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[index].float() / 255.0 - FASHION_MEAN) / FASHION_STD
        if self.augment:
            # Pad with the normalised value of a black pixel: the padding looks like background.
            x = F.pad(x, (4, 4, 4, 4), value=-FASHION_MEAN / FASHION_STD)
            i, j = torch.randint(0, 9, (2,)).tolist()
            x = x[:, i: i + 32, j: j + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.labels[index]


def _idx_path(root: Path, stem: str) -> Path | None:
    """``<stem>.gz`` if present, else the raw ``<stem>``; ``None`` when neither exists."""
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx(path: Path, images: bool) -> torch.Tensor:
    """One IDX file through torchvision's MNIST reader; a bad file is a ConfigError naming it."""
    reader = read_image_file if images else read_label_file
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        # torchvision's reader opens the path itself and does not decompress: inflate to a
        # temporary file first (never next to the data: /usr/share is read-only).
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            return reader(str(raw)).clone()  # the tensor shares the buffer of a file about to go
    except (AssertionError, RuntimeError, ValueError, TypeError, EOFError, OSError, IndexError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"Fashion-MNIST file '{path}' is truncated or corrupt ({detail[:120]}); "
            "reinstall it: apt-get install --reinstall dataset-fashion-mnist"
        ) from exc


def _build_fashion_mnist(cfg: DataConfig) -> DataBundle:
    root_cfg = cfg.root if cfg.root not in (None, "") else FASHION_ROOT
    root = _resolve_root(DataConfig(name=cfg.name, root=str(root_cfg)))
    paths = {k: _idx_path(root, stem) for k, stem in FASHION_FILES.items()}
    missing = [f"{FASHION_FILES[k]}[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise ConfigError(
            f"fashion_mnist not found under '{root}' (missing {', '.join(missing)}); "
            "install it with 'apt-get install dataset-fashion-mnist' (or 'make data'), or put the four "
            "upstream files from https://github.com/zalandoresearch/fashion-mnist there and set data.root"
        )
    tensors = {k: _read_idx(p, images=k.endswith("images")) for k, p in paths.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        x, y = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if x.shape[0] != y.shape[0] or tuple(x.shape[1:]) != (28, 28):
            raise ConfigError(
                f"Fashion-MNIST {split} files under '{root}' hold images {tuple(x.shape)} and "
                f"{y.shape[0]} labels; expected (N, 28, 28) and N labels; reinstall the data"
            )
        if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < 10:
            raise ConfigError(
                f"Fashion-MNIST {split} labels under '{root}' are outside [0, 10); reinstall the data")

    def padded(x: torch.Tensor) -> torch.Tensor:
        # 28 -> 32 so the CIFAR-style networks apply unchanged; kept uint8 (60,000 images: 61 MB).
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).contiguous()

    train_x, test_x = padded(tensors["train_images"]), padded(tensors["test_images"])
    train_y, test_y = tensors["train_labels"], tensors["test_labels"]
    return DataBundle(
        train=FashionMNIST(train_x, train_y, augment=bool(cfg.augment)),
        test=FashionMNIST(test_x, test_y, augment=False),
        in_shape=(1, 32, 32),
        num_classes=10,
        train_plain=FashionMNIST(train_x, train_y, augment=False),
    )


# --------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)


def _build_imagefolder(cfg: DataConfig) -> DataBundle:
    root = _resolve_root(cfg)
    layout = f"'{root}/train/<class>/<image>' and '{root}/val/<class>/<image>'"
    if not root.is_dir():
        raise ConfigError(
            f"imagefolder root '{root}' does not exist: expected {layout}; point data.root at it"
        )
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(
                f"imagefolder root '{root}' has no '{split}' directory: expected {layout}; fix data.root"
            )
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


# --------------------------------------------------------------------------------------------------
# synthetic


class SyntheticDataset(Dataset):
    """Deterministic random images with a learnable class pattern, for benchmarks.

    Sample ``i`` has label ``i % num_classes`` and input ``prototype[label] + noise_i``, where the
    prototype is a coarse (at most 8x8, upsampled) random pattern per class and ``noise_i`` is
    standard normal from a generator seeded from ``(seed, split, i)``. Values depend on the index alone,
    so the cached and the per-item paths give identical samples.
    """

    def __init__(
        self, length: int, shape: tuple[int, int, int], num_classes: int, split: int, seed: int
    ) -> None:
        if split not in (0, 1):
            raise ValueError(f"split must be 0 (train) or 1 (test), got {split}")
        self.length = length
        self.shape = shape
        self.num_classes = num_classes
        self.split = split
        self.seed = seed
        c, h, w = shape
        g = torch.Generator().manual_seed(self._stream_seed(0, 0))
        # Coarse prototypes keep memory O(classes * C * 64) even for 1000 classes at 224x224.
        self.prototypes = torch.randn(num_classes, c, min(h, 8), min(w, 8), generator=g)
        self._cache: torch.Tensor | None = None
        if length * math.prod(shape) * 4 <= SYNTHETIC_CACHE_BYTES:
            self._cache = torch.stack([self._make(i) for i in range(length)])

    def _stream_seed(self, stream: int, index: int) -> int:
        # The CPU generator (mt19937) keeps only the low 32 bits of a seed, so bit-packing
        # (seed, split, index) into 64 bits would make train and test samples identical. Streams
        # (0 prototypes, 1 train, 2 test) get disjoint 2**30-wide ranges of 32-bit seeds instead.
        if not 0 <= index < 2**30:
            raise ValueError(f"synthetic index {index} out of range")
        return (self.seed + stream * 2**30 + index) % 2**32

    def _make(self, index: int) -> torch.Tensor:
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self._stream_seed(1 + self.split, index))
        noise = torch.randn(self.shape, generator=g)
        pattern = F.interpolate(self.prototypes[label : label + 1], size=self.shape[1:], mode="nearest")[0]
        return pattern + noise

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        x = self._cache[index] if self._cache is not None else self._make(index)
        return x, index % self.num_classes


def _build_synthetic(cfg: DataConfig) -> DataBundle:
    shape = tuple(int(s) for s in cfg.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"data.shape must be [C, H, W] with positive sizes, got {list(cfg.shape)}")
    if cfg.num_classes < 1:
        raise ConfigError(f"data.num_classes must be >= 1, got {cfg.num_classes}")
    if not (1 <= cfg.train_size < 2**30 and 1 <= cfg.test_size < 2**30):
        raise ConfigError(
            "data.train_size and data.test_size must be in [1, 2**30),"
            f" got {cfg.train_size} and {cfg.test_size}"
        )
    in_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
    train = SyntheticDataset(
        int(cfg.train_size), in_shape, int(cfg.num_classes), split=0, seed=SYNTHETIC_SEED)
    return DataBundle(
        train=train,
        test=SyntheticDataset(
            int(cfg.test_size), in_shape, int(cfg.num_classes), split=1, seed=SYNTHETIC_SEED
        ),
        in_shape=in_shape,
        num_classes=int(cfg.num_classes),
        train_plain=train,  # no augmentation
    )
