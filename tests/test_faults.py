"""Faults where they hurt, each ending with nothing lost (2 gloo ranks, CPU, deterministic).

- A rank SIGKILLed inside the delta all-reduce: the peer's collective fails (the socket closes, or
  ``engine.timeout_s`` fires), ``torchrun --max-restarts=1`` restarts both, ``resume=auto``
  continues from the newest (mid-epoch) checkpoint, and the run ends bit-identical to an
  uninterrupted one.
- NaN and Inf in one rank's delta: the all-reduce spreads them to every rank, so every rank skips
  the same update (counted in ``skipped_updates``) and the replicas stay identical.

A checkpoint write failing part-way is in ``tests/test_checkpoint.py``. The faults are injected by
``tests/dist_worker.py`` (wrapping ``DeltaSync`` in the worker), never by the library.
"""

from __future__ import annotations

import json

import pytest
from conftest import WORKER, check_ok, torchrun
from test_resume import BASE, _assert_same_run, _rows

pytestmark = pytest.mark.dist

# 4 epochs of 6 steps; local from epoch 1, so sync calls 1-6 are epoch 1, 7-12 epoch 2, ...
FAULT = [*BASE, "checkpoint.every_steps=4", "engine.timeout_s=30"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    check_ok(torchrun([str(WORKER), str(out), *FAULT]))
    return out


def test_sigkill_in_the_delta_allreduce_restarts_and_loses_nothing(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    # Sync call 11 = epoch 2, step 4: after the step-16 checkpoint (epoch 2, step 3).
    proc = check_ok(torchrun([str(WORKER), str(killed), *FAULT], launcher=["--max-restarts=1"],
                             KILL_IN_SYNC="11"))
    out = proc.stdout + proc.stderr
    # last.pt, a link to step_00000016.pt: the mid-epoch checkpoint just before the kill.
    assert "resuming from" in out and "at epoch 2 step 4" in out, out[-3000:]
    assert [r["epoch"] for r in _rows(killed)] == [0, 1, 2, 3]
    _assert_same_run(uninterrupted, killed)  # weights and every non-timing metric, bit for bit


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
    assert [r["skipped_updates"] for r in _rows(uninterrupted)] == [0, 0, 0, 0]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # finite: the run went on normally
