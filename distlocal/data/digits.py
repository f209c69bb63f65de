"""scikit-learn's bundled copy of the UCI hand-written digits: the default data set, offline."""

from __future__ import annotations

import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from distlocal.data.common import DataBundle

DIGITS_SIZE = 32
"""Digits are upsampled from 8x8 so that CIFAR-style networks (stride-2 stages) apply unchanged."""
DIGITS_SPLIT_SEED = 0


def cache_dir() -> Path:
    """Where distlocal keeps derived, rebuildable files: ``$DISTLOCAL_CACHE``, else
    ``$XDG_CACHE_HOME/distlocal``, else ``~/.cache/distlocal``."""
    if os.environ.get("DISTLOCAL_CACHE"):
        return Path(os.environ["DISTLOCAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distlocal"


def _split_from_sklearn() -> dict[str, np.ndarray]:
    """The raw digits and their stratified 80/20 split, computed by scikit-learn."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn: no download
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    return {"images": digits.images.astype(np.float32), "labels": digits.target.astype(np.int64),
            "idx_train": idx_train.astype(np.int64), "idx_test": idx_test.astype(np.int64)}


def raw_digits(cache: Path | None = None) -> dict[str, np.ndarray]:
    """The raw digits (``images`` (N, 8, 8) float32, values 0..16; ``labels``) and the split's
    ``idx_train`` / ``idx_test``.

    Importing scikit-learn costs about a second per process, which every rank of every run pays;
    the arrays (about 250 kB) are therefore kept in ``cache`` (default :func:`cache_dir`), keyed by
    scikit-learn's version and the split seed. A missing, unreadable or unwritable cache only costs
    that second: the arrays are then computed again, never changed."""
    path = (cache or cache_dir()) / f"digits-sklearn{version('scikit-learn')}-split{DIGITS_SPLIT_SEED}.npz"
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("images", "labels", "idx_train", "idx_test")}
    except (OSError, KeyError, ValueError, EOFError):
        pass  # absent or damaged: rebuild it below
    arrays = _split_from_sklearn()
    tmp = None
    try:  # write a private file, then rename: ranks that build it at once never read half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:  # a read-only home or a full disk: no cache, same arrays
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return arrays


def build_digits() -> DataBundle:
    """The digits, 8x8 upsampled to 32x32 and normalised by the train split's statistics."""
    raw = raw_digits()
    images = torch.as_tensor(raw["images"], dtype=torch.float32)  # (N, 8, 8), values 0..16
    labels = torch.as_tensor(raw["labels"], dtype=torch.long)
    idx_train, idx_test = raw["idx_train"], raw["idx_test"]
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
