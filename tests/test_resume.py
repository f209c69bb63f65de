"""Reliability: exact resume, corrupt checkpoints, numeric guard, clear errors (faults: test_faults.py)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import WORKER, check_ok, run, torchrun

from distlocal import checkpoint
from distlocal.config import compose
from distlocal.errors import ConfigError
from distlocal.trainer import TrainingDiverged, train

BASE = ["data=digits", "model=convnet", "mode=local", "trainer.epochs=4", "trainer.batch_size=32",
        "trainer.max_steps_per_epoch=6", "trainer.deterministic=true", "schedule.warmup_epochs=1",
        "wandb.mode=disabled", "trainer.progress=false", "resume=auto"]
# The same without the profiler (its all-SGD reference steps add ~40 % to these 6-step epochs), for
# tests elsewhere whose subject is not it; this file's exact-resume tests run BASE, profiler on.
QUIET = [*BASE, "profiler.enabled=false"]
# Wall-clock and process-memory readings differ between any two runs; everything else must not.
MEASURED = {"epoch_time_s", "samples_per_s", "step_time_s", "rebuild_ms", "sync_ms", "step_time_ref_s",
            "speedup", "peak_rss_bytes", "rss_bytes", "profiler_overhead_s",
            "cuda_max_allocated_bytes", "cuda_max_reserved_bytes", "nvml_used_bytes",
            "profiled_steps", "timed_steps", "reference_steps",  # a resumed epoch times fewer steps
            "epoch_cpu_s", "epoch_cpu_max_s", "epoch_device_s", "train_wall_s", "train_cpu_s",
            "train_cpu_max_s", "train_device_s"}  # the training clocks (distlocal/profiler/clocks.py)


def _rows(out):
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED and not k.startswith("phase_")} for r in rows]


def _model(out):
    return torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]


def _assert_same_run(a, b, entered_mid_epoch: int | None = None):
    """Same metrics rows (measured keys aside) and bit-identical final weights. In the epoch a
    resume entered mid-way (``entered_mid_epoch``) the footprint step is the one after the entry
    step, so it measures another step than the uninterrupted run's: its footprint keys are skipped."""
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        skip = {k for k in set(x) | set(y) if k.startswith("footprint")} if x["epoch"] == entered_mid_epoch \
            else set()
        diff = {k: (x.get(k), y.get(k)) for k in (set(x) | set(y)) - skip if x.get(k) != y.get(k)}
        assert not diff, (x["epoch"], diff)
    wa, wb = _model(a), _model(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _worker(out, *args, **env):
    return check_ok(run([sys.executable, str(WORKER), str(out), *args], timeout=300, **env))


def test_resume_at_epoch_end_is_exact(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _worker(full, *BASE)
    _worker(cut, *BASE, EXIT_AFTER_EPOCH="1")
    assert len(_rows(cut)) == 2
    _worker(cut, *BASE)
    assert [r["boundary"] for r in _rows(full)] == [0, 1, 2, 3]
    _assert_same_run(full, cut)


def _cut_mid_epoch_2(cut, *args) -> dict:
    """Run ``args`` into ``cut`` as if killed in epoch 2 after its last mid-epoch checkpoint:
    exit after epoch 2, drop its epoch-end checkpoint and metrics row, point ``last.pt`` at the
    newest mid-epoch file. Returns that checkpoint."""
    _worker(cut, *args, EXIT_AFTER_EPOCH="2")
    ckpts = cut / "run" / "checkpoints"
    (ckpts / "epoch_0002.pt").unlink()
    newest_mid = max(ckpts.glob("step_*.pt"))
    (ckpts / "last.pt").write_bytes(newest_mid.read_bytes())
    lines = (cut / "run" / "metrics.jsonl").read_text().splitlines()
    (cut / "run" / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if killed before the row
    return checkpoint.load(ckpts / "last.pt")


def test_resume_mid_epoch_is_exact(tmp_path):
    args = [*BASE, "checkpoint.every_steps=4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _worker(full, *args)
    assert _cut_mid_epoch_2(cut, *args)["mid_epoch"]
    _worker(cut, *args)
    _assert_same_run(full, cut)


@pytest.mark.dist
def test_two_rank_resume_is_exact(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    check_ok(torchrun([str(WORKER), str(full), *BASE]))
    check_ok(torchrun([str(WORKER), str(cut), *BASE], EXIT_AFTER_EPOCH="1"))
    check_ok(torchrun([str(WORKER), str(cut), *BASE]))
    _assert_same_run(full, cut)


def _tiny_run(tmp_path, *extra):
    cfg = compose([*BASE, "trainer.epochs=2", "trainer.deterministic=false", *extra])
    train(cfg, tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path):
    folder = _tiny_run(tmp_path)
    for name in ("last.pt", "epoch_0001.pt"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, state = checkpoint.find_resume("auto", tmp_path / "run")
    assert path.name == "epoch_0000.pt" and state["epoch"] == 0


def test_all_checkpoints_unreadable_is_a_clear_error(tmp_path):
    folder = _tiny_run(tmp_path)
    for f in folder.glob("*.pt"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="no readable checkpoint"):
        checkpoint.find_resume("auto", tmp_path / "run")


def test_divergence_stops_with_a_checkpoint(tmp_path):
    # A huge local rate blows the prefix up; every later delta is non-finite and skipped.
    cfg = compose([*BASE, "local.rule=oja", "local.lr=1e30", "local.max_skipped_in_a_row=3",
                   "trainer.max_steps_per_epoch=20", "trainer.deterministic=false"])
    with pytest.raises(TrainingDiverged, match="non-finite local updates in a row"):
        train(cfg, tmp_path / "run")
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["mid_epoch"] and state["learner"]["skipped_updates"] >= 4
    for v in state["model"].values():  # the skipped updates never reached the weights as NaN
        assert not torch.isnan(v.float()).any()


# ---- clear errors: one line, non-zero exit, the existing run directory untouched ---------
def _existing_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (run_dir / "config.yaml").write_text("model: previous\n")
    return run_dir


def _snapshot(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data=cifar10", "data.root=/nonexistent/cifar"], "data.root"),
        (["schedule.max_boundary=99"], "max_boundary"),
        (["local.rule=anti_hebb"], "local.rule"),
        (["resume=/etc/hostname"], "not a readable distlocal checkpoint"),
        ([], "already holds a run"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(tmp_path, overrides, needle):
    run_dir = _existing_run(tmp_path)
    before = _snapshot(run_dir)
    resume = [] if any(o.startswith("resume=") for o in overrides) or not overrides else ["resume=auto"]
    proc = run([sys.executable, "launch/train.py", "wandb.mode=disabled", f"hydra.run.dir={run_dir}",
                *resume, *overrides])
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlocal: error: ") and needle in lines[0], proc.stderr
    assert _snapshot(run_dir) == before


@pytest.mark.dist
def test_resume_on_another_world_size(tmp_path):
    """Saved by 2 ranks, resumed by 1 process: the sampler re-shards the same global batches."""
    out = tmp_path / "cut"
    check_ok(torchrun([str(WORKER), str(out), *QUIET], EXIT_AFTER_EPOCH="1"))
    proc = _worker(out, *QUIET)
    assert "saved by world size 2, now 1" in proc.stdout
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["boundary"] for r in rows] == [0, 1, 2, 3]
