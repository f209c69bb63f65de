"""The experiment configs in ``configs/experiment/``: every one composes with the expected keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from distlocal.config import CONFIG_DIR, compose
from distlocal.trainer import validate

EXPERIMENT_DIR = CONFIG_DIR / "experiment"
CIFAR_MODELS = ("resnet18", "resnet34", "resnet50", "vgg16_bn", "mobilenetv2")
IMAGENET_MODELS = {"resnet50": "tv:resnet50", "mobilenetv2": "tv:mobilenet_v2"}
MODES = ("sgd", "local", "freeze")
FASHION_MODELS = ("convnet", "vgg11")  # fashion_<model>: one per model, the mode from the command line


def experiment_names() -> list[str]:
    """The user-facing experiments (top-level files; ``base/`` and ``sched/`` are building blocks)."""
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def expected() -> dict[str, tuple[str, str]]:
    """experiment name (= its wandb group) -> (data.name, model)."""
    out = {f"{data}_{model}": (data, model) for data in ("cifar10", "cifar100") for model in CIFAR_MODELS}
    out.update({f"imagenet_{slug}": ("imagefolder", model) for slug, model in IMAGENET_MODELS.items()})
    return out


def test_the_experiment_set_is_complete() -> None:
    """One experiment per (data, model); the mode comes from the command line."""
    assert experiment_names() == sorted([*expected(), *(f"fashion_{m}" for m in FASHION_MODELS)])


@pytest.mark.parametrize("model", FASHION_MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_fashion_experiment_takes_the_mode_from_the_command_line(model: str, mode: str) -> None:
    cfg = compose([f"+experiment=fashion_{model}", f"mode={mode}"])
    validate(cfg)
    assert (cfg.data.name, cfg.model, cfg.mode, cfg.wandb.group) == ("fashion_mnist", model, mode,
                                                                     f"fashion_{model}")
    # Localizing starts after one epoch of SGD, while SGD still improves, and stops at half depth.
    assert cfg.schedule.name == "static" and cfg.schedule.warmup_epochs == 1
    assert cfg.schedule.warmup_epochs < cfg.trainer.epochs
    assert 1 <= cfg.schedule.max_boundary <= 4


@pytest.mark.parametrize("name", sorted(expected()))
@pytest.mark.parametrize("mode", MODES)
def test_experiment_composes_with_expected_keys(name: str, mode: str) -> None:
    data, model = expected()[name]
    cfg = compose([f"+experiment={name}", f"mode={mode}"])
    validate(cfg)  # model, mode, rule and value ranges are ones the code knows
    assert (cfg.data.name, cfg.model, cfg.mode, cfg.wandb.group) == (data, model, mode, name)
    assert cfg.wandb.name == f"{name}_{mode}" and mode in cfg.wandb.tags
    assert cfg.trainer.optimizer == "sgd" and cfg.trainer.momentum == 0.9
    assert cfg.trainer.lr_schedule == "cosine" and cfg.trainer.lr == 0.1
    assert cfg.schedule.name == "static" and cfg.schedule.kind == "linear"
    assert cfg.schedule.max_boundary is not None and cfg.schedule.max_boundary >= 1
    epochs = cfg.trainer.epochs
    if data == "imagefolder":
        assert (epochs, cfg.trainer.batch_size, cfg.trainer.weight_decay) == (90, 256, 1e-4)
        assert cfg.trainer.lr_warmup_epochs == 5
    else:
        assert (epochs, cfg.trainer.batch_size, cfg.trainer.weight_decay) == (200, 128, 5e-4)
    # warm-up ~10% of the run, boundary ramp ends at ~60%
    assert cfg.schedule.warmup_epochs == round(0.1 * epochs)
    assert cfg.schedule.end_epoch == round(0.6 * epochs)


def test_the_default_mode_is_local() -> None:
    assert compose(["+experiment=cifar100_vgg16_bn"]).mode == "local"


def test_command_line_overrides_win_over_the_experiment() -> None:
    cfg = compose(["+experiment=cifar10_resnet18", "trainer.epochs=3", "local.lr=0.01",
                   "data.root=/somewhere"])
    assert (cfg.trainer.epochs, cfg.local.lr, cfg.data.root) == (3, 0.01, "/somewhere")
    # the README's multirun sweep values, one combination
    cfg = compose(["+experiment=cifar10_resnet18", "local.lr=1e-2", "schedule.kind=cosine"])
    assert (cfg.local.lr, cfg.schedule.kind, cfg.schedule.end_epoch) == (0.01, "cosine", 120)


@pytest.mark.parametrize("name", ["cifar10_resnet18", "imagenet_resnet50"])
def test_schedule_static_and_dynamic_both_compose(name: str) -> None:
    """`schedule=static,dynamic` sweeps: the experiment's static-ramp keys do not break dynamic."""
    dyn = compose([f"+experiment={name}", "schedule=dynamic"])
    static = compose([f"+experiment={name}", "schedule=static"])
    assert (dyn.schedule.name, static.schedule.name) == ("dynamic", "static")
    for cfg in (dyn, static):
        validate(cfg)
        assert cfg.schedule.warmup_epochs == round(0.1 * cfg.trainer.epochs)
        assert cfg.schedule.max_boundary == static.schedule.max_boundary >= 1


def test_cli_prints_the_job_config_of_an_experiment() -> None:
    """``launch/train.py +experiment=<name> --cfg job --resolve`` exits 0 (two experiments, in parallel)."""
    names = ["cifar10_resnet18", "imagenet_mobilenetv2"]
    procs = [
        subprocess.Popen([sys.executable, "launch/train.py", f"+experiment={n}", "--cfg", "job", "--resolve"],
                         cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for n in names
    ]
    for name, proc in zip(names, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"--cfg job timed out for {name}")
        assert proc.returncode == 0, err
        assert f"name: {name}_local" in out and "mode: local" in out
