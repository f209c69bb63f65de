"""The engine interface: what the trainer asks of DDP or DeepSpeed, and nothing more.

An engine wraps only the SGD suffix ``stages[boundary:]`` (timm's rule: wrap only what trains)
and owns the optimizer step. When the boundary moves the engine is rebuilt over the new suffix,
which is what really removes the local prefix from the gradient all-reduce.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from distlocal.config import TrainerConfig
from distlocal.errors import ConfigError
from distlocal.models.staged import StagedModel
from distlocal.parallel.env import DistEnv


def build_optimizer(params: list[nn.Parameter], cfg: TrainerConfig) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov, weight decay) or AdamW over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown trainer.optimizer '{cfg.optimizer}'; valid: sgd, adamw")


def drop_from_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Remove ``params`` from every param group and free their state (momentum, Adam moments)."""
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in params:
        optimizer.state.pop(p, None)


class Engine(ABC):
    """Forward, backward and optimizer step of the SGD suffix on one rank."""

    name: str = "engine"

    def __init__(self, model: StagedModel, env: DistEnv, trainer_cfg: TrainerConfig) -> None:
        self.model = model
        self.env = env
        self.trainer_cfg = trainer_cfg
        self.boundary = 0
        self.rebuild_ms: list[float] = []  # every rebuild of the run, in order
        self.grad_allreduce_bytes = 0  # counted by the engine's communication hook
        self.grad_allreduce_steps = 0
        self._rebuilds_counted = 0  # rebuild_ms entries before the last reset_comm_stats

    def reset_comm_stats(self) -> None:
        """Start a new count for :meth:`comm_stats` (the trainer calls it at each epoch start)."""
        self.grad_allreduce_bytes = self.grad_allreduce_steps = 0
        self._rebuilds_counted = len(self.rebuild_ms)

    def comm_stats(self) -> dict[str, float]:
        """Since the last :meth:`reset_comm_stats`: the gradient all-reduce bytes per step and the
        milliseconds spent rebuilding the engine (the metrics row's ``grad_allreduce_bytes`` and
        ``rebuild_ms``)."""
        return {"rebuild_ms": sum(self.rebuild_ms[self._rebuilds_counted:]),
                "grad_allreduce_bytes": self.grad_allreduce_bytes / max(self.grad_allreduce_steps, 1)}

    def suffix_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the suffix ``stages[boundary:]``."""
        return [p for s in self.model.stages[self.boundary:] for p in s.parameters() if p.requires_grad]

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the suffix (the LR scheduler drives it)."""

    @abstractmethod
    def set_boundary(self, boundary: int, newly_local: list[nn.Parameter]) -> None:
        """Rebuild over ``stages[boundary:]``; ``newly_local`` leave the optimizer."""

    @abstractmethod
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Run the suffix on the prefix output ``h``."""

    @abstractmethod
    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward, gradient all-reduce and optimizer step for one batch."""

    def state_dict(self) -> dict:
        """Optimizer (and scaler) state for checkpoints."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
