"""The training loop's state: where the loop is, and the RNG and loss sums a checkpoint carries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distlocal.parallel.env import DistEnv, all_gather_floats


def rng_state() -> dict[str, Any]:
    # Plain values and tensors only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()),
                                                   *np_state[2:]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_sums(sums: list[float], env: DistEnv) -> list[list[float]]:
    """Every rank's ``[loss_sum, n_seen]`` of the epoch in progress, by rank (mid-epoch checkpoints).

    Each rank sums its own shard until the epoch-end all-reduce; a checkpoint that kept rank 0's
    alone would make every resumed rank start from rank 0's sums (the epoch's train loss wrong).
    """
    return all_gather_floats(sums, env)


def own_sums(saved: list, saved_world: int, env: DistEnv) -> list[float]:
    """This rank's share of the saved per-rank sums: its own on the same world size (exact);
    otherwise rank 0 carries the total and the others start at zero (the same epoch mean)."""
    if saved and not isinstance(saved[0], (list, tuple)):  # a checkpoint from before per-rank sums
        saved = [list(saved)]
    if saved_world == env.world_size and len(saved) == env.world_size:
        return list(saved[env.rank])
    total = [sum(s[0] for s in saved), sum(s[1] for s in saved)]
    return total if env.is_main else [0.0, 0.0]


@dataclass
class LoopState:
    """Where the loop is, under the checkpoint's own key names (see :meth:`Trainer.state_dict`).

    ``mid_epoch`` is set while an epoch is in progress: ``step_in_epoch`` of epoch ``epoch`` are
    done. A fresh run is "epoch -1 finished".
    """

    epoch: int = -1
    step_in_epoch: int = 0
    mid_epoch: bool = False
    global_step: int = 0
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0])  # loss_sum, n_seen of the epoch
    boundaries: list[int] = field(default_factory=list)  # the boundary of each epoch run
    best_acc: float = 0.0
    acc: float = 0.0

    @property
    def start_epoch(self) -> int:
        """The epoch to run next."""
        return self.epoch if self.mid_epoch else self.epoch + 1
