"""Boundary selection: static schedules per epoch, the dynamic rule, resume, and helpers."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from distlocal.config import DynamicScheduleConfig, StaticScheduleConfig
from distlocal.errors import ConfigError
from distlocal.local.schedule import (
    DynamicSelector,
    StaticSchedule,
    build_schedule,
    relative_update,
    stage_weights,
)


def _static(num_stages: int, epochs: int, **kw) -> StaticSchedule:
    s = build_schedule(StaticScheduleConfig(**kw), num_stages=num_stages, epochs=epochs)
    assert isinstance(s, StaticSchedule)
    return s


@pytest.mark.parametrize(
    "kw, num_stages, epochs, expected",
    [
        # step: first local stage AT epoch W, then +step every `every` epochs, capped at C.
        (dict(kind="step", warmup_epochs=2, every=2, step=1), 4, 10, [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]),
        (dict(kind="step", warmup_epochs=2, every=1, step=2), 6, 6, [0, 0, 2, 4, 5, 5]),
        (dict(kind="step", warmup_epochs=0, every=1, step=1, max_boundary=2), 9, 5, [1, 2, 2, 2, 2]),
        # linear: 1 stage at W, C at E (= epochs-1), 1 + floor((C-1)(e-W)/(E-W)) in between.
        (dict(kind="linear", warmup_epochs=2), 6, 12, [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5]),
        (dict(kind="linear", warmup_epochs=1, end_epoch=3), 4, 6, [0, 1, 2, 3, 3, 3]),
        # cosine: same endpoints, eased progress (1 - cos(pi t)) / 2.
        (dict(kind="cosine", warmup_epochs=2), 6, 12, [0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 5]),
        # C = 1: one stage from the first post-warm-up epoch on.
        (dict(kind="linear", warmup_epochs=2), 2, 5, [0, 0, 1, 1, 1]),
        (dict(kind="cosine", warmup_epochs=1, max_boundary=0), 5, 4, [0, 0, 0, 0]),
        # end_epoch == W: jumps straight to C.
        (dict(kind="cosine", warmup_epochs=2, end_epoch=2), 4, 4, [0, 0, 3, 3]),
    ],
)
def test_static_schedules_per_epoch(kw: dict, num_stages: int, epochs: int, expected: list[int]) -> None:
    s = _static(num_stages, epochs, **kw)
    got = [s.boundary(e) for e in range(epochs)]
    assert got == expected


@pytest.mark.parametrize("kind", ["step", "linear", "cosine"])
@pytest.mark.parametrize("num_stages", [1, 2, 5, 9])
@pytest.mark.parametrize("epochs", [1, 3, 17, 40])
def test_static_monotone_capped_and_warm(kind: str, num_stages: int, epochs: int) -> None:
    for warm in (0, 1, 3):
        s = _static(num_stages, epochs, kind=kind, warmup_epochs=warm, every=2)
        b = [s.boundary(e) for e in range(epochs + 5)]
        assert all(x <= y for x, y in zip(b, b[1:])), b
        assert max(b) <= num_stages - 1
        assert all(v == 0 for v in b[:warm])
        if num_stages > 1 and warm < epochs:
            assert b[warm] >= 1, "the first post-warm-up epoch has a local stage"
        if kind != "step" and warm < epochs:
            assert b[epochs - 1] == num_stages - 1, "linear/cosine reach the cap at the last epoch"


def test_max_boundary_past_the_end_is_a_config_error() -> None:
    for cfg in (StaticScheduleConfig(max_boundary=4), DynamicScheduleConfig(max_boundary=4)):
        with pytest.raises(ConfigError) as e:
            build_schedule(cfg, num_stages=4, epochs=10)
        msg = str(e.value)
        assert "\n" not in msg
        assert msg == "schedule.max_boundary=4 is past the last non-classifier stage (4 stages: max is 3)"
    build_schedule(StaticScheduleConfig(max_boundary=3), num_stages=4, epochs=10)  # the last one is fine


def test_bad_schedule_configs() -> None:
    with pytest.raises(ConfigError, match="kind"):
        build_schedule(StaticScheduleConfig(kind="exp"), 4, 10)
    with pytest.raises(ConfigError, match="unknown schedule"):
        build_schedule(StaticScheduleConfig(name="random"), 4, 10)
    with pytest.raises(ConfigError, match="end_epoch"):
        build_schedule(StaticScheduleConfig(kind="linear", warmup_epochs=3, end_epoch=1), 4, 10)
    with pytest.raises(ConfigError, match="every"):
        build_schedule(StaticScheduleConfig(every=0), 4, 10)
    with pytest.raises(ConfigError, match="tau"):
        build_schedule(DynamicScheduleConfig(tau=1.5), 4, 10)
    with pytest.raises(ConfigError, match="patience"):
        build_schedule(DynamicScheduleConfig(patience=0), 4, 10)


# epoch:            0    1    2    3    4    5    6     7    8    9    10   11   12    13
SCRIPT_U = [1.0, 0.8, 0.6, 0.4, 0.2, 0.5, 0.25, 0.1, 0.3, 0.1, 0.1, 0.2, 0.01, 0.01]
# W=2: epochs 0,1 unused; u_ref=0.6 at epoch 2; ratios 0.67, 0.33 (1), 0.83 (reset), 0.42 (1),
# 0.17 (2 -> move to 1, ref cleared); ref 0.3 at 8; 0.33 (1), 0.33 (2 -> move to 2); ref 0.2 at 11;
# 0.05 (1), 0.05 (2 -> at cap 2: no move).
SCRIPT_BOUNDARY = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
SCRIPT_MOVED = [e in (7, 10) for e in range(14)]


def _selector(**kw) -> DynamicSelector:
    base = dict(warmup_epochs=2, tau=0.5, patience=2, step=1, max_boundary=2)
    base.update(kw)
    s = build_schedule(DynamicScheduleConfig(**base), num_stages=5, epochs=14)
    assert isinstance(s, DynamicSelector)
    return s


def test_dynamic_moves_exactly_by_the_rule() -> None:
    s = _selector()
    records = [s.observe(e, u) for e, u in enumerate(SCRIPT_U)]
    assert [r["boundary"] for r in records] == SCRIPT_BOUNDARY
    assert [r["moved"] for r in records] == SCRIPT_MOVED
    assert [r["u_ratio"] is None for r in records[:2]] == [True, True]
    assert records[2]["u_ratio"] == 1.0 and records[8]["u_ratio"] == 1.0 and records[11]["u_ratio"] == 1.0
    assert math.isclose(records[4]["u_ratio"], 0.2 / 0.6)
    assert s.history == records and s.boundary() == 2
    assert set(records[0]) >= {"epoch", "u", "u_ratio", "moved", "boundary"}


def test_dynamic_warmup_never_moves_even_on_tiny_u() -> None:
    s = _selector(warmup_epochs=3, patience=1)
    got = [s.observe(e, u)["boundary"] for e, u in enumerate([1.0, 1e-6, 1e-9, 1.0, 0.1, 1.0, 0.1])]
    # ref at 3; 0.1 < 0.5 -> move at 4; ref at 5; move at 6.
    assert got == [0, 0, 0, 0, 1, 1, 2]


def test_dynamic_step_and_cap() -> None:
    s = build_schedule(
        DynamicScheduleConfig(warmup_epochs=0, tau=0.5, patience=1, step=2, max_boundary=None),
        num_stages=4,
        epochs=10,
    )
    got = [s.observe(e, u) for e, u in enumerate([1.0, 0.1, 1.0, 0.1, 1.0, 0.1])]
    assert [r["boundary"] for r in got] == [0, 2, 2, 3, 3, 3]  # +2, then capped at num_stages-1=3
    assert [r["moved"] for r in got] == [False, True, False, True, False, False]


def test_dynamic_rejects_non_increasing_epochs() -> None:
    s = _selector()
    s.observe(0, 1.0)
    with pytest.raises(ValueError):
        s.observe(0, 1.0)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 8, 10, 12])
def test_dynamic_resume_makes_the_same_decisions(cut: int) -> None:
    whole = _selector()
    expected = [whole.observe(e, u) for e, u in enumerate(SCRIPT_U)]

    first = _selector()
    for e, u in enumerate(SCRIPT_U[:cut]):
        first.observe(e, u)
    # Through a real checkpoint round trip: plain values must survive weights_only loading.
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _selector()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.boundary() == first.boundary()
    rest = [resumed.observe(e, u) for e, u in enumerate(SCRIPT_U) if e >= cut]
    assert rest == expected[cut:]
    assert resumed.history == expected


def test_static_observe_records_next_boundary() -> None:
    s = _static(4, 6, kind="step", warmup_epochs=2)
    recs = [s.observe(e, 0.1) for e in range(4)]
    assert [r["boundary"] for r in recs] == [0, 1, 2, 3]
    assert [r["moved"] for r in recs] == [False, True, True, True]
    t = _static(4, 6, kind="step", warmup_epochs=2)
    t.load_state_dict(s.state_dict())
    assert t.history == s.history


def test_relative_update_and_stage_weights() -> None:
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    prev = stage_weights(stage)
    assert set(prev) == {"0.weight", "4.weight"}
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in prev.values())
    with torch.no_grad():
        stage[0].weight.mul_(1.1)
        stage[4].weight.mul_(1.1)
    assert not torch.equal(prev["0.weight"], stage[0].weight), "the snapshot is a copy"
    assert math.isclose(relative_update(prev, stage_weights(stage)), 0.1, rel_tol=1e-5)
    # Over all tensors together, not an average of per-tensor ratios.
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([0.0, 4.0])}
    b = {"x": torch.tensor([3.0, 1.0]), "y": torch.tensor([0.0, 4.0])}
    assert math.isclose(relative_update(a, b), 1 / 5)
    assert stage_weights(nn.Linear(2, 2)).keys() == {"weight"}
    assert relative_update({"x": torch.zeros(2)}, {"x": torch.zeros(2)}) == 0.0
    with pytest.raises(ValueError):
        relative_update(a, {"x": a["x"]})
