"""profiling/footprint_plot.py and distlocal/profiler/breakdown.py: the categories a user sees, from the
footprint keys, and compare.py's footprint_by_category.png (last epoch and --epoch N)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from distlocal.profiler.breakdown import SHOWN, from_row, split, table_rows

REPO = Path(__file__).resolve().parent.parent
CATS = ("param", "buffer", "grad", "optim", "activation", "temp", "local")


def _row(epoch: int, boundary: int) -> dict:
    """A metrics.jsonl row: category c of the run is (i+1)*100 (+ boundary), of the reference (i+1)*1000."""
    row = {"epoch": epoch, "boundary": boundary}
    for prefix, base in (("footprint", 100), ("footprint_ref", 1000)):
        vals = {c: (i + 1) * base + (boundary if base == 100 else 0) for i, c in enumerate(CATS)}
        row.update({f"{prefix}_{c}_bytes": v for c, v in vals.items()})
        row[f"{prefix}_bytes"] = sum(vals.values())
        row[f"{prefix}_local_buffer_bytes"] = 300 if base == 100 else 0
    return row


def _load_compare():
    spec = importlib.util.spec_from_file_location("_profiling_compare_fp", REPO / "profiling" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_breakdown_splits_the_buffer_out_of_local_and_keeps_the_total():
    """~0 s."""
    row = _row(2, 1)
    run, ref = from_row(row), from_row(row, ref=True)
    assert [k for k, _, _ in SHOWN] == list(run)
    assert run["local_buffer"] == 300 and run["local_temp"] == 701 - 300 and ref["local_buffer"] == 0
    assert sum(run.values()) == row["footprint_bytes"] and sum(ref.values()) == row["footprint_ref_bytes"]
    assert split({"local": 50}, 80)["local_buffer"] == 50  # never more than local itself
    assert from_row({"epoch": 0, "footprint_bytes": None}) is None
    (r_run, r_ref) = table_rows([row, {"epoch": 3}])  # an epoch without a footprint adds no row
    assert r_run[:3] == [2, 1, "run"] and r_ref[2] == "all-SGD ref"
    assert r_run[-1] == round(row["footprint_bytes"] / 2**20, 4)


def test_compare_writes_footprint_by_category_at_last_and_chosen_epoch(tmp_path: Path):
    """~2 s. Two fake runs; the bars hold the rows of the last epoch and of --epoch 0."""
    compare = _load_compare()
    plot = sys.modules["footprint_plot"]
    dirs = []
    for name, bounds in (("run_local", [0, 1, 2]), ("run_sgd", [0, 0, 0])):
        d = tmp_path / name
        d.mkdir()
        rows = [_row(e, b) for e, b in enumerate(bounds)]
        rows.append({"epoch": 3, "footprint_bytes": None})  # e.g. a profiler-off epoch: skipped
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(d))
    out = tmp_path / "plots"
    compare.main([*dirs, "--out", str(out), "--epoch", "0"])
    assert (out / plot.PNG).stat().st_size > 10_000
    runs = [compare.load_dir(Path(d)) for d in dirs]
    last, first = plot.bars(runs, None), plot.bars(runs, 0)
    assert [lbl.split("\n")[0] for lbl, _ in last] == ["run_local", "all-SGD ref", "run_sgd", "all-SGD ref"]
    assert last[0][1] == from_row(_row(2, 2)) and last[1][1] == from_row(_row(2, 2), ref=True)
    assert first[0][1] == from_row(_row(0, 0)) and "epoch 0, k=0" in first[0][0]
    assert plot.bars(runs, 7) == [("run_local", None), ("all-SGD ref", None),
                                  ("run_sgd", None), ("all-SGD ref", None)]
