"""Deterministic random images with a learnable class pattern, for benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distlocal.config import DataConfig
from distlocal.data.common import DataBundle
from distlocal.errors import ConfigError

SYNTHETIC_SEED = 1234
SYNTHETIC_CACHE_BYTES = 256 * 2**20
"""A synthetic split at most this large is materialised once; larger ones are generated per item."""


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


def build_synthetic(cfg: DataConfig) -> DataBundle:
    """Synthetic train and test sets of ``data.shape``, ``data.num_classes`` and the sizes asked."""
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
