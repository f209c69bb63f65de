"""A real offline wandb run (no mocking): its history holds the per-epoch keys."""

from __future__ import annotations

import json

from wandb_reader import finished_log, history

from distlocal.config import compose
from distlocal.trainer import train


def test_offline_run_history_holds_per_epoch_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose(
        [
            "model=convnet",
            "data=digits",
            "mode=local",
            "trainer.epochs=3",
            "trainer.max_steps_per_epoch=4",
            "schedule.warmup_epochs=1",
            "wandb.mode=offline",
            "wandb.group=g1",
            "trainer.progress=false",
        ]
    )
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir)
    rows = [r for r in history(run_dir) if "test/test_acc" in r]
    assert len(rows) == 3
    for key in (
        "train/train_loss",
        "test/test_acc",
        "local/boundary",
        "mem/activation_bytes",
        "mem/activation_reduction",
        "mem/footprint_bytes",
        "mem/footprint_reduction",
        "time/step_time_s",
        "time/speedup",
        "comm/grad_allreduce_bytes",
    ):
        assert all(key in r for r in rows), key
    assert [r["local/boundary"] for r in rows] == [0, 1, 2]
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["test/test_acc"] for r in rows] == [r["test_acc"] for r in local]  # same rows as the jsonl
    _, recs = finished_log(run_dir)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "g1" and "mode:local" in run.tags and "world:1" in run.tags
    summaries = [r.summary for r in recs if r.WhichOneof("record_type") == "summary"]
    final = {it.key: json.loads(it.value_json) for s in summaries for it in s.update}
    assert final["final_test_acc"] == summary["final_test_acc"]
