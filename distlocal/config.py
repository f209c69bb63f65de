"""Structured configs: one small dataclass per component, registered in Hydra's ConfigStore.

The YAML tree in ``configs/`` picks defaults and group options; these dataclasses are the
schema, so a misspelled key or a wrong type fails at composition with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODES = ("sgd", "local", "freeze")


@dataclass
class TrainerConfig:
    """Optimisation and loop settings."""

    epochs: int = 8
    batch_size: int = 64
    """Global batch size, split evenly across ranks."""
    lr: float = 0.05
    optimizer: str = "sgd"
    """``sgd`` or ``adamw``."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    """``cosine``, ``step`` or ``constant``; per step, after ``lr_warmup_epochs`` of linear warm-up."""
    lr_warmup_epochs: float = 0.0
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    precision: str = "32"
    """``32``, ``bf16`` or ``16`` (autocast; fp16 adds a grad scaler)."""
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    max_steps_per_epoch: int | None = None
    """Cap the steps of an epoch (quick runs, benchmarks); ``null`` runs the whole epoch."""
    progress: bool = True
    """tqdm bar on rank 0."""
    eval_every_steps: int | None = None
    """Also evaluate every N global steps (validation split if any, else test), each logged with its
    step and cumulative training time on every clock; ``null``: at epoch ends only."""
    log_every: int = 50
    """Steps between host reads of the accumulated training loss (the progress bar and per-step logs
    update there; also read at epoch end). Each read waits for the accelerator to drain its queue."""


@dataclass
class DataConfig:
    """Data set selection; ``name`` is set by the ``data=`` group option."""

    name: str = "digits"
    root: str | None = None
    """Local directory of the data set (cifar10, cifar100, imagefolder; fashion_mnist: the IDX files,
    default ``/usr/share/datasets/fashion-mnist``)."""
    download: bool = False
    """Allow torchvision to download CIFAR into ``root`` (off: nothing downloads at run time)."""
    augment: bool = True
    """Standard augmentation (CIFAR: crop+flip; ImageNet: random-resized-crop+flip). Digits: none."""
    num_workers: int = 0
    image_size: int = 224
    """ImageFolder crop size."""
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    """Synthetic sample shape (C, H, W)."""
    num_classes: int = 10
    """Synthetic class count."""
    train_size: int = 1024
    test_size: int = 256
    val_fraction: float = 0.0
    """Hold out this fraction of the train set as a validation set (logged as ``val_loss``/``val_acc``
    each epoch; tune on it, never on the test set). 0 = off."""
    val_seed: int = 0
    """Seed of the validation split (not ``trainer.seed``: every run holds out the same samples)."""
    on_corrupt: str = "error"
    """A sample whose file cannot be read (imagefolder): ``error`` stops every rank with one line naming
    it; ``skip`` trains on the next readable sample instead, warns once and counts ``data_skipped``."""


@dataclass
class WeakSupervisionConfig:
    """The local learning rate driven by the training loss (docs/local-rules.md, "Weak supervision")."""

    enabled: bool = True
    window: int = 50
    """Losses (one per delta sync) per window; rises are tested between consecutive window means."""
    z: float = 3.0
    """A rise must exceed ``z`` standard errors of the difference of the two window means ..."""
    rise_tol: float = 0.05
    """... and this relative amount, to count as a real rise (and cut the multiplier)."""
    backoff: float = 0.5
    """Factor applied to the multiplier on a real rise (and on a skipped non-finite update)."""
    recover: float = 1.1
    """Factor the multiplier regains after a window whose mean loss fell (never above the loss-ratio cap)."""
    min_multiplier: float = 0.05
    """Floor of the multiplier: cuts never switch the rule off (auto-freeze does, when it is dead)."""


@dataclass
class AutoFreezeConfig:
    """Freeze a local stage for good once its updates are negligible (docs/local-rules.md)."""

    enabled: bool = True
    threshold: float = 1e-5
    """Effective update per step, ``lr·‖ΔW‖/‖W‖`` (the stage's rank-averaged delta), below which ..."""
    window: int = 200
    """... a stage is frozen when its mean over this many steps stays under ``threshold``."""
    check_every: int = 50
    """Read the per-stage updates on the host once per this many delta syncs (one read, not one per
    layer per sync): the freeze decisions are the same, taken up to ``check_every - 1`` syncs late."""


@dataclass
class LocalConfig:
    """The local (Hebbian) rule applied to stages before the boundary."""

    rule: str = "softhebb"
    """``hebb``, ``oja``, ``softhebb`` or ``freeze``."""
    lr: float = 1e-3
    temperature: float = 1.0
    """SoftHebb softmax temperature over output channels."""
    update_every: int = 1
    """Apply the rule on every n-th step; other steps run the prefix forward only."""
    sample_fraction: float = 1.0
    """Compute the delta from this leading fraction of the (per-rank) batch. The sampler interleaves
    the ranks, so N ranks use the same samples as one process when fraction x per-rank batch is whole."""
    chunk_size: int = 0
    """Samples per chunk of a layer's delta computation (bounds the rule's temporaries); 0: use
    ``chunk_bytes``. Exact: the delta is a sum over samples."""
    chunk_bytes: int = 16 * 2**20
    """Automatic chunking: as many samples per chunk as keep one chunk's float32 input and output
    copies under this many bytes (0: the whole batch at once). See docs/profiling.md."""
    sync_dtype: str = "fp32"
    """``fp32`` or ``bf16``: transport dtype of the delta part of the sync buffer (bf16 halves its
    bytes; BN statistics and the loss stay fp32)."""
    sync_every: int = 1
    """Average deltas across ranks every K steps (accumulated in between)."""
    sync_async: bool = False
    """Overlap the delta all-reduce with the suffix forward/backward."""
    compile: bool = False
    """``torch.compile`` the rule's per-layer elementwise work (the GEMM stays eager); off until a
    GPU run shows it wins (docs/profiling.md). The first step's compile time is logged as compile_s."""
    max_skipped_in_a_row: int = 10
    """Non-finite local updates skipped in a row before the run stops (after a checkpoint)."""
    weak_supervision: WeakSupervisionConfig = field(default_factory=WeakSupervisionConfig)
    auto_freeze: AutoFreezeConfig = field(default_factory=AutoFreezeConfig)


@dataclass
class ScheduleConfig:
    """When the boundary moves: ``name`` picks the selector, each reads its own keys.

    One schema for both selectors, so that an experiment's static keys (``kind``, ``end_epoch``)
    still compose under ``schedule=dynamic`` and ``schedule=static,dynamic`` sweeps; the selector
    that does not use a key ignores it.
    """

    name: str = "static"
    """``static`` (pre-defined boundary per epoch) or ``dynamic`` (moved by the weight-update trend)."""
    warmup_epochs: int = 2
    """Epochs of pure SGD before the first stage turns local."""
    step: int = 1
    """Stages the boundary moves by at each move."""
    max_boundary: int | None = None
    """Cap on the boundary; ``null`` = every non-classifier stage (num_stages - 1)."""
    kind: str = "step"
    """static: ``step`` (every ``every`` epochs +``step``), ``linear`` or ``cosine`` (to ``end_epoch``)."""
    every: int = 1
    """static ``step``: epochs between moves."""
    end_epoch: int | None = None
    """static: epoch at which linear/cosine reach ``max_boundary``; ``null`` = last epoch."""
    tau: float = 0.5
    """dynamic: move when u_e / u_ref < tau (u_ref: the first u after warm-up or after the last move) ..."""
    patience: int = 1
    """dynamic: ... for this many consecutive epochs."""


@dataclass
class StaticScheduleConfig(ScheduleConfig):
    """The static selector's defaults (``schedule=static``)."""

    name: str = "static"


@dataclass
class DynamicScheduleConfig(ScheduleConfig):
    """The dynamic selector's defaults (``schedule=dynamic``)."""

    name: str = "dynamic"


@dataclass
class DDPEngineConfig:
    """PyTorch DistributedDataParallel over the SGD suffix."""

    name: str = "ddp"
    backend: str = "auto"
    """``auto`` (NCCL on CUDA, gloo on CPU), ``gloo`` or ``nccl``."""
    timeout_s: float = 600.0
    """Timeout of every collective: a dead rank ends the job instead of hanging it."""
    bucket_cap_mb: float = 25.0


@dataclass
class DeepSpeedEngineConfig:
    """DeepSpeed engine over the SGD suffix (docs/deepspeed.md).

    bf16/fp16 follow ``trainer.precision`` (``bf16`` / ``16``): one precision knob per run.
    """

    name: str = "deepspeed"
    backend: str = "auto"
    """``auto`` (NCCL on CUDA, gloo on CPU), ``gloo`` or ``nccl``."""
    timeout_s: float = 600.0
    zero_stage: int = 0
    """0 (plain data parallel), 1 (optimizer state partitioned) or 2 (+ gradients); 3 is not supported."""
    gradient_clipping: float = 0.0
    """Clip the suffix gradient norm to this value; 0 = off."""
    wall_clock_breakdown: bool = False
    """DeepSpeed's own forward/backward/step timers in its log."""
    allgather_bucket_size: int = 500_000_000
    """ZeRO 1/2: elements per all-gather of the updated parameters."""
    reduce_bucket_size: int = 500_000_000
    """ZeRO 1/2: elements per gradient reduction bucket."""
    overlap_comm: bool = False
    """ZeRO 1/2: overlap the gradient reduction with the backward pass."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    mode: str = "offline"
    """``offline``, ``online`` or ``disabled``; online needs WANDB_API_KEY in the environment."""
    project: str = "distlocal"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ProfilerConfig:
    """Per-epoch memory and time accounting."""

    enabled: bool = True
    sample_steps: int = 3
    """Dedicated steps per epoch timed phase by phase (synchronised; rounded up to whole lever
    periods), kept out of ``step_time_s``."""
    reference_steps: int = 4
    """All-SGD reference steps per epoch with local stages, spread between the run's timed steps
    (docs/profiling.md); 0: none timed (no ``speedup``; the reference footprint is still measured)."""
    memory_snapshot: bool = False
    """CUDA only: dump a memory snapshot of the epoch's footprint step."""
    timeline: bool = False
    """Write one step's memory timeline, the run's and its all-SGD reference's, as
    ``memory_timeline.png`` (+ ``.json``) in the run directory (distlocal/profiler/timeline.py)."""


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run dir>/checkpoints``."""

    enabled: bool = True
    every_steps: int | None = None
    """Also checkpoint every N global steps (mid-epoch); ``null``: at epoch ends only."""
    keep: int = 2
    """Numbered checkpoints kept besides ``last.pt``."""


@dataclass
class Config:
    """The whole run."""

    model: str = "convnet"
    """A registered model name, or ``tv:<torchvision name>``."""
    mode: str = "local"
    """``sgd``, ``local`` (LoCal+SGD) or ``freeze`` (layer-freezing baseline)."""
    resume: str | None = None
    """``auto`` or a checkpoint path."""
    data: DataConfig = MISSING
    schedule: Any = MISSING
    engine: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_configs() -> None:
    """Register the schemas the YAML tree in ``configs/`` extends."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="schedule", name="base_static", node=StaticScheduleConfig)
    cs.store(group="schedule", name="base_dynamic", node=DynamicScheduleConfig)
    cs.store(group="engine", name="base_ddp", node=DDPEngineConfig)
    cs.store(group="engine", name="base_deepspeed", node=DeepSpeedEngineConfig)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the run config from ``configs/`` with Hydra's compose API (tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (written to ``<run dir>/config.yaml``)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
