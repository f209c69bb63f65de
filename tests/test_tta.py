"""Time to accuracy (distlocal/tta.py) on fake clocks and fake accuracies: a wrong crossing fails."""

from __future__ import annotations

import json
import sys

from conftest import WORKER, check_ok, run
from test_resume import BASE, MEASURED

from distlocal import checkpoint
from distlocal.tta import TimeToAccuracy, first_crossing, grid, headline_part, with_time_to_accuracy

# (accuracy, step): the accuracy dips after 70.2 and crosses 80 only at 81.0 (80.5 comes later).
CURVE = [(42.0, 10), (70.2, 20), (69.0, 30), (81.0, 40), (79.9, 50), (80.5, 60)]


def _times(step: int) -> dict[str, float | None]:
    # Each clock its own rate, so taking the time of the wrong point on any clock shows.
    return {"train_wall_s": 3.0 * step, "train_cpu_s": 2.0 * step, "train_device_s": None}


def _run() -> TimeToAccuracy:
    t = TimeToAccuracy("test")
    for acc, step in CURVE:
        t.observe(acc, step, _times(step))
    return t


def test_first_crossing_is_the_first_point_at_or_above_the_target():
    pts = _run().points
    assert first_crossing(pts, 70.0)["step"] == 20
    assert first_crossing(pts, 70.2)["step"] == 20  # >=, not >
    assert first_crossing(pts, 70.3)["step"] == 40  # not 30: 69 % is below
    assert first_crossing(pts, 80.5)["step"] == 40
    assert first_crossing(pts, 81.01) is None


def test_grid_is_every_whole_point_up_to_the_best():
    assert grid(3.0) == [1.0, 2.0, 3.0]
    assert grid(2.99) == [1.0, 2.0]
    assert grid(0.5) == []


def test_summary_thresholds_and_final_accuracy_on_every_clock():
    s = _run().summary()
    table = s["time_to_acc"]
    assert sorted(table, key=float) == [str(i) for i in range(1, 82)]  # 81 % reached, 82 % not
    assert table["42"] == {"step": 10, "wall_s": 30.0, "cpu_s": 20.0, "device_s": None}
    assert table["43"]["step"] == 20 and table["70"]["cpu_s"] == 40.0
    assert table["71"] == {"step": 40, "wall_s": 120.0, "cpu_s": 80.0, "device_s": None}
    assert table["81"]["step"] == 40
    # The final accuracy (80.5 %, the last point) was first reached at step 40, not 60.
    assert s["tta_final_acc"] == 80.5 and s["tta_split"] == "test"
    assert (s["time_to_final_acc_step"], s["time_to_final_acc_cpu_s"], s["time_to_final_acc_wall_s"]) == \
        (40, 80.0, 120.0)
    assert s["time_to_final_acc_device_s"] is None


def test_state_round_trip_keeps_the_history():
    a = TimeToAccuracy("val")
    for acc, step in CURVE[:3]:
        a.observe(acc, step, _times(step))
    b = TimeToAccuracy("test")
    b.load_state_dict(a.state_dict())
    for acc, step in CURVE[3:]:
        b.observe(acc, step, _times(step))
    assert b.split == "val"
    full = _run().summary()
    assert b.summary()["time_to_acc"] == full["time_to_acc"]
    assert TimeToAccuracy("test").summary() == {}


def test_headline_part_is_the_cpu_clock():
    s = _run().summary()
    assert headline_part(s) == "80.50 % test at 80.0 s CPU (step 40)"
    line = with_time_to_accuracy("end-to-end 1.0 s", s)
    assert line == "end-to-end 1.0 s | 80.50 % test at 80.0 s CPU (step 40)"
    assert with_time_to_accuracy(None, {}) is None


def _jsonl(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED and not k.startswith("phase_")
             and not k.startswith("footprint")} for r in rows]


def _steps(summary: dict) -> dict:
    return {t: p["step"] for t, p in summary["time_to_acc"].items()}


def test_periodic_evaluation_and_time_to_accuracy_survive_a_mid_epoch_resume(tmp_path):
    """Evaluations every 4 steps, checkpoints every 4 steps, killed in epoch 2 after the step-16
    checkpoint: the resumed run writes the same evaluation rows (the evaluation draws no RNG the
    training sees) and the same time-to-threshold steps (carried in the checkpoint)."""
    args = [*BASE, "checkpoint.every_steps=4", "trainer.eval_every_steps=4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    check_ok(run([sys.executable, str(WORKER), str(full), *args], timeout=300))
    check_ok(run([sys.executable, str(WORKER), str(cut), *args], timeout=300, EXIT_AFTER_EPOCH="2"))
    ckpts = cut / "run" / "checkpoints"
    (ckpts / "epoch_0002.pt").unlink()
    (ckpts / "last.pt").write_bytes((ckpts / "step_00000016.pt").read_bytes())
    saved = checkpoint.load(ckpts / "last.pt")
    assert [p["step"] for p in saved["tta"]["points"]] == [4, 6, 8, 12, 16] and saved["clocks"]["cpu"] > 0
    check_ok(run([sys.executable, str(WORKER), str(cut), *args], timeout=300))
    a, b = _jsonl(full / "run"), _jsonl(cut / "run")
    evals = [r["global_step"] for r in a if r.get("kind") == "eval"]
    assert evals == [4, 6, 8, 12, 16, 18, 20, 24]  # every 4 steps and every epoch end (6 steps each)
    assert a == b
    sa, sb = (json.loads((d / "run" / "summary.json").read_text()) for d in (full, cut))
    assert _steps(sa) == _steps(sb) and sa["time_to_final_acc_step"] == sb["time_to_final_acc_step"]
    assert sb["train_cpu_s"] > saved["clocks"]["cpu"]
