"""scikit-learn's bundled copy of the UCI hand-written digits: the default data set, offline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from distlocal.data.common import DataBundle

DIGITS_SIZE = 32
"""Digits are upsampled from 8x8 so that CIFAR-style networks (stride-2 stages) apply unchanged."""
DIGITS_SPLIT_SEED = 0


def build_digits() -> DataBundle:
    """The digits, 8x8 upsampled to 32x32 and normalised by the train split's statistics."""
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
