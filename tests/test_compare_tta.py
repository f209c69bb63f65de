"""profiling/compare.py's time to accuracy, on fake clocks and fake accuracies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_profiler import _load_script

# (cpu s, wall s, accuracy %) per evaluation. sgd dips at 30 s and reaches 83 % only at 40 s; on the
# wall clock local is the slower one (a loaded machine), on the CPU clock the faster.
SGD = [(10, 11, 50.0), (20, 22, 70.0), (30, 33, 69.0), (40, 44, 85.0), (50, 55, 84.0)]
LOCAL = [(5, 20, 60.0), (12, 48, 80.0), (18, 72, 79.0), (24, 96, 83.0), (30, 120, 82.0)]


def _run(d: Path, mode: str, points: list[tuple[float, float, float]], evals: bool = True) -> Path:
    d.mkdir()
    if evals:
        rows = [{"kind": "eval", "epoch": 0, "global_step": 10 * (i + 1), "split": "test", "eval_acc": acc,
                 "train_cpu_s": cpu, "train_wall_s": wall, "train_device_s": None}
                for i, (cpu, wall, acc) in enumerate(points)]
        # An epoch row between them is not a point (its 99 % would move every crossing and the target).
        rows.insert(len(rows) - 1, {"epoch": 0, "test_acc": 99.0, "epoch_time_s": 1.0, "train_cpu_s": 1.0})
    else:  # a run without trainer.eval_every_steps: its epoch rows are its points
        rows = [{"epoch": i, "test_acc": acc, "epoch_time_s": 1.0, "train_cpu_s": cpu, "train_wall_s": wall}
                for i, (cpu, wall, acc) in enumerate(points)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"mode": mode, "rule": "softhebb"}))
    return d


@pytest.fixture
def compare():
    return _load_script("compare")


@pytest.mark.parametrize("evals", [True, False])
def test_time_to_the_common_target_on_the_cpu_clock(tmp_path, compare, capsys, evals):
    runs = [compare.load_dir(_run(tmp_path / "sgd", "sgd", SGD, evals)),
            compare.load_dir(_run(tmp_path / "local", "local", LOCAL, evals))]
    assert compare.common_target(runs, "cpu") == 83.0  # local's best; sgd reaches more
    rows = compare.time_to_target(runs, "cpu", None, tmp_path / "plots")
    assert [r["time_s"] for r in rows] == [40, 24]  # sgd: not 30 (69 % < 83 %); local: its 83 % point
    assert rows[0]["vs_sgd"] == 1.0 and rows[1]["vs_sgd"] == pytest.approx(40 / 24)
    assert (tmp_path / "plots" / "accuracy_vs_cpu_clock.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "time to 83.00 %" in out and "cpu clock" in out and "1.667" in out


def test_another_clock_and_an_explicit_target(tmp_path, compare):
    runs = [compare.load_dir(_run(tmp_path / "sgd", "sgd", SGD)),
            compare.load_dir(_run(tmp_path / "local", "local", LOCAL))]
    wall = compare.tta_rows(runs, "wall", 83.0)
    assert [r["time_s"] for r in wall] == [44, 96] and wall[1]["vs_sgd"] == pytest.approx(44 / 96)
    at70 = compare.tta_rows(runs, "cpu", 70.0)
    assert [r["time_s"] for r in at70] == [20, 12]
    assert [r["time_s"] for r in compare.tta_rows(runs, "cpu", 84.5)] == [40, None]  # local never reaches it
    assert compare.common_target(runs, "device") is None  # no device clock on CPU runs


def test_main_takes_clock_and_target(tmp_path, compare, capsys):
    a = _run(tmp_path / "sgd", "sgd", SGD)
    b = _run(tmp_path / "local", "local", LOCAL)
    compare.main([str(a), str(b), "--out", str(tmp_path / "p"), "--clock", "wall", "--target", "70"])
    out = capsys.readouterr().out
    assert "time to 70.00 % (--target) on the wall clock" in out
    assert (tmp_path / "p" / "accuracy_vs_wall_clock.png").stat().st_size > 0


def test_converged_table_times_each_target_per_variant_and_says_how_many_seeds_reach_it(tmp_path):
    table = _load_script("converged_table")
    (tmp_path / "long" / "sgd").mkdir(parents=True)
    (tmp_path / "long" / "local").mkdir()
    _run(tmp_path / "long" / "sgd" / "s0", "sgd", SGD)
    _run(tmp_path / "long" / "sgd" / "s1", "sgd", [(15, 15, 50.0), (30, 30, 72.0), (45, 45, 84.0)])
    _run(tmp_path / "long" / "local" / "s0", "local", LOCAL)
    text = table.targets_table(tmp_path, "cpu", [70.0, 84.5], ("long",))
    rows = text.splitlines()
    assert rows[0] == "| variant | seeds | cpu s to 70.00 % | cpu s to 84.50 % |"
    assert rows[2] == "| long/sgd | 2 | 25 ± 7 | 40 (1/2) |"  # 20 and 30 s; s1 never reaches 84.5 %
    assert rows[3] == "| long/local | 1 | 12 | – |"
