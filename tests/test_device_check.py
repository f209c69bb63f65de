"""``DEVICE=cpu bash profiling/device_check.sh``: the tiny CPU version runs every part end to end."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, check_ok, run

# What every part writes (device_check.sh's header); the CPU version has no allocator snapshots.
PART_FILES = ["bench_convnet_b8_32_compile-off.json", "train.log", "train/summary.json",
              "train/metrics.jsonl", "speedup_check.json", "syncs.json", "memory.json", "summary.json",
              "summary.md"]


# About a minute of CPU time (five Python processes: bench, a training run, speedup_check.py's three
# short runs, the in-process parts); the timeout fails a hang, not a slow machine's run.
@pytest.mark.timeout(240)
def test_device_check_cpu_version_writes_every_part(tmp_path) -> None:
    out = tmp_path / "device"
    check_ok(run(["bash", str(REPO / "profiling" / "device_check.sh")], timeout=230,
                 DEVICE="cpu", OUT=str(out), PYTHON=sys.executable))
    missing = [f for f in PART_FILES if not (out / f).is_file()]
    assert not missing, f"parts wrote no file: {missing}"
    assert not list(out.glob("*.pickle"))  # no CUDA: no allocator snapshot
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"bench", "syncs", "memory", "speedup_check", "train", "targets"}
    assert sorted({r["boundary"] for r in summary["bench"]}) == [3, 6]  # convnet: mid and deepest
    assert all(r["local/ideal"] > 0 and r["sgd/local"] > 0 for r in summary["bench"])
    assert summary["train"]["speedup"] > 0
    assert [r["lever"] for r in summary["speedup_check"]["rows"]] == ["update_every=1"]
    syncs = summary["syncs"]
    # No sync debug mode on CPU: said so, and the steady-state window's host reads counted instead
    # (none: the scheduled reads fall outside it).
    assert syncs["steps"] == 4 and syncs["sync_warnings"] is None
    assert "not measured" in syncs["sync_debug_mode"]
    assert syncs["accelerator_paths_forced"] and syncs["host_reads"] == 0, syncs["host_read_sites"]
    memory = summary["memory"]
    assert "not measured" in memory["cuda"]
    for mode in ("local", "sgd"):
        assert memory[mode]["footprint_bytes"] > 0
        assert memory[mode]["max_memory_allocated"] is None and memory[mode]["snapshot"] is None
    # The local step holds no gradient for its local stages: a smaller footprint than SGD's.
    assert memory["local"]["footprint_bytes"] < memory["sgd"]["footprint_bytes"]
    # The targets are GPU targets: CPU rows are listed, not checked, and the summary says so.
    assert summary["targets"] == []
    md = (out / "summary.md").read_text()
    assert md.startswith("| run | boundary |") and "GPU targets not checked: no part ran on CUDA" in md


def test_device_check_refuses_an_unknown_device(tmp_path) -> None:
    proc = run(["bash", str(REPO / "profiling" / "device_check.sh")], timeout=60, DEVICE="tpu",
               OUT=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distlocal: error: DEVICE=tpu; use DEVICE=cuda (default) or DEVICE=cpu"
