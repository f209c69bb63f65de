"""profiling/bench.py on tiny inputs: the JSON is complete, the footprints are measured, and the
timed windows hold whole lever periods."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_profiler import _load_script

VARIANTS = ("sgd", "local", "frozen", "ideal")
TINY = ["--model", "convnet", "--data-shape", "3,16,16", "--batch-size", "8", "--device", "cpu",
        "--threads", "1"]


@pytest.fixture
def bench():
    threads = torch.get_num_threads()
    yield _load_script("bench")
    torch.set_num_threads(threads)  # one thread: steady on a loaded machine


def test_bench_tiny_json(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--steps", "2", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["model"] == "convnet" and doc["device"] == "cpu" and doc["batch_size"] == 8
    assert doc["precision"] == "32" and doc["threads"] == 1 and doc["period"] == 1
    assert doc["command"].startswith("profiling/bench.py --model convnet")
    assert [r["boundary"] for r in doc["rows"]] == list(range(7))  # convnet: 6 conv stages + classifier
    for r in doc["rows"]:
        expect = {"boundary", "local_local_bytes"}
        expect |= {f"{v}_{k}" for v in VARIANTS for k in ("s", "act_bytes", "peak_bytes")}
        assert set(r) == expect
        assert all(isinstance(r[f"{v}_s"], float) and r[f"{v}_s"] > 0 for v in VARIANTS)
        assert all(isinstance(r[f"{v}_peak_bytes"], int) and r[f"{v}_peak_bytes"] > 0 for v in VARIANTS)
    rows = doc["rows"]
    acts = [r["local_act_bytes"] for r in rows]
    assert acts[0] == rows[0]["sgd_act_bytes"]
    assert all(a > b for a, b in zip(acts, acts[1:]))  # every stage made local frees activations
    # The frozen and ideal steps keep the same activations as the local one: only the rule differs.
    assert all(r["frozen_act_bytes"] == r["ideal_act_bytes"] == r["local_act_bytes"] for r in rows)
    # A local prefix holds neither gradients nor optimizer state: its peak is below all-SGD's.
    assert rows[-1]["local_peak_bytes"] < rows[-1]["sgd_peak_bytes"]
    assert rows[0]["local_local_bytes"] == 0 < rows[-1]["local_local_bytes"]  # the rule's temporaries
    table = capsys.readouterr().out
    for col in ("sgd/local", "local/frozen", "local/ideal", "peak_local"):
        assert col in table


def test_bench_times_whole_lever_periods(bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With update_every=2, sync_every=3 every timed window is 6 steps from a multiple of 6, and the
    reported per-step figure is the window over 6 (a fake clock counts the steps a window ran)."""
    steps: list[int] = []
    real = bench.train_step

    def counting(*a, **kw):
        steps.append(a[3])  # train_step(parts, x, y, step)
        return real(*a, **kw)

    def fake_timer(device, clock="wall"):
        def run(fn):
            first = len(steps)
            fn()
            window = steps[first:]
            assert window[0] % 6 == 0 and window == list(range(window[0], window[0] + 6)), window
            return float(len(window))
        return run

    monkeypatch.setattr(bench, "train_step", counting)
    monkeypatch.setattr(bench, "timer", fake_timer)
    out = tmp_path / "b.json"
    bench.main([*TINY, "--steps", "2", "--boundaries", "0,3", "--update-every", "2", "--sync-every", "3",
                "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["period"] == 6
    for r in doc["rows"]:
        assert all(r[f"{v}_s"] == 1.0 for v in VARIANTS)  # 6 steps / 6


def test_bench_bf16_autocast_runs(bench, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    bench.main([*TINY, "--steps", "1", "--boundaries", "3", "--precision", "bf16", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["precision"] == "bf16"
    r32 = bench.main([*TINY, "--steps", "1", "--boundaries", "3"])["rows"][0]
    # Autocast is in force: the saved tensors differ (bf16 activations plus bf16 weight copies).
    assert doc["rows"][0]["local_act_bytes"] != r32["local_act_bytes"]
    assert all(doc["rows"][0][f"{v}_peak_bytes"] > 0 for v in VARIANTS)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
