"""DistributedDataParallel over the SGD suffix only (single process: no wrapper at all)."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from distlocal.config import DDPEngineConfig, TrainerConfig
from distlocal.models.staged import StagedModel
from distlocal.parallel.engine import Engine, build_optimizer, drop_from_optimizer
from distlocal.parallel.env import DistEnv


class DDPEngine(Engine):
    """Wraps ``stages[boundary:]`` in DDP and rebuilds the wrapper when the boundary moves.

    DDP fixes its parameter-to-bucket map at construction, so a rebuild is what removes the
    local prefix from the all-reduce; ``find_unused_parameters`` would only hide the error and
    still reduce every bucket.
    """

    name = "ddp"

    def __init__(self, model: StagedModel, env: DistEnv, trainer_cfg: TrainerConfig, cfg: DDPEngineConfig):
        super().__init__(model, env, trainer_cfg)
        self.cfg = cfg
        self._optimizer = build_optimizer(self.suffix_parameters(), trainer_cfg)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=trainer_cfg.precision == "16")
        self.wrapped: nn.Module = self._wrap()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def _wrap(self) -> nn.Module:
        suffix = nn.Sequential(*self.model.stages[self.boundary:])
        if not self.env.distributed:
            return suffix
        ddp = DistributedDataParallel(
            suffix,
            device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
        )

        # No annotations: DDP checks them, and `from __future__ import annotations` turns them
        # into strings it rejects.
        def counting_hook(state, bucket):  # noqa: ANN001
            # Count what DDP really sends, bucket by bucket, then reduce as DDP would.
            buf = bucket.buffer()
            self.grad_allreduce_bytes += buf.numel() * buf.element_size()
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting_hook)
        return ddp

    def set_boundary(self, boundary: int, newly_local: list[nn.Parameter]) -> None:
        if boundary == self.boundary:
            return
        t0 = time.perf_counter()
        drop_from_optimizer(self._optimizer, newly_local)
        self.boundary = boundary
        self.wrapped = self._wrap()
        self.rebuild_ms.append((time.perf_counter() - t0) * 1e3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.wrapped(h)

    def backward_step(self, loss: torch.Tensor) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.grad_allreduce_steps += 1
        self.scaler.step(self._optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"optimizer": self._optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

