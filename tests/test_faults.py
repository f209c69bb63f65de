"""Faults where they hurt, each ending with nothing lost (2 gloo ranks, CPU, deterministic).

- A rank SIGKILLed mid-step, inside the delta all-reduce: the peer's collective fails (the socket
  closes, or ``engine.timeout_s`` fires), ``torchrun --max-restarts=1`` restarts both,
  ``resume=auto`` continues from the newest (mid-epoch) checkpoint, and the run ends bit-identical
  to an uninterrupted one. Under DDP; under DeepSpeed ZeRO 2, in fp32 and in bf16; and with
  ``local.sync_async=true``, the rank dying with its all-reduce launched and not yet awaited.
- NaN and Inf in one rank's delta: the all-reduce spreads them to every rank, so every rank skips
  the same update (counted in ``skipped_updates``) and the replicas stay identical.
- A checkpoint write of a DeepSpeed ZeRO 2 run failing half-way with ENOSPC: every rank stops with
  the one line of ``launch/train.py`` and exit 3; ``last.pt`` still holds the previous checkpoint.

The DDP checkpoint write failing part-way is in ``tests/test_checkpoint.py`` and
``tests/test_cli.py``. docs/reliability.md lists every fault survived and its test. The faults are
injected by ``tests/dist_worker.py`` (wrapping ``DeltaSync`` and ``torch.save`` in the worker),
never by the library.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import WORKER, check_ok, torchrun
from test_resume import QUIET, _assert_same_run, _rows

from distlocal import checkpoint

pytestmark = pytest.mark.dist
_NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                   reason="deepspeed is not installed")

# 4 epochs of 6 steps; local from epoch 1, so sync calls 1-6 are epoch 1, 7-12 epoch 2, ...
FAULT = [*QUIET, "checkpoint.every_steps=4", "engine.timeout_s=30"]
# The shortest run with a kill worth the name: 2 epochs of 3 steps (SGD, then local from epoch 1:
# sync calls 1-3), a mid-epoch checkpoint at global step 4 (epoch 1, after its step 0).
SHORT = [*FAULT, "trainer.epochs=2", "trainer.max_steps_per_epoch=3", "checkpoint.every_steps=2"]
ZERO2 = [*SHORT, "engine=deepspeed", "engine.zero_stage=2"]
# name: (overrides, the sync call rank 1 dies in, where the restarted run resumes)
KILLS = {
    "ddp": (FAULT, 11, "at epoch 2 step 4"),  # epoch 2, step 4: after the step-16 checkpoint
    # ZeRO 2 in bf16 (epoch 1, step 1: after the step-4 checkpoint). Its fp32 twin is not run here:
    # the kill and restart path is the same, and fp32 ZeRO 2 resumes bit-exactly mid-epoch in
    # tests/test_deepspeed.py::test_resume_is_bit_exact; the suite's 12 minutes paid for it.
    "deepspeed_zero2_bf16": ([*ZERO2, "trainer.precision=bf16"], 2, "at epoch 1 step 1"),
    "sync_async": ([*SHORT, "local.sync_async=true"], 2, "at epoch 1 step 1"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``uninterrupted(name)``: the run directory of KILLS[name]'s config run without a fault,
    made once per module and shared by every test comparing against it."""
    done = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(f"full_{name}")
            check_ok(torchrun([str(WORKER), str(out), *KILLS[name][0]]))
            done[name] = out
        return done[name]

    return get


# A kill test runs its reference (bounded by 300 s) and the killed job (two attempts, 600 s); the
# first DeepSpeed start on a machine also JIT-builds a comm op (minutes on a loaded machine).
@pytest.mark.timeout(960)
@pytest.mark.parametrize("name", [n if n in ("ddp", "sync_async") else pytest.param(n, marks=_NO_DEEPSPEED)
                                  for n in KILLS])
def test_sigkill_mid_step_restarts_and_loses_nothing(tmp_path, uninterrupted, name):
    overrides, call, resumed_at = KILLS[name]
    killed = tmp_path / "killed"
    # Two attempts in one job: twice conftest's usual 300 s bound.
    proc = check_ok(torchrun([str(WORKER), str(killed), *overrides], launcher=["--max-restarts=1"],
                             timeout=600, KILL_IN_SYNC=str(call)))
    out = proc.stdout + proc.stderr
    # last.pt, a link to the mid-epoch checkpoint just before the kill.
    assert "resuming from" in out and resumed_at in out, out[-3000:]
    full = uninterrupted(name)
    assert [r["epoch"] for r in _rows(killed)] == [r["epoch"] for r in _rows(full)]
    _assert_same_run(full, killed)  # weights and every non-timing metric, bit for bit


