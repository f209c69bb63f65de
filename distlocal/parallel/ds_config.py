"""Setting DeepSpeed up: its import with the right accelerator, the precision check, a 1-rank process
group for a plain ``python`` run, and the config dict composed from ``engine.*`` and ``trainer.*``.
:class:`distlocal.parallel.deepspeed.DeepSpeedEngine` builds its engines with them."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from distlocal.config import DeepSpeedEngineConfig, TrainerConfig
from distlocal.errors import ConfigError
from distlocal.parallel.env import DistEnv

LP_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
"""``trainer.precision`` -> the dtype DeepSpeed keeps the suffix in (fp32: none)."""


def import_deepspeed(device: torch.device) -> Any:
    """Import deepspeed with the accelerator matching ``device`` (it is chosen once, at first use)."""
    if device.type == "cpu":
        # DeepSpeed picks CUDA whenever it is installed; on CPU it must be told, before import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "engine=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'") from exc
    accel = get_accelerator().device_name()
    if accel != device.type:
        raise ConfigError(
            f"engine=deepspeed: DeepSpeed's accelerator is '{accel}' but trainer.device resolved to "
            f"'{device.type}'; set DS_ACCELERATOR={device.type} (CPU runs: DS_ACCELERATOR=cpu)")
    return deepspeed


def check_precision(lp_dtype: torch.dtype | None) -> None:
    """One clear error when the accelerator cannot run ``trainer.precision``."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if lp_dtype is torch.bfloat16 and not accel.is_bf16_supported():
        raise ConfigError(
            f"trainer.precision=bf16 with engine=deepspeed: the {accel.device_name()} accelerator "
            "does not support bf16; use trainer.precision=32")
    if lp_dtype is torch.float16 and not accel.is_fp16_supported():
        raise ConfigError(
            f"trainer.precision=16 with engine=deepspeed: the {accel.device_name()} accelerator "
            "does not support fp16; use trainer.precision=bf16 or 32")


def ensure_process_group(env: DistEnv, backend: str) -> None:
    """DeepSpeed always needs a process group; a plain ``python`` run gets a 1-rank one
    (``backend``: ``engine.backend``, ``auto`` = nccl on CUDA, gloo elsewhere)."""
    if dist.is_initialized():
        return
    if env.distributed:  # init_distributed would have made it
        raise RuntimeError("world size > 1 but no process group: call init_distributed first")
    if backend == "auto":
        backend = "nccl" if env.device.type == "cuda" else "gloo"
    # An in-memory store: no port to pick, nothing else to rendezvous with.
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    # DeepSpeed asserts the launcher's variables are set; a single process is rank 0 of 1.
    for var, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(var, value)


def ds_config(cfg: DeepSpeedEngineConfig, trainer_cfg: TrainerConfig, world_size: int,
              lp_dtype: torch.dtype | None, suffix_numel: int) -> dict[str, Any]:
    """The DeepSpeed config dict composed from ``engine.*`` and ``trainer.*`` (``suffix_numel``: the
    elements of the suffix's trainable parameters, which cap the ZeRO buckets)."""
    per_rank = trainer_cfg.batch_size // world_size
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        # ZeRO allocates its reduction bucket at full size: 5e8 elements (DeepSpeed's default)
        # made a CPU step of an 0.3M-parameter suffix take 3 s instead of 0.2 s. A bucket
        # larger than the whole suffix gradient buys nothing, so cap both at it (even: the
        # all-gather bucket must be a multiple of 2).
        cap = max(2, suffix_numel + suffix_numel % 2)
        zero.update(allgather_bucket_size=min(int(cfg.allgather_bucket_size), cap),
                    reduce_bucket_size=min(int(cfg.reduce_bucket_size), cap),
                    overlap_comm=cfg.overlap_comm)
    return {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "train_batch_size": per_rank * world_size,
        "zero_optimization": zero,
        "gradient_clipping": cfg.gradient_clipping,
        "bf16": {"enabled": lp_dtype is torch.bfloat16},
        "fp16": {"enabled": lp_dtype is torch.float16},
        # Since 0.19 DeepSpeed casts only the parameters unless told to cast the buffers too; a
        # suffix BatchNorm with bf16 weights and fp32 running statistics then fails its first
        # forward ("expected scalar type BFloat16 but found Float").
        **({"data_types": {"buffer_dtype": str(lp_dtype).removeprefix("torch.")}}
           if lp_dtype is not None else {}),
        "wall_clock_breakdown": cfg.wall_clock_breakdown,
        # A torch SGD/AdamW under ZeRO is "untested" for DeepSpeed; it steps flat fp32
        # partitions elementwise, which is exactly the same maths.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own lines would be noise
    }
