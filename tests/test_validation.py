"""Every knob's bad value is one exact line: in-process per row, and through the entry point.

The in-process table has one case per row of ``distlocal.validation.RULES`` and ``CROSS`` (a test
checks that), so a knob added without a rule, or a rule without a case, fails here. The values are
set on an untyped copy of the composed config, so a wrong *type* reaches the table too (Hydra's
schema rejects those earlier on the command line). The subprocess cases run ``launch/train.py``:
exit 2, the one line on stderr, and no run directory; they fail before torch is imported (< 1 s).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from conftest import run
from omegaconf import DictConfig, OmegaConf

from distlocal.config import compose
from distlocal.errors import ConfigError
from distlocal.validation import CROSS, RULES, leaf_keys, validate

GROUPS = {"ddp": ["engine=ddp"], "ds": ["engine=deepspeed"], "dyn": ["schedule=dynamic"]}
_BASE: dict[str, DictConfig] = {}


def _cfg(group: str) -> DictConfig:
    """The default config of ``group``, as a plain (untyped) DictConfig any value can be set on."""
    if group not in _BASE:
        _BASE[group] = compose(GROUPS[group])
    return OmegaConf.create(OmegaConf.to_container(_BASE[group]))


# (group, key, bad value, exact message) -- one per row of RULES.
KNOBS: list[tuple[str, str, Any, str]] = [
    ("ddp", "model", "resnet9",
     "unknown model 'resnet9'; valid: convnet, convnet_nobn, mobilenetv2, resnet18, resnet34, resnet50, "
     "vgg11, vgg16_bn, vit_mini, vit_tiny, tv:<torchvision name>"),
    ("ddp", "mode", "hebbian", "unknown mode 'hebbian'; valid: sgd, local, freeze"),
    ("ddp", "resume", 3, "resume=3 must be a string or null"),
    ("ddp", "trainer.epochs", 0, "trainer.epochs=0 must be an integer >= 1"),
    ("ddp", "trainer.batch_size", 2.5, "trainer.batch_size=2.5 must be an integer >= 1"),
    ("ddp", "trainer.lr", 0.0, "trainer.lr=0.0 must be a finite number > 0"),
    ("ddp", "trainer.optimizer", "adam", "unknown trainer.optimizer 'adam'; valid: sgd, adamw"),
    ("ddp", "trainer.momentum", 1.0, "trainer.momentum=1.0 must be a number in [0, 1)"),
    ("ddp", "trainer.nesterov", "yes", "trainer.nesterov=yes must be true or false"),
    ("ddp", "trainer.weight_decay", float("nan"), "trainer.weight_decay=nan must be a finite number >= 0"),
    ("ddp", "trainer.lr_schedule", "linear",
     "unknown trainer.lr_schedule 'linear'; valid: cosine, step, constant"),
    ("ddp", "trainer.lr_warmup_epochs", -1, "trainer.lr_warmup_epochs=-1 must be a finite number >= 0"),
    ("ddp", "trainer.lr_step_epochs", 0, "trainer.lr_step_epochs=0 must be an integer >= 1"),
    ("ddp", "trainer.lr_gamma", 0.0, "trainer.lr_gamma=0.0 must be a number in (0, 1]"),
    ("ddp", "trainer.precision", "fp8", "unknown trainer.precision 'fp8'; valid: 32, bf16, 16"),
    ("ddp", "trainer.seed", -1, "trainer.seed=-1 must be an integer in [0, 4294967295] (numpy's seed range)"),
    ("ddp", "trainer.deterministic", 1, "trainer.deterministic=1 must be true or false"),
    ("ddp", "trainer.device", "gpu", "unknown trainer.device 'gpu'; valid: auto, cpu, cuda"),
    ("ddp", "trainer.max_steps_per_epoch", 0,
     "trainer.max_steps_per_epoch=0 must be an integer >= 1, or null for whole epochs (0 steps would train "
     "nothing and still report the untrained accuracy)"),
    ("ddp", "trainer.progress", None, "trainer.progress=null must be true or false"),
    ("ddp", "trainer.eval_every_steps", 0, "trainer.eval_every_steps=0 must be an integer >= 1, or null to "
     "evaluate at epoch ends only (an evaluation every 0 steps never trains)"),
    ("ddp", "trainer.log_every", 0, "trainer.log_every=0 must be an integer >= 1"),
    ("ddp", "data.name", "mnist", "unknown data.name 'mnist'; valid: digits, cifar10, cifar100, "
     "fashion_mnist, imagefolder, synthetic"),
    ("ddp", "data.root", 7, "data.root=7 must be a string or null"),
    ("ddp", "data.download", "no", "data.download=no must be true or false"),
    ("ddp", "data.augment", 0, "data.augment=0 must be true or false"),
    ("ddp", "data.num_workers", -1, "data.num_workers=-1 must be an integer >= 0"),
    ("ddp", "data.image_size", 0, "data.image_size=0 must be an integer >= 1"),
    ("ddp", "data.shape", [3, 32], "data.shape=[3,32] must be [C,H,W] with three positive integers"),
    ("ddp", "data.num_classes", 0, "data.num_classes=0 must be an integer >= 1"),
    ("ddp", "data.train_size", 0, "data.train_size=0 must be an integer in [1, 1073741823]"),
    ("ddp", "data.test_size", 2**30, "data.test_size=1073741824 must be an integer in [1, 1073741823]"),
    ("ddp", "data.val_fraction", 1.0,
     "data.val_fraction=1.0 must be a number in [0, 1) (0 turns the validation split off)"),
    ("ddp", "data.val_seed", -1,
     "data.val_seed=-1 must be an integer in [0, 4294967295] (numpy's seed range)"),
    ("ddp", "data.on_corrupt", "ignore", "unknown data.on_corrupt 'ignore'; valid: error, skip"),
    ("ddp", "local.rule", "anti_hebb", "unknown local.rule 'anti_hebb'; valid: hebb, oja, softhebb, freeze"),
    ("ddp", "local.lr", -1.0,
     "local.lr=-1.0 must be a finite number >= 0 (a negative rate makes the rule anti-Hebbian, which no rule "
     "here is designed for; 0 keeps the local stages fixed)"),
    ("ddp", "local.temperature", 0.0, "local.temperature=0.0 must be a finite number > 0"),
    ("ddp", "local.update_every", 0, "local.update_every=0 must be an integer >= 1"),
    ("ddp", "local.sample_fraction", 2, "local.sample_fraction=2 must be a number in (0, 1]"),
    ("ddp", "local.sync_every", 0, "local.sync_every=0 must be an integer >= 1"),
    ("ddp", "local.sync_async", "true", "local.sync_async=true must be true or false"),  # a string
    ("ddp", "local.sync_dtype", "fp16", "unknown local.sync_dtype 'fp16'; valid: fp32, bf16"),
    ("ddp", "local.chunk_size", -1, "local.chunk_size=-1 must be an integer >= 0 (0: no fixed chunk)"),
    ("ddp", "local.chunk_bytes", -1, "local.chunk_bytes=-1 must be an integer >= 0 (0: no byte bound)"),
    ("ddp", "local.max_skipped_in_a_row", -1, "local.max_skipped_in_a_row=-1 must be an integer >= 0"),
    ("ddp", "local.compile", "no", "local.compile=no must be true or false"),
    ("ddp", "local.weak_supervision.enabled", None,
     "local.weak_supervision.enabled=null must be true or false"),
    ("ddp", "local.weak_supervision.window", 1,
     "local.weak_supervision.window=1 must be an integer >= 2 (a spread needs two losses)"),
    ("ddp", "local.weak_supervision.z", -1, "local.weak_supervision.z=-1 must be a finite number >= 0"),
    ("ddp", "local.weak_supervision.rise_tol", -0.1,
     "local.weak_supervision.rise_tol=-0.1 must be a finite number >= 0"),
    ("ddp", "local.weak_supervision.backoff", 1.5,
     "local.weak_supervision.backoff=1.5 must be a number in [0, 1]"),
    ("ddp", "local.weak_supervision.recover", 0.9,
     "local.weak_supervision.recover=0.9 must be a finite number >= 1 (recovery never lowers the rate)"),
    ("ddp", "local.weak_supervision.min_multiplier", -0.5,
     "local.weak_supervision.min_multiplier=-0.5 must be a number in [0, 1]"),
    ("ddp", "local.auto_freeze.enabled", "yes", "local.auto_freeze.enabled=yes must be true or false"),
    ("ddp", "local.auto_freeze.threshold", float("nan"),
     "local.auto_freeze.threshold=nan must be a finite number >= 0"),
    ("ddp", "local.auto_freeze.window", 0, "local.auto_freeze.window=0 must be an integer >= 1"),
    ("ddp", "local.auto_freeze.check_every", 0, "local.auto_freeze.check_every=0 must be an integer >= 1"),
    ("ddp", "schedule.name", "cyclic", "unknown schedule.name 'cyclic'; valid: static, dynamic"),
    ("ddp", "schedule.kind", "exp", "unknown schedule.kind 'exp'; valid: step, linear, cosine"),
    ("ddp", "schedule.warmup_epochs", -1, "schedule.warmup_epochs=-1 must be an integer >= 0"),
    ("ddp", "schedule.every", 0, "schedule.every=0 must be an integer >= 1"),
    ("ddp", "schedule.step", 0, "schedule.step=0 must be an integer >= 1"),
    ("ddp", "schedule.end_epoch", 0,
     "schedule.end_epoch=0 must be an integer >= 1, or null for the last epoch"),
    ("ddp", "schedule.max_boundary", -1,
     "schedule.max_boundary=-1 must be an integer >= 0, or null for every non-classifier stage"),
    ("dyn", "schedule.tau", 1.5,
     "schedule.tau=1.5 must be a number in (0, 1] (a move needs the updates to shrink)"),
    ("dyn", "schedule.patience", 0, "schedule.patience=0 must be an integer >= 1"),
    ("ddp", "engine.name", "horovod", "unknown engine.name 'horovod'; valid: ddp, deepspeed"),
    ("ddp", "engine.backend", "mpi", "unknown engine.backend 'mpi'; valid: auto, gloo, nccl"),
    ("ddp", "engine.timeout_s", 0, "engine.timeout_s=0 must be a finite number > 0"),
    ("ddp", "engine.bucket_cap_mb", -25.0, "engine.bucket_cap_mb=-25.0 must be a finite number > 0"),
    ("ds", "engine.zero_stage", 3,
     "engine.zero_stage=3 must be an integer in [0, 2] (stage 3 partitions the weights the local prefix "
     "updates in place: see docs/deepspeed.md)"),
    ("ds", "engine.gradient_clipping", -1.0,
     "engine.gradient_clipping=-1.0 must be a finite number >= 0 (0 = off)"),
    ("ds", "engine.wall_clock_breakdown", "on", "engine.wall_clock_breakdown=on must be true or false"),
    ("ds", "engine.allgather_bucket_size", 1, "engine.allgather_bucket_size=1 must be an integer >= 2"),
    ("ds", "engine.reduce_bucket_size", 0, "engine.reduce_bucket_size=0 must be an integer >= 1"),
    ("ds", "engine.overlap_comm", None, "engine.overlap_comm=null must be true or false"),
    ("ddp", "wandb.mode", "dryrun", "unknown wandb.mode 'dryrun'; valid: offline, online, disabled"),
    ("ddp", "wandb.project", "", "wandb.project= must be a string (non-empty)"),
    ("ddp", "wandb.entity", 1, "wandb.entity=1 must be a string or null"),
    ("ddp", "wandb.group", 2, "wandb.group=2 must be a string or null"),
    ("ddp", "wandb.name", 3, "wandb.name=3 must be a string or null"),
    ("ddp", "wandb.tags", "a,b", "wandb.tags=a,b must be a list of strings, e.g. [a,b]"),
    ("ddp", "profiler.enabled", "yes", "profiler.enabled=yes must be true or false"),
    ("ddp", "profiler.sample_steps", -1,
     "profiler.sample_steps=-1 must be an integer >= 0 (0: no phase breakdown)"),
    ("ddp", "profiler.reference_steps", -1,
     "profiler.reference_steps=-1 must be an integer >= 0 (0: no all-SGD step time, hence no speedup)"),
    ("ddp", "profiler.memory_snapshot", 1, "profiler.memory_snapshot=1 must be true or false"),
    ("ddp", "profiler.timeline", "yes", "profiler.timeline=yes must be true or false"),
    ("ddp", "checkpoint.enabled", None, "checkpoint.enabled=null must be true or false"),
    ("ddp", "checkpoint.every_steps", 0,
     "checkpoint.every_steps=0 must be an integer >= 1, or null for epoch ends only"),
    ("ddp", "checkpoint.keep", -1,
     "checkpoint.keep=-1 must be an integer >= 0 (numbered checkpoints kept besides last.pt; 0 keeps all)"),
]

# (group, {key: value}, world size, exact message) -- one per rule of CROSS, in its order.
CROSS_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("ddp", {"trainer.batch_size": 33}, 2,
     "trainer.batch_size=33 is not divisible by the world size 2; use a multiple of 2"),
    ("ddp", {"trainer.nesterov": True, "trainer.optimizer": "adamw"}, 1,
     "trainer.nesterov=true needs trainer.optimizer=sgd and trainer.momentum > 0 (got adamw, momentum 0.9)"),
    ("ddp", {"trainer.lr_warmup_epochs": 9.0, "trainer.epochs": 8}, 1,
     "trainer.lr_warmup_epochs=9 is longer than the run (trainer.epochs=8): "
     "the LR would never reach trainer.lr"),
    ("ddp", {"schedule.end_epoch": 1, "schedule.warmup_epochs": 2}, 1,
     "schedule.end_epoch=1 is before the end of warm-up (schedule.warmup_epochs=2)"),
    ("ddp", {"engine.backend": "nccl", "trainer.device": "cpu"}, 1,
     "engine.backend=nccl needs CUDA but trainer.device=cpu; use engine.backend=gloo or auto"),
]


@pytest.mark.parametrize(("group", "key", "value", "message"), KNOBS, ids=[c[1] for c in KNOBS])
def test_each_knob_rejects_its_bad_value_in_one_line(group: str, key: str, value: Any, message: str) -> None:
    cfg = _cfg(group)
    validate(cfg, world_size=1)  # the defaults pass: the error below is the bad value's alone
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=1)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("group", "values", "world_size", "message"), CROSS_CASES,
                         ids=[",".join(c[1]) for c in CROSS_CASES])
def test_each_cross_rule_rejects_in_one_line(group: str, values: dict[str, Any], world_size: int,
                                             message: str) -> None:
    cfg = _cfg(group)
    validate(cfg, world_size=world_size)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    assert str(info.value) == message


def test_every_knob_has_a_rule_and_every_rule_a_case() -> None:
    """A new config key needs a row in RULES; a new row (or cross rule) needs a case above."""
    keys: set[str] = set()
    for engine in ("ddp", "deepspeed"):
        for schedule in ("static", "dynamic"):
            keys |= set(leaf_keys(compose([f"engine={engine}", f"schedule={schedule}"])))
    rows = [r.key for r in RULES]
    assert len(rows) == len(set(rows)), "a key has two rows"
    assert keys - set(rows) == set(), "config keys without a validation row"
    assert set(rows) - keys == set(), "rows for keys no config has"
    assert [c[1] for c in KNOBS] == rows, "one case per row, in the table's order"
    assert len(CROSS_CASES) == len(CROSS)


def test_cross_cases_hit_their_own_rule() -> None:
    """Each cross case fails on the rule it is listed for, not on an earlier one."""
    for (group, values, ws, _), cross in zip(CROSS_CASES, CROSS):
        cfg = _cfg(group)
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
        assert not cross.ok(cfg, ws), cross.keys


def test_valid_edges_pass() -> None:
    """The boundary values a rule allows are accepted (null, 0 where 0 means off, the interval ends)."""
    cfg = _cfg("ddp")
    for key, value in {"local.lr": 0.0, "local.sample_fraction": 1.0, "trainer.max_steps_per_epoch": None,
                       "checkpoint.keep": 0, "checkpoint.every_steps": 1, "trainer.momentum": 0.0,
                       "trainer.nesterov": False, "model": "tv:resnet18", "trainer.lr_warmup_epochs": 8.0,
                       "trainer.seed": 2**32 - 1, "local.max_skipped_in_a_row": 0}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    validate(cfg, world_size=1)
    validate(_cfg("ds"), world_size=2)
    validate(_cfg("dyn"), world_size=4)


# ---- through the entry point: exit 2, one line, nothing written --------------------------
ENTRY = [
    ("local.sync_every=0", "local.sync_every=0 must be an integer >= 1"),
    ("local.update_every=0", "local.update_every=0 must be an integer >= 1"),
    ("local.sample_fraction=2", "local.sample_fraction=2.0 must be a number in (0, 1]"),
    ("local.sample_fraction=0", "local.sample_fraction=0.0 must be a number in (0, 1]"),
    ("trainer.lr=-0.1", "trainer.lr=-0.1 must be a finite number > 0"),
    ("local.lr=-1", "local.lr=-1.0 must be a finite number >= 0 (a negative rate makes the rule "
     "anti-Hebbian, which no rule here is designed for; 0 keeps the local stages fixed)"),
    ("checkpoint.keep=-1",
     "checkpoint.keep=-1 must be an integer >= 0 (numbered checkpoints kept besides last.pt; 0 keeps all)"),
    ("trainer.max_steps_per_epoch=0",
     "trainer.max_steps_per_epoch=0 must be an integer >= 1, or null for whole epochs (0 steps would train "
     "nothing and still report the untrained accuracy)"),
    ("data=bogus",
     "unknown data 'bogus'; valid: cifar10, cifar100, digits, fashion_mnist, imagefolder, synthetic"),
    ("engine=bogus", "unknown engine 'bogus'; valid: ddp, deepspeed"),
    ("schedule=bogus", "unknown schedule 'bogus'; valid: dynamic, static"),
    # A missing data root is found before Hydra writes the run directory, like every other bad input.
    ("data=imagefolder data.root=/nonexistent/imagenet",
     "imagefolder root '/nonexistent/imagenet' does not exist: expected '/nonexistent/imagenet/train/<class>/"
     "<image>' and '/nonexistent/imagenet/val/<class>/<image>'; point data.root at it"),
    ("trainer.nesterov=true trainer.momentum=0",
     "trainer.nesterov=true needs trainer.optimizer=sgd and trainer.momentum > 0 (got sgd, momentum 0)"),
]


@pytest.mark.parametrize(("overrides", "message"), ENTRY, ids=[c[0] for c in ENTRY])
def test_entry_point_bad_input_is_one_line_exit_2_nothing_written(tmp_path, overrides: str,
                                                                  message: str) -> None:
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "launch/train.py", *overrides.split(), f"hydra.run.dir={run_dir}"],
               timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"distlocal: error: {message}"]
    assert not run_dir.exists()


def test_entry_point_checks_batch_against_the_launcher_world_size(tmp_path) -> None:
    """Under torchrun every rank pre-checks with WORLD_SIZE, before the process group or run dir."""
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "launch/train.py", "trainer.batch_size=33", f"hydra.run.dir={run_dir}"],
               timeout=120, WORLD_SIZE="2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distlocal: error: trainer.batch_size=33 is not divisible by the world size 2; use a multiple of 2"]
    assert not run_dir.exists()
