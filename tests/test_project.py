"""profiling/project.py: the α-β projection of sgd / local / freeze to many GPUs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO

BENCH = REPO / "docs" / "bench" / "bench_resnet18_b1024.json"


def _load() -> ModuleType:
    name = "_profiling_project"
    spec = importlib.util.spec_from_file_location(name, REPO / "profiling" / "project.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


project = _load()


@pytest.fixture(scope="module")
def bench() -> dict:
    return json.loads(BENCH.read_text())


@pytest.fixture(scope="module")
def volumes() -> dict:
    return {b: project.model_volumes("resnet18", (3, 32, 32), 10, b) for b in (0, 4)}


def _rows(bench: dict, volumes: dict, sync_every: int = 1, gpus=(8, 64, 1024)) -> dict:
    rows = project.project(bench, volumes, 4, gpus, 100.0, 10.0, sync_every)
    return {(r.gpus, r.mode): r for r in rows}


def test_sgd_all_reduces_every_parameter(bench: dict, volumes: dict) -> None:
    import torch

    from distlocal.models import build_model

    model = build_model("resnet18", (3, 32, 32), 10)
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert volumes[0].all_grad_bytes == all_bytes and volumes[0].suffix_grad_bytes == all_bytes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for n in (8, 64, 1024):
        assert _rows(bench, volumes)[(n, "sgd")].allreduce_bytes == all_bytes


def test_volumes_split_at_the_boundary(volumes: dict) -> None:
    v = volumes[4]
    assert v.suffix_grad_bytes + v.prefix_param_bytes == v.all_grad_bytes
    assert 0 < v.prefix_param_bytes < v.suffix_grad_bytes
    # The delta buffer: prefix conv/linear deltas + BN running stats (as many as BN affine params)
    # + two fp32 loss slots — the size of the prefix parameters, plus 8 bytes.
    assert v.delta_sync_bytes == v.prefix_param_bytes + 8


def test_freeze_sends_less_than_local_and_local_with_sync_every_1_as_much_as_sgd(
        bench: dict, volumes: dict) -> None:
    rows = _rows(bench, volumes, sync_every=1)
    for n in (8, 64, 1024):
        sgd, local, freeze = (rows[(n, m)].allreduce_bytes for m in ("sgd", "local", "freeze"))
        assert freeze < local
        # prefix deltas replace prefix gradients: no saving in bytes at sync_every=1
        assert local == pytest.approx(sgd, rel=1e-6)


def test_local_with_sync_every_4_sends_less_than_sgd(bench: dict, volumes: dict) -> None:
    rows = _rows(bench, volumes, sync_every=4)
    v = volumes[4]
    for n in (8, 1024):
        local = rows[(n, "local")].allreduce_bytes
        assert local == pytest.approx(v.suffix_grad_bytes + v.delta_sync_bytes / 4)
        assert rows[(n, "freeze")].allreduce_bytes < local < rows[(n, "sgd")].allreduce_bytes


def test_time_grows_with_n_through_the_latency_term(bench: dict, volumes: dict) -> None:
    gpus = (8, 16, 32, 64, 128, 256, 512, 1024)
    rows = _rows(bench, volumes, gpus=gpus)
    for mode in project.MODES:
        comm = [rows[(n, mode)].comm_s for n in gpus]
        steps = [rows[(n, mode)].step_s for n in gpus]
        assert comm == sorted(comm) and comm[0] < comm[-1]
        assert steps == sorted(steps)
        assert all(rows[(n, mode)].compute_s == rows[(8, mode)].compute_s for n in gpus)  # weak scaling
        assert all(r.step_s == pytest.approx(r.compute_s + r.comm_s) for r in rows.values())
    # With no bandwidth term left, the growth is exactly the latency term 2(N-1)α per all-reduce.
    alpha = 10e-6
    t8 = project.ring_allreduce_s(0.0, 8, alpha, 1e9)
    assert t8 == 0.0
    assert project.ring_allreduce_s(1, 1024, alpha, 1e30) - project.ring_allreduce_s(1, 8, alpha, 1e30) \
        == pytest.approx(2 * (1023 - 7) * alpha)


def test_ring_formula() -> None:
    beta = 100e9 / 8
    t = project.ring_allreduce_s(1e9, 16, 10e-6, beta)
    assert t == pytest.approx(2 * 15 * 10e-6 + 2 * 15 / 16 * 1e9 / beta)
    assert project.ring_allreduce_s(1e9, 1, 10e-6, beta) == 0.0


def test_sgd_row_does_not_depend_on_the_boundary(bench: dict, volumes: dict) -> None:
    rows = _rows(bench, volumes)
    assert rows[(8, "sgd")].boundary == 0 and rows[(8, "local")].boundary == 4
    assert rows[(8, "sgd")].compute_s == bench["rows"][0]["sgd_s"]


def test_cli_prints_the_banner_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    assert project.main([str(BENCH), "--boundary", "4", "--sync-every", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PROJECTION, not a measurement" in text and "allreduce_bytes" in text
    data = json.loads(out.read_text())
    assert data["note"] == "PROJECTION, not a measurement" and data["boundary"] == 4
    assert len(data["rows"]) == 8 * 3  # N = 8..1024, three modes
    assert {r["gpus"] for r in data["rows"]} == {8, 16, 32, 64, 128, 256, 512, 1024}
    assert set(data["rows"][0]) == {"gpus", "mode", "boundary", "compute_s", "comm_s", "step_s",
                                    "allreduce_bytes"}


def test_cli_rejects_a_boundary_the_bench_lacks(capsys: pytest.CaptureFixture) -> None:
    assert project.main([str(BENCH), "--boundary", "42"]) == 2
    assert "boundary 42" in capsys.readouterr().err
