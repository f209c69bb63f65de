"""profiling/fashion.sh and its summarizer profiling/fashion_table.py, on tiny fake runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def _load_table():
    path = REPO / "profiling" / "fashion_table.py"
    spec = importlib.util.spec_from_file_location("_profiling_fashion_table", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fake(root: Path, model: str, variant: str, seed: int, acc: float, e2e: float, extra: dict) -> None:
    d = root / model / variant / f"s{seed}"
    d.mkdir(parents=True)
    mode = variant.split("_")[0]
    rows = [{"epoch": e, "test_acc": acc - 2 + e, "epoch_time_s": 1.0, "boundary": 0 if mode == "sgd" else e,
             "grad_allreduce_bytes": 1000.0 - 100 * e, "delta_sync_bytes": 10.0 * e,
             "local_lr": 1e-3 * (e > 0) if mode == "local" else 0.0, "ws_backoffs": 0} for e in range(3)]
    if mode == "local":
        rows[-1]["auto_frozen"] = [1, 0]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({
        "final_test_acc": acc, "best_test_acc": acc + 0.5, "end_to_end_s": e2e, "mode": mode,
        "train_loop_s": e2e - 10,
        "rule": "softhebb", **extra}))
    (d / "config.yaml").write_text(f"model: {model}\nmode: {mode}\n")


def test_table_means_stds_dashes_and_section_replacement(tmp_path: Path) -> None:
    table = _load_table()
    runs = tmp_path / "runs"
    for seed, (acc, e2e) in enumerate([(80.0, 100.0), (82.0, 110.0)]):
        _fake(runs, "convnet", "sgd", seed, acc, e2e, {})
        _fake(runs, "convnet", "local", seed, acc - 1, e2e / 2, {"footprint_bytes": 2**21})
    doc = tmp_path / "results.md"
    doc.write_text(f"# head\n\n{table.BEGIN}\nold\n{table.END}\n\ntail\n")
    text = table.main([str(runs), "--doc", str(doc), "--plots", str(tmp_path / "plots"),
                       "--order", "sgd", "local"])
    sgd = next(line for line in text.splitlines() if line.startswith("| sgd |"))
    local = next(line for line in text.splitlines() if line.startswith("| local |"))
    cells = [c.strip() for c in sgd.split("|")[1:-1]]
    assert cells[1] == "2" and cells[2] == "81.00 ± 1.41" and cells[3] == "81.50 ± 1.41"
    assert cells[4] == "105.0 ± 7.1" and cells[5] == "1.000"
    assert cells[6] == "95.0 ± 7.1" and cells[7] == "1.000"  # the loops without the profiler's overhead
    assert cells[9] == "–" and cells[10] == "–"  # no footprint recorded: a dash, not a number
    lcells = [c.strip() for c in local.split("|")[1:-1]]
    assert lcells[5] == "2.000" and lcells[7] == f"{95 / 42.5:.3f}"
    assert lcells[9] == "2.0 ± 0.0" and lcells[14] == "1.0 ± 0.0"
    assert lcells[11] == "900 ± 0" and lcells[12] == "10 ± 0"  # bytes: mean per step over the epochs
    assert "| local | 0.0e+00 1.0e-03 1.0e-03 | [1, 0] |" in text
    for png in ("accuracy_vs_wall_time.png", "boundary_vs_epoch.png"):
        assert (tmp_path / "plots" / "convnet" / png).stat().st_size > 0
    body = doc.read_text()
    assert body.startswith("# head") and body.rstrip().endswith("tail") and "old" not in body
    table.main([str(runs), "--doc", str(doc), "--plots", str(tmp_path / "plots")])
    assert doc.read_text().count(table.BEGIN) == 1  # rewritten in place, not appended again


def test_no_finished_run_is_an_error(tmp_path: Path) -> None:
    table = _load_table()
    (tmp_path / "runs" / "convnet" / "sgd" / "s0").mkdir(parents=True)  # no summary.json: unfinished
    with pytest.raises(SystemExit, match="no finished run"):
        table.main([str(tmp_path / "runs"), "--doc", str(tmp_path / "d.md"), "--plots", str(tmp_path)])


def test_fashion_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(REPO / "profiling" / "fashion.sh")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