def test_nan_and_inf_in_one_rank_delta_are_skipped_everywhere(tmp_path, uninterrupted):
    out = tmp_path / "bad"
    check_ok(torchrun([str(WORKER), str(out), *FAULT], BAD_DELTA="3:nan,9:inf"))
    for rank in (0, 1):
        seen = json.loads((out / f"bad_delta_rank{rank}.json").read_text())
        for n in ("3", "9"):
            assert seen[n]["unchanged"], (rank, n)  # no rank applied the poisoned average
            assert seen[n]["skipped_after"] == seen[n]["skipped_before"] + 1, (rank, n)
    assert json.loads((out / "replicas.json").read_text()) == [0.0] * 4  # replicas identical
    rows = _rows(out)
    assert [r["skipped_updates"] for r in rows] == [0, 1, 2, 2]  # cumulative: one in epoch 1, one in 2
    assert [r["skipped_updates"] for r in _rows(uninterrupted("ddp"))] == [0, 0, 0, 0]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # finite: the run went on normally


@_NO_DEEPSPEED
@pytest.mark.timeout(600)
def test_enospc_in_a_deepspeed_checkpoint_write_is_one_line_exit_3_on_every_rank(tmp_path):
    """ZeRO 2 on 2 ranks through ``launch/train.py``: the third checkpoint write (global step 4,
    mid-epoch 1; its optimizer state gathered from both ranks' partitions) fills the disk half-way.
    Every rank stops with the same one line and exit 3, nothing half-written stays, and ``last.pt``
    still holds the previous checkpoint (global step 3, the end of epoch 0), which loads."""
    run_dir = tmp_path / "run"
    # The ranks leave together (cli.die(every_rank=True)): the slow-rank test below
    # shows it at torchrun's default 0.1 s monitor interval. Here torchrun looks every 2 s, so the
    # few milliseconds between the two ranks' exits on a loaded 2-core CI box cannot matter.
    proc = torchrun([str(WORKER), "--launch", *ZERO2, f"hydra.run.dir={run_dir}"],
                    launcher=["--monitor-interval=2"], ENOSPC_IN_SAVE="3")
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("distlocal: error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-4000:]  # one line per rank
    assert "step_00000004.pt" in errors[0] and "No space left on device" in errors[0]
    assert "last.pt still holds the previous checkpoint" in errors[0] and "resume=auto" in errors[0]
    # torchrun's summary of the failed ranks: both exited 3 ...
    summary = proc.stderr[proc.stderr.index("Failures:"):]
    assert sorted(re.findall(r"^\s*rank\s*:\s*(\d)", summary, re.M)) == ["0", "1"], summary
    assert re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", summary, re.M) == ["3", "3"], summary
    # ... and neither raised: no traceback frame of the ranks' code (torchrun prints its own).
    assert not re.search(r'File "[^"]*(distlocal|launch|tests)/', proc.stderr), proc.stderr[-4000:]
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0000.pt", "last.pt", "step_00000002.pt"]
    state = checkpoint.load(folder / "last.pt")
    assert (state["epoch"], state["global_step"], state["mid_epoch"]) == (0, 3, False)
    assert state["engine"]["zero_stage"] == 2 and state["engine"]["optimizer"]["state"]


_SLOW_RANK_0 = """
import time
import torch.distributed as dist
from distlocal import cli
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    time.sleep(3)  # rank 0's teardown (wandb, DeepSpeed, the interpreter) running long under load
    print("rank 0 still running", flush=True)
cli.die("stopped with its state saved", code=3, every_rank=True)
"""


def test_ranks_stopping_on_the_same_error_all_exit_with_its_code_under_torchrun(tmp_path):
    """torchrun (default 0.1 s monitor interval) SIGTERMs the ranks still running once one has
    failed: with a plain ``sys.exit(3)`` the fast rank 1 exits at once and the slow rank 0 ends -15.
    ``cli.die(..., every_rank=True)`` makes rank 1 wait for rank 0, so both exit 3."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(_SLOW_RANK_0)
    proc = torchrun([str(script)])
    assert "rank 0 still running" in proc.stdout, proc.stderr[-4000:]
    assert proc.stderr.count("distlocal: error: stopped with its state saved") == 2, proc.stderr[-4000:]
    summary = proc.stderr[proc.stderr.index("Failures:"):]
    assert re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", summary, re.M) == ["3", "3"], summary
