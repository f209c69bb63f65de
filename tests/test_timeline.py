"""profiler.timeline (distlocal/profiler/timeline.py): the recorded curve peaks exactly at the measured
footprint, splits the delta buffer from the rule's temporaries, follows the phases; the CUDA
allocator trace is read as documented; a real run writes the PNG and JSON, and its wandb run holds
the footprint table (distlocal/profiler/breakdown.py)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn
from wandb_reader import finished_log

from distlocal.config import compose
from distlocal.profiler.breakdown import TABLE_COLUMNS, table_rows
from distlocal.profiler.footprint import local_scope, track_footprint
from distlocal.profiler.timeline import TimelineTracker, _phase_spans, _trace_bytes, stacked
from distlocal.trainer import train

B, D, H, C = 5, 7, 11, 3
F32 = 4


def test_timeline_peak_is_the_footprint_and_the_buffer_is_split_out():
    """~0.1 s. One SGD step with a 'local rule' temporary and a registered buffer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(B, D), torch.randint(C, (B,))
    buffer = torch.zeros(13)
    tracker = TimelineTracker("cpu")
    with track_footprint("cpu", (net,), (opt,), (buffer,), tracker=tracker) as fp:
        with local_scope():
            tmp = torch.ones(B, 17)  # the rule's temporary: local, not buffer
            del tmp
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert tracker.local_buffer == fp.local_buffer == 13 * F32
    assert fp.as_metrics()["footprint_local_buffer_bytes"] == 13 * F32
    cats = stacked({"samples": tracker.samples, "local_buffer": tracker.local_buffer})
    totals = [sum(v) for v in zip(*cats.values())]
    assert max(totals) == fp.total  # the same pass: the curve's peak is footprint_bytes
    assert max(cats["local_temp"]) == B * 17 * F32 and cats["local_temp"][-1] == 0
    assert set(cats["local_buffer"]) == {13 * F32}  # alive through the whole step
    assert [p for p, _, _ in _phase_spans(tracker.samples["phase"])] == ["forward", "backward", "optimizer"]


def test_cuda_trace_bytes_follow_alloc_and_free_completed():
    """~0 s. The allocator trace of torch.cuda.memory._snapshot, as documented: free_requested does
    not free yet, segment events are not tensor bytes."""
    trace = [{"action": "segment_alloc", "size": 2 << 20}, {"action": "alloc", "size": 512},
             {"action": "alloc", "size": 1024}, {"action": "free_requested", "size": 512},
             {"action": "free_completed", "size": 512}, {"action": "segment_free", "size": 2 << 20}]
    assert _trace_bytes(trace, 100) == [100, 612, 1636, 1124]


def test_timeline_run_writes_png_json_and_wandb_table(tmp_path, monkeypatch):
    """~15 s (loaded 2-core machine: 25 s). A local run, 2 epochs of 3 steps, boundary 1 at epoch 1."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose(["model=convnet", "data=digits", "mode=local", "trainer.epochs=2",
                   "trainer.max_steps_per_epoch=3", "schedule.warmup_epochs=1", "wandb.mode=offline",
                   "trainer.progress=false", "profiler.timeline=true", "profiler.reference_steps=1",
                   "checkpoint.enabled=false"])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    data = json.loads((run_dir / "memory_timeline.json").read_text())
    assert (run_dir / "memory_timeline.png").stat().st_size > 10_000
    assert data["boundary"] == rows[1]["boundary"] == 1 and data["device"] == "cpu"
    for which, key in (("run", "footprint_bytes"), ("reference", "footprint_ref_bytes")):
        cats = stacked(data[which])
        assert max(sum(v) for v in zip(*cats.values())) == rows[1][key], which
    # The wandb table: logged once at the end, the rows profiler.breakdown makes of metrics.jsonl.
    log, recs = finished_log(run_dir)
    paths = [json.loads(it.value_json) for r in recs if r.WhichOneof("record_type") == "history"
             for it in r.history.item if (it.key or "/".join(it.nested_key)) == "mem/footprint_table/path"]
    assert len(paths) == 1
    path = log.parent / "files" / paths[0]
    table = json.loads(path.read_text())
    assert table["columns"] == TABLE_COLUMNS
    assert table["data"] == table_rows(rows) and len(table["data"]) == 4  # 2 epochs x (run, ref)
