"""LoCal+SGD on 2 gloo ranks: equivalence with one process, identical replicas, what is all-reduced."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import WORKER, check_ok, run, torchrun

from distlocal.models import build_model

pytestmark = pytest.mark.dist

# Small and quick: 6 steps an epoch, the boundary moves at epochs 1, 2 and 3.
COMMON = [
    "data=digits",
    "mode=local",
    "trainer.epochs=4",
    "trainer.batch_size=32",
    "trainer.max_steps_per_epoch=6",
    "trainer.deterministic=true",
    "schedule.warmup_epochs=1",
    "wandb.mode=disabled",
    "trainer.progress=false",
    "local.lr=1e-2",
]


def _rows(out):
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    return torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def nobn_runs(tmp_path_factory):
    """The same BN-free LoCal run on 1 process (whole batch) and on 2 ranks (half each)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    args = [*COMMON, "model=convnet_nobn"]
    check_ok(run([sys.executable, str(WORKER), str(one), *args], timeout=300))
    check_ok(torchrun([str(WORKER), str(two), *args], timeout=300))
    return one, two


def test_two_ranks_equal_one_process_on_the_whole_batch(nobn_runs):
    one, two = nobn_runs
    bounds = [r["boundary"] for r in _rows(two)]
    assert bounds == [r["boundary"] for r in _rows(one)]
    assert len(set(bounds)) >= 3, bounds  # the boundary moved at least twice
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    # Relative to the whole model (zero-initialised biases make per-tensor ratios meaningless),
    # and no single value off by more than float32 summation-order noise.
    a = torch.cat([w1[k].double().reshape(-1) for k in w1])
    b = torch.cat([w2[k].double().reshape(-1) for k in w1])
    assert float((a - b).norm() / a.norm()) < 1e-5
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5, msg=k)


def test_nobn_replicas_identical_after_every_epoch(nobn_runs):
    diffs = json.loads((nobn_runs[1] / "replicas.json").read_text())
    assert diffs == [0.0] * 4


@pytest.fixture(scope="module")
def bn_runs(tmp_path_factory):
    """A BatchNorm model on 2 ranks with sync_every=1 and sync_every=4 (8 steps an epoch)."""
    outs = {}
    for k in (1, 4):
        out = tmp_path_factory.mktemp(f"bn_sync{k}")
        check_ok(
            torchrun(
                [
                    str(WORKER),
                    str(out),
                    *COMMON,
                    "model=convnet",
                    "trainer.max_steps_per_epoch=8",
                    "profiler.enabled=false",  # bytes and replicas: the profiler is not under test
                    f"local.sync_every={k}",
                ],
                timeout=300,
            )
        )
        outs[k] = out
    return outs


def test_bn_replicas_identical_after_every_epoch_with_sync_every_4(bn_runs):
    for k, out in bn_runs.items():
        assert json.loads((out / "replicas.json").read_text()) == [0.0] * 4, k


def test_grad_allreduce_bytes_is_the_suffix_and_falls_with_the_boundary(nobn_runs):
    rows = _rows(nobn_runs[1])
    model = build_model("convnet_nobn", (3, 32, 32), 10)
    for r in rows:
        suffix = sum(p.numel() * 4 for s in model.stages[r["boundary"] :] for p in s.parameters())
        # DDP may pad a bucket; allow one bucket's alignment slack.
        assert suffix <= r["grad_allreduce_bytes"] <= suffix + 1024, (
            r["boundary"],
            r["grad_allreduce_bytes"],
        )
    seq = [r["grad_allreduce_bytes"] for r in rows]
    assert all(b < a for a, b in zip(seq, seq[1:])), seq


def test_delta_sync_bytes_fall_with_sync_every(bn_runs):
    r1, r4 = _rows(bn_runs[1]), _rows(bn_runs[4])
    for a, b in zip(r1, r4):
        if a["boundary"] == 0:
            assert a["delta_sync_bytes"] == b["delta_sync_bytes"] == 0
        else:
            assert b["delta_sync_bytes"] == pytest.approx(a["delta_sync_bytes"] / 4)


@pytest.fixture(scope="module")
def lever_runs(tmp_path_factory):
    """BN-free 2-rank runs, 8 steps an epoch: the plain run, update_every=4, bf16 delta transport."""
    outs = {}
    levers = {"base": [], "every4": ["local.update_every=4"], "bf16": ["local.sync_dtype=bf16"]}
    for name, extra in levers.items():
        out = tmp_path_factory.mktemp(f"lever_{name}")
        args = [*COMMON, "model=convnet_nobn", "trainer.epochs=3", "trainer.max_steps_per_epoch=8",
                "profiler.enabled=false", *extra]
        check_ok(torchrun([str(WORKER), str(out), *args], timeout=300))
        outs[name] = out
    return outs


def test_update_every_4_sends_a_quarter_of_the_delta_bytes(lever_runs):
    base, every4 = _rows(lever_runs["base"]), _rows(lever_runs["every4"])
    assert [r["boundary"] for r in base] == [r["boundary"] for r in every4]
    assert any(r["boundary"] > 0 for r in base)
    for a, b in zip(base, every4):
        # Steps 0 and 4 of 8 compute a delta; the other six send nothing at all.
        assert b["delta_sync_bytes"] == pytest.approx(a["delta_sync_bytes"] / 4), a["boundary"]
    assert json.loads((lever_runs["every4"] / "replicas.json").read_text()) == [0.0] * 3


def test_bf16_sync_halves_the_delta_bytes_and_keeps_replicas_identical(lever_runs):
    base, bf16 = _rows(lever_runs["base"]), _rows(lever_runs["bf16"])
    for a, b in zip(base, bf16):
        if a["boundary"] == 0:
            assert a["delta_sync_bytes"] == b["delta_sync_bytes"] == 0
            continue
        # No BN in the prefix: the buffer is the deltas plus the two fp32 loss slots (8 bytes).
        assert b["delta_sync_bytes"] - 8 == pytest.approx((a["delta_sync_bytes"] - 8) / 2)
    assert json.loads((lever_runs["bf16"] / "replicas.json").read_text()) == [0.0] * 3
    w32, w16 = _weights(lever_runs["base"]), _weights(lever_runs["bf16"])
    a = torch.cat([w32[k].double().reshape(-1) for k in w32])
    b = torch.cat([w16[k].double().reshape(-1) for k in w32])
    drift = float((a - b).norm() / a.norm())
    print(f"bf16 vs fp32 delta transport: relative weight difference {drift:.3e} after "
          f"{sum(r['boundary'] > 0 for r in base)} local epochs")  # the figure in docs/profiling.md
    assert 0 < drift < 1e-2  # rounded, not another run


def test_two_ranks_equal_one_process_with_sample_fraction_and_chunking(tmp_path_factory):
    """Per-rank batch 16, fraction 0.5: each rank's leading 8 are the global batch's leading 16
    (the sampler interleaves the ranks); chunks of 3 samples leave an uneven last chunk."""
    one, two = tmp_path_factory.mktemp("frac_one"), tmp_path_factory.mktemp("frac_two")
    args = [*COMMON, "model=convnet_nobn", "trainer.epochs=3", "local.sample_fraction=0.5",
            "local.chunk_size=3", "profiler.enabled=false"]
    check_ok(run([sys.executable, str(WORKER), str(one), *args], timeout=300))
    check_ok(torchrun([str(WORKER), str(two), *args], timeout=300))
    assert any(r["boundary"] > 0 for r in _rows(two))
    w1, w2 = _weights(one), _weights(two)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5, msg=k)
