"""One validation pass over every knob, run before anything is built or written.

Hydra's structured schema (``distlocal/config.py``) already rejects a misspelled key and a value
of the wrong type at composition. What it cannot express lives here, as a table: one row per
knob (range, type, choice) and one row per rule that ties knobs together. ``validate`` walks the
table and raises :class:`ConfigError` for the first row that fails, with a one-line message that
names the key, the value and what to use instead; the entry point (``cli.precheck``) prints it as
``distlocal: error: ...`` and exits 2, and ``trainer.train`` runs the same pass first thing.

To add a knob: add its field to the dataclass in ``config.py`` and one row to :data:`RULES`
(``tests/test_validation.py`` fails for any config key without a row). A rule between knobs is
one :class:`Cross` row in :data:`CROSS`.

Rows whose key is absent from the composed config (``engine.zero_stage`` under ``engine=ddp``,
``schedule.tau`` under ``schedule=static``) are skipped: the group option in force has no such knob.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig

from distlocal.config import MODES
from distlocal.errors import ConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """One knob: ``ok(value)`` must hold, else ``message(key, value)`` is the error."""

    key: str
    ok: Callable[[Any], bool]
    expect: str
    """What a valid value is, completing "``<key>=<value>`` must be ..."."""
    why: str = ""
    """Optional reason, appended after the expectation."""
    choices: Callable[[], Sequence[str]] | None = None
    """For a choice among names: the valid names (the message then lists them)."""
    costly: bool = False
    """Checking it imports a registry (torch): checked after the cheap rows, so most bad input
    fails in well under a second."""

    def message(self, value: Any) -> str:
        """The one-line error for ``value``."""
        if self.choices is not None:
            return f"unknown {self.key} '{value}'; valid: {', '.join(self.choices())}"
        text = f"{self.key}={_show(value)} must be {self.expect}"
        return f"{text} ({self.why})" if self.why else text


@dataclass(frozen=True)
class Cross:
    """A rule between knobs: ``ok(cfg, world_size)`` must hold, else ``message(cfg, world_size)``."""

    keys: tuple[str, ...]
    ok: Callable[[DictConfig, int], bool]
    message: Callable[[DictConfig, int], str]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (ListConfig, list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


# ------------------------------------------------------------------ value predicates
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(key: str, lo: int, hi: int | None = None, nullable: bool = False, why: str = "",
            null_means: str = "") -> Rule:
    """An integer in ``[lo, hi]`` (``hi=None``: no upper bound), or ``null`` when ``nullable``."""
    span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    expect = f"an integer {span}" + (f", or null {null_means}".rstrip() if nullable else "")

    def ok(v: Any) -> bool:
        if v is None:
            return nullable
        return _is_int(v) and v >= lo and (hi is None or v <= hi)

    return Rule(key, ok, expect, why)


def number(key: str, lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           why: str = "") -> Rule:
    """A finite number in the interval given (open or closed at either end; ``hi=None``: unbounded)."""
    if hi is None:
        expect = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        expect = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def ok(v: Any) -> bool:
        if not _is_num(v):
            return False
        above = v > lo if lo_open else v >= lo
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    return Rule(key, ok, expect, why)


def choice(key: str, names: Callable[[], Sequence[str]] | Sequence[str]) -> Rule:
    """One of a list of names (a callable is asked lazily: registries import torch)."""
    get = names if callable(names) else (lambda: tuple(names))
    return Rule(key, lambda v: isinstance(v, str) and v in get(), "one of the valid names", choices=get,
                costly=callable(names))


def boolean(key: str) -> Rule:
    """``true`` or ``false``."""
    return Rule(key, lambda v: isinstance(v, bool), "true or false")


def text(key: str, nullable: bool = True) -> Rule:
    """Free text (a name, a path), or ``null`` when ``nullable``."""
    expect = "a string" + (" or null" if nullable else " (non-empty)")
    return Rule(key, lambda v: (v is None and nullable) or (isinstance(v, str) and (nullable or v != "")),
                expect)


def texts(key: str) -> Rule:
    """A list of strings."""
    return Rule(key, lambda v: isinstance(v, (ListConfig, list)) and all(isinstance(s, str) for s in v),
                "a list of strings, e.g. [a,b]")


def _model_ok(name: Any) -> bool:
    from distlocal.models import model_names

    return isinstance(name, str) and (name in model_names() or (name.startswith("tv:") and len(name) > 3))


def _model_choices() -> tuple[str, ...]:
    from distlocal.models import model_names

    return (*model_names(), "tv:<torchvision name>")


def _rules() -> tuple[str, ...]:
    from distlocal.local.rules import RULES as names

    return names


def _datasets() -> tuple[str, ...]:
    from distlocal.data import DATASETS

    return DATASETS


def _on_corrupt() -> tuple[str, ...]:
    from distlocal.data.corrupt import ON_CORRUPT

    return ON_CORRUPT


def _static_kinds() -> tuple[str, ...]:
    from distlocal.local.schedule import STATIC_KINDS

    return STATIC_KINDS


def _sync_dtypes() -> tuple[str, ...]:
    from distlocal.parallel.sync import SYNC_DTYPES

    return tuple(SYNC_DTYPES)


def _schedules() -> tuple[str, ...]:
    from distlocal.local.schedule import SCHEDULES

    return SCHEDULES


def _shape_ok(v: Any) -> bool:
    return isinstance(v, (ListConfig, list)) and len(v) == 3 and all(_is_int(s) and s >= 1 for s in v)


# ------------------------------------------------------------------ the table: one row per knob
RULES: tuple[Rule, ...] = (
    # run
    Rule("model", _model_ok, "", choices=_model_choices, costly=True),
    choice("mode", MODES),
    text("resume"),
    # trainer
    integer("trainer.epochs", 1),
    integer("trainer.batch_size", 1),
    number("trainer.lr", 0, lo_open=True),
    choice("trainer.optimizer", ("sgd", "adamw")),
    number("trainer.momentum", 0, 1, hi_open=True),
    boolean("trainer.nesterov"),
    number("trainer.weight_decay", 0),
    choice("trainer.lr_schedule", ("cosine", "step", "constant")),
    number("trainer.lr_warmup_epochs", 0),
    integer("trainer.lr_step_epochs", 1),
    number("trainer.lr_gamma", 0, 1, lo_open=True),
    choice("trainer.precision", ("32", "bf16", "16")),
    integer("trainer.seed", 0, 2**32 - 1, why="numpy's seed range"),
    boolean("trainer.deterministic"),
    choice("trainer.device", ("auto", "cpu", "cuda")),
    integer("trainer.max_steps_per_epoch", 1, nullable=True, null_means="for whole epochs",
            why="0 steps would train nothing and still report the untrained accuracy"),
    boolean("trainer.progress"),
    integer("trainer.eval_every_steps", 1, nullable=True, null_means="to evaluate at epoch ends only",
            why="an evaluation every 0 steps never trains"),
    integer("trainer.log_every", 1),
    # data
    choice("data.name", _datasets),
    text("data.root"),
    boolean("data.download"),
    boolean("data.augment"),
    integer("data.num_workers", 0),
    integer("data.image_size", 1),
    Rule("data.shape", _shape_ok, "[C,H,W] with three positive integers"),
    integer("data.num_classes", 1),
    integer("data.train_size", 1, 2**30 - 1),
    integer("data.test_size", 1, 2**30 - 1),
    number("data.val_fraction", 0, 1, hi_open=True, why="0 turns the validation split off"),
    integer("data.val_seed", 0, 2**32 - 1, why="numpy's seed range"),
    choice("data.on_corrupt", _on_corrupt),
    # local rule
    choice("local.rule", _rules),
    # A negative rate turns every rule anti-Hebbian: no rule here is designed or measured for
    # that, and weak supervision only scales the rate within [0, 1]; so it is an error, not a flag.
    number("local.lr", 0, why="a negative rate makes the rule anti-Hebbian, which no rule here is "
           "designed for; 0 keeps the local stages fixed"),
    number("local.temperature", 0, lo_open=True),
    integer("local.update_every", 1),
    number("local.sample_fraction", 0, 1, lo_open=True),
    integer("local.sync_every", 1),
    boolean("local.sync_async"),
    choice("local.sync_dtype", _sync_dtypes),
    integer("local.chunk_size", 0, why="0: no fixed chunk"),
    integer("local.chunk_bytes", 0, why="0: no byte bound"),
    integer("local.max_skipped_in_a_row", 0),
    boolean("local.compile"),
    boolean("local.weak_supervision.enabled"),
    integer("local.weak_supervision.window", 2, why="a spread needs two losses"),
    number("local.weak_supervision.z", 0),
    number("local.weak_supervision.rise_tol", 0),
    number("local.weak_supervision.backoff", 0, 1),
    number("local.weak_supervision.recover", 1, why="recovery never lowers the rate"),
    number("local.weak_supervision.min_multiplier", 0, 1),
    boolean("local.auto_freeze.enabled"),
    number("local.auto_freeze.threshold", 0),
    integer("local.auto_freeze.window", 1),
    integer("local.auto_freeze.check_every", 1),
    # schedule (static and dynamic)
    choice("schedule.name", _schedules),
    choice("schedule.kind", _static_kinds),
    integer("schedule.warmup_epochs", 0),
    integer("schedule.every", 1),
    integer("schedule.step", 1),
    integer("schedule.end_epoch", 1, nullable=True, null_means="for the last epoch"),
    integer("schedule.max_boundary", 0, nullable=True, null_means="for every non-classifier stage"),
    number("schedule.tau", 0, 1, lo_open=True, why="a move needs the updates to shrink"),
    integer("schedule.patience", 1),
    # engine (ddp and deepspeed)
    choice("engine.name", ("ddp", "deepspeed")),
    choice("engine.backend", ("auto", "gloo", "nccl")),
    number("engine.timeout_s", 0, lo_open=True),
    number("engine.bucket_cap_mb", 0, lo_open=True),
    integer("engine.zero_stage", 0, 2, why="stage 3 partitions the weights the local prefix updates "
            "in place: see docs/deepspeed.md"),
    number("engine.gradient_clipping", 0, why="0 = off"),
    boolean("engine.wall_clock_breakdown"),
    integer("engine.allgather_bucket_size", 2),
    integer("engine.reduce_bucket_size", 1),
    boolean("engine.overlap_comm"),
    # wandb
    choice("wandb.mode", ("offline", "online", "disabled")),
    text("wandb.project", nullable=False),
    text("wandb.entity"),
    text("wandb.group"),
    text("wandb.name"),
    texts("wandb.tags"),
    # profiler
    boolean("profiler.enabled"),
    integer("profiler.sample_steps", 0, why="0: no phase breakdown"),
    integer("profiler.reference_steps", 0, why="0: no all-SGD step time, hence no speedup"),
    boolean("profiler.memory_snapshot"),
    boolean("profiler.timeline"),
    # checkpoints
    boolean("checkpoint.enabled"),
    integer("checkpoint.every_steps", 1, nullable=True, null_means="for epoch ends only"),
    integer("checkpoint.keep", 0, why="numbered checkpoints kept besides last.pt; 0 keeps all"),
)

# ------------------------------------------------------------------ rules between knobs
CROSS: tuple[Cross, ...] = (
    Cross(("trainer.batch_size",), lambda c, ws: c.trainer.batch_size % ws == 0,
          lambda c, ws: f"trainer.batch_size={c.trainer.batch_size} is not divisible by the world size {ws}; "
                        f"use a multiple of {ws}"),
    Cross(("trainer.nesterov", "trainer.optimizer", "trainer.momentum"),
          lambda c, ws: not c.trainer.nesterov or (c.trainer.optimizer == "sgd" and c.trainer.momentum > 0),
          lambda c, ws: "trainer.nesterov=true needs trainer.optimizer=sgd and trainer.momentum > 0 "
                        f"(got {c.trainer.optimizer}, momentum {c.trainer.momentum:g})"),
    Cross(("trainer.lr_warmup_epochs", "trainer.epochs"),
          lambda c, ws: c.trainer.lr_warmup_epochs <= c.trainer.epochs,
          lambda c, ws: f"trainer.lr_warmup_epochs={c.trainer.lr_warmup_epochs:g} is longer than the run "
                        f"(trainer.epochs={c.trainer.epochs}): the LR would never reach trainer.lr"),
    Cross(("schedule.end_epoch", "schedule.warmup_epochs"),
          lambda c, ws: c.schedule.end_epoch is None or c.schedule.end_epoch >= c.schedule.warmup_epochs,
          lambda c, ws: f"schedule.end_epoch={c.schedule.end_epoch} is before the end of warm-up "
                        f"(schedule.warmup_epochs={c.schedule.warmup_epochs})"),
    Cross(("engine.backend", "trainer.device"),
          lambda c, ws: not (c.engine.backend == "nccl" and c.trainer.device == "cpu"),
          lambda c, ws: "engine.backend=nccl needs CUDA but trainer.device=cpu; "
                        "use engine.backend=gloo or auto"),
)


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def world_size_from_env() -> int:
    """The world size the launcher announced (``WORLD_SIZE``; 1 for a plain ``python`` run)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Check every knob and every rule between knobs; raise :class:`ConfigError` for the first failure.

    ``world_size`` defaults to the launcher's ``WORLD_SIZE``. Reads only ``cfg``: nothing is built,
    imported beyond the name registries, or written.
    """
    ws = world_size_from_env() if world_size is None else world_size

    def check(rules: list[Rule]) -> None:
        for rule in rules:
            value = _get(cfg, rule.key)
            if value is not _ABSENT and not rule.ok(value):
                raise ConfigError(rule.message(value))

    check([r for r in RULES if not r.costly])
    for cross in CROSS:  # after the single knobs: a cross rule may assume each knob is valid
        if any(_get(cfg, k) is _ABSENT for k in cross.keys):
            continue
        if not cross.ok(cfg, ws):
            raise ConfigError(cross.message(cfg, ws))
    check([r for r in RULES if r.costly])


def leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every leaf key of ``cfg`` in dotted form (lists are leaves); the tests check each has a row."""
    out: list[str] = []
    for k in cfg:
        node = cfg._get_node(k)
        path = f"{prefix}{k}"
        if isinstance(node, DictConfig):
            out.extend(leaf_keys(node, path + "."))
        else:
            out.append(path)
    return out


__all__ = ["CROSS", "RULES", "Cross", "Rule", "leaf_keys", "validate", "world_size_from_env"]
