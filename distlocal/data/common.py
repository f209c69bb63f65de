"""What every data-set family shares: the :class:`DataBundle`, the root lookup and the validation hold-out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from distlocal.config import DataConfig
from distlocal.errors import ConfigError


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


def resolve_root(cfg: DataConfig) -> Path:
    """``data.root`` as an absolute path; a missing or empty value is a :class:`ConfigError`."""
    if cfg.root is None or str(cfg.root).strip() == "":
        raise ConfigError(f"data set '{cfg.name}' needs a local directory; set data.root=<path>")
    # Relative to where the user launched from, also if Hydra was told to chdir into the run dir.
    from hydra.utils import to_absolute_path

    return Path(to_absolute_path(os.path.expanduser(str(cfg.root)))).resolve()


def hold_out_val(bundle: DataBundle, fraction: float, seed: int, name: str) -> DataBundle:
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
