"""``DEVICE=cpu bash profiling/device_check.sh``: the tiny CPU version runs every part end to end."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, check_ok, run


# Over a minute (five Python processes, a training run and speedup_check.py): slow, out of
# `make test`; run with `pytest -m slow tests/test_device_check.py`.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_device_check_cpu_version_writes_every_part(tmp_path) -> None:
    out = tmp_path / "device"
    check_ok(run(["bash", str(REPO / "profiling" / "device_check.sh")], timeout=880,
                 DEVICE="cpu", OUT=str(out), PYTHON=sys.executable))
    summary = json.loads((out / "summary.json").read_text())
    assert sorted({r["boundary"] for r in summary["bench"]}) == [3, 6]  # convnet: mid and deepest
    assert all(r["local/ideal"] > 0 and r["sgd/local"] > 0 for r in summary["bench"])
    assert summary["train"]["speedup"] is not None and summary["speedup_check"] is not None
    syncs = summary["syncs"]
    assert syncs["steps"] == 4 and syncs["sync_warnings"] is None  # no sync debug mode on CPU
    assert set(summary["memory"]) == {"device", "local", "sgd"}
    assert (out / "summary.md").read_text().startswith("| run | boundary |")


def test_device_check_refuses_an_unknown_device(tmp_path) -> None:
    proc = run(["bash", str(REPO / "profiling" / "device_check.sh")], timeout=60, DEVICE="tpu",
               OUT=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distlocal: error: DEVICE=tpu; use DEVICE=cuda (default) or DEVICE=cpu"
