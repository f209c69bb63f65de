"""The whole training step reads no device value on the host in steady state (issue 20).

A Trainer is built in-process and N steady-state steps (``Trainer.train_step``) run with the
accelerator code paths forced (:func:`distlocal.hostsync.force_accelerator_paths`); every host
read is counted (:class:`distlocal.hostsync.HostReadCounter`). Allowed: one read of the accumulated
loss per ``trainer.log_every`` steps and one auto-freeze check per ``local.auto_freeze.check_every``
syncs. Covered: 1 process and the multi-rank code path (a 1-rank gloo group: DDP's wrapper and the
delta all-reduce run), DDP and DeepSpeed, local / freeze / sgd, and the levers.

The step used to read ``float(loss)`` on every step (8 reads in 8 steps here): this test failed
on that code. The loss now accumulates on the device and is read every ``trainer.log_every`` steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from distlocal.config import compose
from distlocal.hostsync import HostReadCounter, force_accelerator_paths
from distlocal.parallel.env import DistEnv
from distlocal.trainer import Trainer

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOG_EVERY, CHECK_EVERY, WARM, STEPS = 4, 4, 3, 8
TINY = ["data=synthetic", "data.shape=[3,16,16]", "data.num_classes=4", "data.train_size=128",
        "data.test_size=8", "model=convnet", "trainer.epochs=1", "trainer.batch_size=8",
        "trainer.progress=false", "trainer.device=cpu", "wandb.mode=disabled", "profiler.enabled=false",
        "checkpoint.enabled=false", f"trainer.log_every={LOG_EVERY}",
        f"local.auto_freeze.check_every={CHECK_EVERY}", "local.auto_freeze.threshold=0"]
CASES = {
    "local": ["mode=local"], "freeze": ["mode=freeze"], "sgd": ["mode=sgd"],
    "levers": ["mode=local", "local.sync_every=2", "local.update_every=2", "local.sample_fraction=0.5",
               "local.chunk_size=2"],
    "bf16": ["mode=local", "trainer.precision=bf16"],
}


def _count_steady_state(trainer: Trainer) -> tuple[HostReadCounter, int]:
    """Reads of STEPS steady-state steps after WARM warm-up steps, at boundary 2 (mode local/freeze)."""
    if trainer.cfg.mode != "sgd":
        trainer.move_boundary(2)
    batches = [next(iter(trainer.data.train)) for _ in range(WARM + STEPS)]  # the loader is host work
    feed = iter(batches)
    with force_accelerator_paths():
        for step in range(WARM):
            trainer.train_step(step, feed)
        calls_before = trainer.sync.calls
        with HostReadCounter() as counter:
            for step in range(WARM, WARM + STEPS):
                trainer.train_step(step, feed)
    return counter, max(trainer.sync.calls - calls_before, STEPS // trainer.cfg.local.sync_every)


def _assert_scheduled_reads_only(counter: HostReadCounter, syncs: int) -> None:
    allowed = math.ceil(STEPS / LOG_EVERY) + math.ceil(syncs / CHECK_EVERY)
    assert counter.total <= allowed, f"{counter.total} reads > {allowed}: {counter.where}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_one_process_step_reads_only_at_scheduled_points(tmp_path, case: list[str]) -> None:
    trainer = Trainer.build(compose([*TINY, *case]), tmp_path / "run", ENV)
    _assert_scheduled_reads_only(*_count_steady_state(trainer))


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_multi_rank_step_reads_only_at_scheduled_points(tmp_path, monkeypatch, one_rank_group,
                                                         engine: str) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
        # What a launcher sets; DeepSpeed's engine asserts on it even over an existing group.
        for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
            monkeypatch.setenv(k, v)
    cfg = compose([*TINY, f"engine={engine}", "mode=local", "local.sync_every=2", "local.sync_async=true"])
    trainer = Trainer.build(cfg, tmp_path / "run", one_rank_group)
    _assert_scheduled_reads_only(*_count_steady_state(trainer))
