"""Weak supervision: a non-increasing multiplier driven by the running training loss."""

from __future__ import annotations

import io

import pytest
import torch

from distlocal.config import WeakSupervisionConfig
from distlocal.errors import ConfigError
from distlocal.local.supervision import WeakSupervision


def _ws(**kw) -> WeakSupervision:
    return WeakSupervision.from_config(WeakSupervisionConfig(**kw))


def test_multiplier_non_increasing_on_rise_then_fall() -> None:
    ws = _ws(ema=0.5, window=5, rise_tol=0.05, backoff=0.5)
    for _ in range(10):
        assert ws.update(2.0) == 1.0, "no local stage yet: m = 1"
    ws.reset_reference()
    assert ws.reference == pytest.approx(2.0)
    losses = [2.0 + 0.1 * i for i in range(15)] + [3.4 - 0.2 * i for i in range(15)]
    ms = [ws.update(v) for v in losses]
    assert all(b <= a for a, b in zip(ms, ms[1:])), ms
    assert ms[-1] < 0.5
    # While falling, m tracks L̄ / L̄_ref once that is below the backed-off m.
    assert ms[-1] <= ws.running_loss / ws.reference + 1e-12
    assert all(0.0 <= m <= 1.0 for m in ms)


def test_back_off_on_a_rise() -> None:
    ws = _ws(ema=0.0, window=3, rise_tol=0.05, backoff=0.5)
    ws.update(1.0)
    ws.reset_reference()
    # Flat: no back-off, ratio 1.
    assert [ws.update(1.0) for _ in range(5)] == [1.0] * 5
    # +2 % a step: each step is within 5 %, but 1.0 -> 1.06 over the 3-step window is not.
    # One back-off, then a fresh window (no repeat for the same rise).
    ms = [ws.update(v) for v in (1.02, 1.04, 1.06, 1.06, 1.06, 1.06)]
    assert ms == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    # A rise within tolerance does nothing.
    ws2 = _ws(ema=0.0, window=2, rise_tol=0.05)
    ws2.update(1.0)
    ws2.reset_reference()
    assert [ws2.update(v) for v in (1.0, 1.02, 1.04)] == [1.0, 1.0, 1.0]


def test_external_backoff_and_floor() -> None:
    ws = _ws(backoff=0.5, min_multiplier=0.2)
    ws.backoff()
    assert ws.multiplier == 1.0, "no local stage yet: nothing to back off"
    ws.update(1.0)
    ws.reset_reference()
    ws.backoff()
    assert ws.multiplier == 0.5
    ws.backoff()
    ws.backoff()
    assert ws.multiplier == 0.2
    ws.update(0.01)
    assert ws.multiplier == 0.2, "min_multiplier floors the loss ratio too"


def test_reference_before_any_loss_and_nonfinite_losses() -> None:
    ws = _ws(ema=0.0)
    ws.reset_reference()  # the run starts with a local stage
    assert ws.reference is None and ws.update(4.0) == 1.0 and ws.reference == 4.0
    assert ws.update(float("nan")) == 1.0 and ws.running_loss == 4.0
    assert ws.update(2.0) == 0.5


def test_reset_reference_never_raises_m() -> None:
    ws = _ws(ema=0.0)
    ws.update(4.0)
    ws.reset_reference()
    assert ws.update(2.0) == 0.5
    ws.reset_reference()  # the boundary moved: new reference 2.0, m stays 0.5
    assert ws.reference == 2.0
    assert ws.update(2.0) == 0.5
    assert ws.update(0.5) == 0.25


def test_disabled_is_always_one() -> None:
    ws = _ws(enabled=False)
    ws.reset_reference()
    for v in (1.0, 5.0, 0.1, 0.01):
        assert ws.update(v) == 1.0
    ws.backoff()
    assert ws.multiplier == 1.0


def test_state_dict_round_trip() -> None:
    losses = [3.0, 2.9, 2.7, 2.8, 3.0, 3.3, 2.5, 2.0, 1.9, 2.2, 2.6, 1.5]
    whole = _ws(ema=0.6, window=3)
    whole.update(3.0)
    whole.reset_reference()
    expected = [whole.update(v) for v in losses]

    first = _ws(ema=0.6, window=3)
    first.update(3.0)
    first.reset_reference()
    got = [first.update(v) for v in losses[:5]]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _ws(ema=0.6, window=3)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.multiplier == first.multiplier
    got += [resumed.update(v) for v in losses[5:]]
    assert got == expected


@pytest.mark.parametrize(
    "kw", [dict(ema=1.0), dict(window=0), dict(backoff=1.5), dict(rise_tol=-0.1), dict(min_multiplier=2.0)]
)
def test_bad_config(kw: dict) -> None:
    with pytest.raises(ConfigError):
        _ws(**kw)
