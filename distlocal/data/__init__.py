"""Data sets and (distributed) data loaders.

``build_datasets`` turns a :class:`~distlocal.config.DataConfig` into a :class:`DataBundle` (train and
test sets, the input shape and the class count); ``build_loaders`` wraps a bundle in the per-rank
loaders the trainer iterates.

Nothing here downloads unless ``data.download=true`` (CIFAR only): the default data set, ``digits``,
is scikit-learn's bundled copy of the UCI hand-written digits, so a fresh checkout trains offline.
``fashion_mnist`` reads the IDX files Debian's ``dataset-fashion-mnist`` package installs.

``data.val_fraction > 0`` holds out a seeded part of the train set as a validation set (``val``),
evaluated without augmentation: tuning is done on it, never on the test set.

Sampling (see :func:`build_loaders`, in :mod:`distlocal.data.loaders`): every run, one process or
many, draws its training order from one ``DistributedSampler`` whose permutation depends only on
``seed + epoch`` and the data set length, so a 1-process run with batch ``W*B`` and a ``W``-rank run
with per-rank batch ``B`` see the same *set* of samples at every step.

One module per data-set family (:mod:`~distlocal.data.digits`, :mod:`~distlocal.data.fashion`,
:mod:`~distlocal.data.cifar`, :mod:`~distlocal.data.imagefolder`, :mod:`~distlocal.data.synthetic`);
:mod:`~distlocal.data.common` holds the bundle, the root lookup and the hold-out.
"""

from __future__ import annotations

from distlocal.config import DataConfig
from distlocal.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CifarDataset,
    build_cifar,
    locate_cifar,
)
from distlocal.data.common import DataBundle, hold_out_val
from distlocal.data.corrupt import ON_CORRUPT, Checked, CorruptSample, count_skipped, guard
from distlocal.data.digits import DIGITS_SIZE, build_digits
from distlocal.data.fashion import (
    FASHION_FILES,
    FASHION_MEAN,
    FASHION_ROOT,
    FASHION_STD,
    FashionMNIST,
    build_fashion_mnist,
    locate_fashion_mnist,
)
from distlocal.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, build_imagefolder, locate_imagefolder
from distlocal.data.loaders import ShardSampler, build_eval_loader, build_loaders
from distlocal.data.synthetic import SyntheticDataset, build_synthetic
from distlocal.errors import ConfigError

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "fashion_mnist", "imagefolder", "synthetic")
READS_PER_SAMPLE: tuple[str, ...] = ("imagefolder",)
"""Data sets that open a file per sample, at run time: the ones ``data.on_corrupt`` guards. CIFAR and
Fashion-MNIST read their files whole when built, where a damaged file is one line naming it."""


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Build the train and test sets named by ``cfg.name``.

    Raises :class:`ConfigError` (one line, says what to do) for an unknown name, a missing or
    malformed local copy, or an invalid synthetic shape.
    """
    name = str(cfg.name)
    if name == "digits":
        bundle = build_digits()
    elif name in ("cifar10", "cifar100"):
        bundle = build_cifar(name, cfg)
    elif name == "fashion_mnist":
        bundle = build_fashion_mnist(cfg)
    elif name == "imagefolder":
        bundle = build_imagefolder(cfg)
    elif name == "synthetic":
        bundle = build_synthetic(cfg)
    else:
        raise ConfigError(f"unknown data set '{name}'; valid: {', '.join(DATASETS)}")
    bundle = hold_out_val(bundle, float(cfg.val_fraction), int(cfg.val_seed), name)
    if name not in READS_PER_SAMPLE:
        return bundle
    # After the hold-out: a substitute sample comes from the same split.
    policy = str(cfg.on_corrupt)
    return DataBundle(train=guard(bundle.train, policy), test=guard(bundle.test, policy),
                      in_shape=bundle.in_shape, num_classes=bundle.num_classes,
                      val=guard(bundle.val, policy), train_plain=guard(bundle.train_plain, policy))


def check_root(cfg: DataConfig) -> None:
    """Raise the builder's own :class:`ConfigError` when the data set's local files are not where
    ``data.root`` says. Cheap (no file is read or listed): the entry point runs it before any run
    directory is written."""
    name = str(cfg.name)
    if name == "imagefolder":
        locate_imagefolder(cfg)
    elif name in ("cifar10", "cifar100") and not cfg.download:
        locate_cifar(name, cfg)
    elif name == "fashion_mnist":
        locate_fashion_mnist(cfg)


__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DATASETS", "DIGITS_SIZE",
    "FASHION_FILES", "FASHION_MEAN", "FASHION_ROOT", "FASHION_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "CifarDataset", "DataBundle", "FashionMNIST", "ShardSampler", "SyntheticDataset",
    "build_datasets", "build_eval_loader", "build_loaders", "check_root",
    "ON_CORRUPT", "READS_PER_SAMPLE", "Checked", "CorruptSample", "count_skipped",
]
