"""A Hydra multirun sweep: one run directory and one wandb run per job, in one wandb group."""

from __future__ import annotations

import sys

from conftest import check_ok, run
from wandb_reader import records


def test_two_job_sweep_on_digits(tmp_path):
    sweep = tmp_path / "sweep"
    check_ok(
        run(
            [
                sys.executable,
                "launch/train.py",
                "-m",
                "trainer.epochs=1",
                "trainer.max_steps_per_epoch=3",
                "local.lr=1e-3,2e-3",
                "wandb.mode=offline",
                "wandb.group=sweep1",
                "trainer.progress=false",
                f"hydra.sweep.dir={sweep}",
            ],
            WANDB_MODE="offline",
        )
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    ids = set()
    for job in jobs:
        assert (job / "metrics.jsonl").read_text().count("\n") == 1
        (log,) = job.glob("wandb/offline-run-*/run-*.wandb")
        (rec,) = [r.run for r in records(log) if r.WhichOneof("record_type") == "run"]
        assert rec.run_group == "sweep1"
        ids.add(rec.run_id)
    assert len(ids) == 2
