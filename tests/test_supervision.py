"""Weak supervision: cut on real loss rises (tested against the loss's own noise), recover slowly."""

from __future__ import annotations

import io
import random

import pytest
import torch

from distlocal.config import WeakSupervisionConfig
from distlocal.errors import ConfigError
from distlocal.local.supervision import WeakSupervision


def _ws(**kw) -> WeakSupervision:
    return WeakSupervision.from_config(WeakSupervisionConfig(**kw))


def _noisy(level: float, n: int, rng: random.Random, rel: float = 0.10) -> list[float]:
    """``level ± rel`` (i.i.d., uniform): a stationary mini-batch loss."""
    return [level * (1.0 + rng.uniform(-rel, rel)) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stationary_noisy_loss_keeps_the_multiplier(seed: int) -> None:
    rng = random.Random(seed)
    ws = _ws()
    for v in _noisy(1.0, 40, rng):
        ws.update(v)
    ws.reset_reference()
    ms = [ws.update(v) for v in _noisy(1.0, 10_000, rng)]
    assert min(ms) >= 0.5, (min(ms), ws.backoffs)
    assert ms[-1] >= 0.5


def test_stationary_gaussian_noise_also_keeps_it() -> None:
    g = torch.Generator().manual_seed(5)
    losses = (1.0 + 0.1 * torch.randn(10_040, generator=g)).tolist()
    ws = _ws()
    for v in losses[:40]:
        ws.update(v)
    ws.reset_reference()
    ms = [ws.update(v) for v in losses[40:]]
    assert min(ms) >= 0.5


def test_a_real_sustained_rise_cuts_it() -> None:
    rng = random.Random(0)
    ws = _ws(window=20)
    for v in _noisy(1.0, 40, rng):
        ws.update(v)
    ws.reset_reference()
    for v in _noisy(1.0, 60, rng):
        ws.update(v)
    m_before, cuts_before = ws.multiplier, ws.backoffs
    assert m_before >= 0.9
    for v in _noisy(1.2, 20, rng):  # +20 % over one whole window
        ws.update(v)
    assert ws.multiplier <= 0.5 * m_before + 1e-12
    assert ws.backoffs == cuts_before + 1


def test_a_rise_within_tolerance_or_noise_does_not_cut() -> None:
    ws = _ws(window=4, z=3.0, rise_tol=0.05)
    ws.update(1.0)
    ws.reset_reference()
    # +3 %: many standard errors (no noise at all) but below rise_tol.
    for v in [1.0, 1.0, 1.0, 1.0, 1.03, 1.03, 1.03, 1.03]:
        ws.update(v)
    assert ws.backoffs == 0
    # +20 % in the mean, but the windows are so noisy that it is within 3 standard errors.
    ws2 = _ws(window=4, z=3.0, rise_tol=0.05)
    ws2.reset_reference()
    for v in [0.5, 1.5, 0.5, 1.5, 0.7, 1.7, 0.7, 1.7]:
        ws2.update(v)
    assert ws2.backoffs == 0


def test_recovers_only_while_falling_and_never_above_the_loss_ratio_cap() -> None:
    ws = _ws(window=2, z=0.0, rise_tol=0.0, backoff=0.5, recover=1.5, min_multiplier=0.0)
    for v in (1.0, 1.0):
        ws.update(v)
    ws.reset_reference()  # L_ref = 1.0
    for v in (1.0, 1.0, 2.0, 2.0):  # a rise: one cut
        ws.update(v)
    assert ws.multiplier == 0.5 and ws.backoffs == 1
    for v in (2.0, 2.0, 2.0, 2.0):  # flat at the higher level: no recovery
        ws.update(v)
    assert ws.multiplier == 0.5
    ws.update(1.9)
    ws.update(1.9)  # a falling window: x1.5
    assert ws.multiplier == pytest.approx(0.75)
    for v in (1.2, 1.2, 0.8, 0.8):  # falling windows, but m may never exceed L/L_ref = 0.8
        ws.update(v)
    assert ws.multiplier == pytest.approx(0.8)
    for v in (0.7, 0.7):
        ws.update(v)
    assert ws.multiplier == pytest.approx(0.7)


def test_a_rise_never_raises_the_multiplier() -> None:
    rng = random.Random(4)
    ws = _ws(window=10)
    ws.reset_reference()
    level, m = 1.0, None
    for _ in range(50):
        level *= 1.01  # slowly rising loss (+1 % a window, less than rise_tol)
        for v in _noisy(level, 10, rng, rel=0.0):
            new = ws.update(v)
        assert m is None or new <= m
        m = new


def test_external_backoff_and_floor() -> None:
    ws = _ws(window=2, backoff=0.5, min_multiplier=0.2)
    ws.backoff()
    assert ws.multiplier == 1.0 and ws.backoffs == 0, "no local stage yet: nothing to back off"
    ws.update(1.0)
    ws.update(1.0)
    ws.reset_reference()
    ws.backoff()
    assert ws.multiplier == 0.5 and ws.backoffs == 1
    ws.backoff()
    ws.backoff()
    assert ws.multiplier == 0.2
    ws.update(0.01)
    ws.update(0.01)
    assert ws.multiplier == 0.2, "min_multiplier floors the loss ratio too"


def test_reference_before_any_loss_and_nonfinite_losses() -> None:
    ws = _ws(window=2, min_multiplier=0.0)
    ws.reset_reference()  # the run starts with a local stage
    assert ws.reference is None
    assert ws.update(4.0) == 1.0 and ws.update(float("nan")) == 1.0 and ws.update(4.0) == 1.0
    assert ws.reference == 4.0
    ws.update(2.0)
    assert ws.update(2.0) == 0.5  # the cap: L/L_ref


def test_reset_reference_moves_the_reference_not_m() -> None:
    ws = _ws(window=2, min_multiplier=0.0)
    for v in (4.0, 4.0):
        ws.update(v)
    ws.reset_reference()
    for v in (2.0, 2.0):
        ws.update(v)
    assert ws.multiplier == 0.5
    ws.reset_reference()  # the boundary moved: new reference 2.0, m stays 0.5
    assert ws.reference == 2.0 and ws.multiplier == 0.5
    for v in (1.0, 1.0):
        ws.update(v)
    assert ws.multiplier == 0.5  # no comparison window right after a reset: no recovery


def test_disabled_is_always_one() -> None:
    ws = _ws(enabled=False)
    ws.reset_reference()
    for v in (1.0, 5.0, 0.1, 0.01) * 20:
        assert ws.update(v) == 1.0
    ws.backoff()
    assert ws.multiplier == 1.0


def test_state_dict_round_trip() -> None:
    rng = random.Random(9)
    losses = _noisy(1.0, 30, rng) + _noisy(1.5, 30, rng) + _noisy(1.2, 45, rng)
    whole = _ws(window=7)
    whole.update(1.0)
    whole.reset_reference()
    expected = [whole.update(v) for v in losses]

    first = _ws(window=7)
    first.update(1.0)
    first.reset_reference()
    got = [first.update(v) for v in losses[:38]]  # mid-window
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _ws(window=7)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.multiplier == first.multiplier
    got += [resumed.update(v) for v in losses[38:]]
    assert got == expected
    assert resumed.backoffs == whole.backoffs >= 1


@pytest.mark.parametrize(
    "kw", [dict(window=1), dict(backoff=1.5), dict(rise_tol=-0.1), dict(min_multiplier=2.0),
           dict(z=-1.0), dict(recover=0.9)]
)
def test_bad_config(kw: dict) -> None:
    with pytest.raises(ConfigError):
        _ws(**kw)
