"""Building the engine a config names. Apart from :mod:`distlocal.parallel.engine`, whose
interface both engines implement: the engines import the interface, this module imports the engines,
and nothing imports back (no import circle)."""

from __future__ import annotations

from distlocal.config import TrainerConfig
from distlocal.errors import ConfigError
from distlocal.models.staged import StagedModel
from distlocal.parallel.engine import Engine
from distlocal.parallel.env import DistEnv


def build_engine(cfg, model: StagedModel, env: DistEnv, trainer_cfg: TrainerConfig) -> Engine:
    """The engine named by ``engine=`` (``cfg`` is the ``engine`` config group)."""
    # Imported here: DDP runs need no deepspeed install.
    if cfg.name == "ddp":
        from distlocal.parallel.ddp import DDPEngine

        return DDPEngine(model, env, trainer_cfg, cfg)
    if cfg.name == "deepspeed":
        from distlocal.parallel.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, env, trainer_cfg, cfg)
    raise ConfigError(f"unknown engine '{cfg.name}'; valid: ddp, deepspeed")
