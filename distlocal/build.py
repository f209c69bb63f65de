"""Building a run's parts from its config: seeding, the data, the LR schedule and the parts a step
runs through (learner, delta sync, engine), as the trainer builds them. The bench
(``profiling/bench.py``) builds its steps with :func:`build_step_parts` too, so it times what a run
runs."""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from distlocal.data import build_datasets, build_eval_loader, build_loaders
from distlocal.local.autofreeze import AutoFreeze
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import SAFE_LOCAL_LR, make_rule
from distlocal.models import StagedModel
from distlocal.parallel.build import build_engine
from distlocal.parallel.env import DistEnv
from distlocal.parallel.sync import DeltaSync
from distlocal.step import StepParts


def seed_everything(seed: int, deterministic: bool) -> None:
    """Same seed on every rank, so every replica starts from identical weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def lr_lambda(cfg, steps_per_epoch: int):
    """Per-step LR multiplier: linear warm-up, then cosine, step or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.lr_warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** (step // max(1, cfg.lr_step_epochs * steps_per_epoch))
        return 1.0

    return f


def autocast(env: DistEnv, precision: str) -> AbstractContextManager[None]:
    """Mixed precision as ``trainer.precision`` says (a no-op in fp32)."""
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    return torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None)


def build_step_parts(cfg: DictConfig, model: StagedModel, env: DistEnv,
                     timer: Callable[[str], AbstractContextManager[None]] | None = None) -> StepParts:
    """The learner (``local.*``, the rule of ``mode``), its delta sync and the engine (``engine.*``,
    ``trainer.*``) over ``model`` at boundary 0, with the run's autocast; ``timer``: the profiler's
    ``phase`` for the sync. No LR scheduler (the trainer adds its own)."""
    lc, tc = cfg.local, cfg.trainer
    rule = make_rule("freeze" if cfg.mode == "freeze" else lc.rule, temperature=lc.temperature,
                     compiled=lc.compile)
    # One process syncing every step has nothing to average or accumulate: no delta buffer.
    learner = LocalLearner(model, rule, lc.update_every, lc.sample_fraction, lc.chunk_size,
                           lc.chunk_bytes, direct=env.world_size == 1 and lc.sync_every == 1)
    learner.auto_freeze = AutoFreeze.from_config(lc.auto_freeze)
    sync = DeltaSync(learner, env, lc.sync_every, lc.sync_async, lc.sync_dtype,
                     **({"timer": timer} if timer is not None else {}))
    engine = build_engine(cfg.engine, model, env, tc)
    return StepParts(learner, engine, sync, autocast=lambda: autocast(env, tc.precision))


@dataclass
class Data:
    """The loaders of a run and how many steps an epoch takes."""

    train: DataLoader
    test: DataLoader
    val: DataLoader | None  # data.val_fraction > 0: the held-out split tuning looks at
    sampler: Any
    steps_per_epoch: int
    in_shape: tuple[int, int, int]
    num_classes: int


def build_data(cfg: DictConfig, env: DistEnv) -> Data:
    """This rank's shard of the training set, the test set (and the validation split, if any)."""
    tc = cfg.trainer
    bundle = build_datasets(cfg.data)
    per_rank = tc.batch_size // env.world_size
    train_loader, test_loader, sampler = build_loaders(
        bundle, per_rank, env.rank, env.world_size, tc.seed, cfg.data.num_workers)
    val_loader = None if bundle.val is None else build_eval_loader(
        bundle.val, per_rank, env.rank, env.world_size, cfg.data.num_workers)
    steps = len(train_loader) if tc.max_steps_per_epoch is None else min(
        len(train_loader), tc.max_steps_per_epoch)
    return Data(train_loader, test_loader, val_loader, sampler, steps, bundle.in_shape, bundle.num_classes)


def warn_and_alias(cfg: DictConfig) -> None:
    """Warnings that do not stop a run. ``mode=freeze`` is the one spelling of the freezing
    baseline; ``mode=local local.rule=freeze`` is kept as an alias that warns and runs as
    ``mode=freeze`` (so tags, summary and config.yaml say ``freeze``). A ``local.lr`` above the
    measured safe range of its rule warns too."""
    if cfg.mode == "local" and cfg.local.rule == "freeze":
        warnings.warn("distlocal: local.rule=freeze is the layer-freezing baseline, spelled mode=freeze; "
                      "running as mode=freeze", stacklevel=3)
        cfg.mode = "freeze"
    limit = SAFE_LOCAL_LR.get(cfg.local.rule)
    if cfg.mode == "local" and limit is not None and cfg.local.lr > limit:
        warnings.warn(f"distlocal: local.lr={cfg.local.lr} is above the measured safe range for "
                      f"'{cfg.local.rule}' (<= {limit}); see docs/local-rules.md", stacklevel=2)
