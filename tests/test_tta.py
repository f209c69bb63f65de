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


def test_evaluation_time_stays_out_of_every_training_clock(monkeypatch, tmp_path):
    """A full run on fake clocks: a training step costs 1 s on the wall and the CPU clock, an
    evaluation 100 s. Epoch times, the cumulative clocks of each evaluation and the profiler's step
    time must hold the steps alone (the step-4 evaluation falls inside the profiler's timed window)."""
    from distlocal import trainer as trainer_mod
    from distlocal.config import compose
    from distlocal.parallel.ddp import DDPEngine
    from distlocal.profiler import timing
    from distlocal.profiler.clocks import TrainClocks
    from distlocal.trainer import Trainer, train

    clock = [0.0]

    def costs(fn, cost):  # noqa: ANN001, ANN202
        def inner(*a, **k):  # noqa: ANN002, ANN003, ANN202
            clock[0] += cost
            return fn(*a, **k)
        return inner

    monkeypatch.setattr(timing, "default_clock", lambda: clock[0])
    monkeypatch.setattr(trainer_mod, "TrainClocks",
                        lambda device: TrainClocks(device, cpu=lambda: clock[0], wall=lambda: clock[0]))
    monkeypatch.setattr(DDPEngine, "backward_step", costs(DDPEngine.backward_step, 1.0))
    monkeypatch.setattr(Trainer, "evaluate", costs(Trainer.evaluate, 100.0))
    cfg = compose(["model=convnet", "data=digits", "mode=sgd", "trainer.epochs=2", "trainer.batch_size=16",
                   "trainer.max_steps_per_epoch=8", "trainer.eval_every_steps=4", "profiler.sample_steps=1",
                   "wandb.mode=disabled", "trainer.progress=false", "checkpoint.enabled=false"])
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r.get("kind") != "eval"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [(r["epoch_time_s"], r["epoch_cpu_s"], r["train_cpu_s"]) for r in epochs] == \
        [(8, 8, 8), (8, 8, 16)]
    assert [(r["global_step"], r["train_cpu_s"], r["train_wall_s"]) for r in evals] == \
        [(4, 4, 4), (8, 8, 8), (12, 12, 12), (16, 16, 16)]
    assert epochs[0]["timed_steps"] == 5 and epochs[0]["step_time_s"] == 1.0  # steps 3..7, eval excluded
    assert summary["train_cpu_s"] == 16 and summary["time_to_final_acc_cpu_s"] in (4, 8, 12, 16)
    first = next(r for r in evals if r["eval_acc"] >= summary["tta_final_acc"])
    assert summary["time_to_final_acc_step"] == first["global_step"]
    assert [r["split"] for r in evals] == ["test"] * 4 and evals[-1]["eval_acc"] == epochs[-1]["test_acc"]
