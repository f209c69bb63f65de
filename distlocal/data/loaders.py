"""Per-rank loaders and samplers.

Every run, one process or many, draws its training order from one ``DistributedSampler`` whose
permutation depends only on ``seed + epoch`` and the data set length, so a 1-process run with batch
``W*B`` and a ``W``-rank run with per-rank batch ``B`` see the same *set* of samples at every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distlocal.data.common import DataBundle
from distlocal.errors import ConfigError


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
    n_train = len(bundle.train)  # type: ignore[arg-type]
    _check_loader_args(n_train, batch_size, rank, world_size, num_workers, drop_last)
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


def _check_loader_args(
    n_train: int, batch_size: int, rank: int, world_size: int, num_workers: int, drop_last: bool
) -> None:
    """One :class:`ConfigError` line for loader arguments no epoch can run with."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}; set trainer.batch_size")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size}); check the launcher")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")

    per_rank = n_train // world_size
    if drop_last and per_rank < batch_size:
        raise ConfigError(
            f"per-rank batch {batch_size} exceeds the {per_rank} training samples per rank "
            f"({n_train} over {world_size} ranks), so an epoch has no step; lower trainer.batch_size"
        )


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

