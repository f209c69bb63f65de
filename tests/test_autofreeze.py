"""Auto-freeze: a local stage whose effective update stays under the threshold stops paying."""

from __future__ import annotations

import io

import pytest
import torch
from test_learner import _batch, _setup
from test_resume import QUIET, _assert_same_run, _cut_mid_epoch_2, _rows, _worker

from distlocal.config import AutoFreezeConfig
from distlocal.errors import ConfigError
from distlocal.hostsync import HostReadCounter
from distlocal.local.autofreeze import AutoFreeze
from distlocal.local.learner import _Slot


def _slot(stage: int, rel: float) -> _Slot:
    """A Linear whose buffered delta is ``rel`` times its (weight, bias) norm."""
    lin = torch.nn.Linear(4, 3)
    w = lin.weight.detach().clone() * rel
    b = lin.bias.detach().clone() * rel
    return _Slot(lin, f"stages.{stage}", stage, w, b)


def test_freezes_a_stage_below_threshold_for_a_whole_window_only() -> None:
    af = AutoFreeze(threshold=1e-3, window=10)
    dead, alive = _slot(0, 1e-4), _slot(1, 1e-2)
    for _ in range(4):  # 4 x 2 steps: the window is not complete yet
        assert af.observe([dead, alive], steps=2) == []
    assert af.observe([dead, alive], steps=2) == [0]  # 10 steps at 1e-4 / 2 per step < 1e-3
    assert af.is_frozen(0) and not af.is_frozen(1) and af.flags(3) == [1, 0, 0]
    for _ in range(20):
        af.observe([dead, alive], steps=1)
    assert af.frozen == {0}


def test_the_mean_over_the_window_counts_not_single_applications() -> None:
    af = AutoFreeze(threshold=1e-3, window=4)
    # One big update among quiet ones (update_every-like): the mean per step is above threshold.
    for rel in (1e-2, 0.0, 0.0, 0.0):
        af.observe([_slot(0, rel)], steps=1)
    assert not af.frozen
    for rel in (0.0, 0.0, 0.0, 0.0):
        af.observe([_slot(0, rel)], steps=1)
    assert af.frozen == {0}


def test_disabled_and_state_round_trip() -> None:
    off = AutoFreeze.from_config(AutoFreezeConfig(enabled=False, threshold=1.0, window=1))
    off.observe([_slot(0, 0.0)], steps=5)
    assert not off.frozen
    af = AutoFreeze(threshold=1e-3, window=6)
    af.observe([_slot(0, 1e-5), _slot(1, 1e-5)], steps=3)
    buf = io.BytesIO()
    torch.save(af.state_dict(), buf)
    buf.seek(0)
    again = AutoFreeze(threshold=1e-3, window=6)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.observe([_slot(0, 1e-5), _slot(1, 1e-5)], steps=3) == [0, 1]


def test_check_every_reads_once_per_check_and_takes_the_same_decisions_later() -> None:
    every = AutoFreeze(threshold=1e-3, window=4)
    lagged = AutoFreeze(threshold=1e-3, window=4, check_every=3)
    dead, alive = _slot(0, 1e-4), _slot(1, 1e-2)
    got = []
    for i in range(9):
        assert every.observe([dead, alive], steps=1) == ([0] if i == 3 else [])
        with HostReadCounter() as counter:
            got.append(lagged.observe([dead, alive], steps=1))
        assert counter.total == (1 if i % 3 == 2 else 0)  # one read per check, none in between
    assert got == [[], [], [], [], [], [0], [], [], []]  # found at the 4th, decided at the 6th
    assert lagged.frozen == every.frozen == {0} and lagged._acc == every._acc


def test_a_skipped_application_is_dropped_at_the_check() -> None:
    af = AutoFreeze(threshold=1e-3, window=2, check_every=2)
    dead = _slot(0, 1e-4)
    af.observe([dead], steps=1, ok=torch.tensor(False))
    assert af.observe([dead], steps=1, ok=torch.tensor(True)) == []
    assert af._acc == {0: [pytest.approx(1e-4, rel=1e-6), 1.0]}  # one step counted, not two


@pytest.mark.parametrize("kw", [dict(threshold=-1.0), dict(window=0), dict(threshold=float("nan")),
                                dict(check_every=0)])
def test_bad_config(kw: dict) -> None:
    with pytest.raises(ConfigError):
        AutoFreeze(**kw)


def test_learner_stops_computing_the_rule_of_a_frozen_stage() -> None:
    model, learner, _ = _setup("convnet")
    learner.auto_freeze = AutoFreeze(threshold=1e9, window=2)  # everything counts as dead
    learner.set_boundary(2)
    learner.lr = 0.01
    calls: list[int] = []
    rule = learner.rule

    class Counting:  # the rule, counting its delta computations (the rule itself is frozen)
        name, compiled = rule.name, rule.compiled
        apply = staticmethod(rule.apply)

        @staticmethod
        def delta(*a, **kw):
            calls.append(1)
            return rule.delta(*a, **kw)

    learner.rule = Counting()  # type: ignore[assignment]
    x, _ = _batch()
    for step in range(2):
        learner.prefix_forward(x, step)
        learner.pack_stats()
        learner.apply()
    assert learner.auto_freeze.frozen == {0, 1}
    n_calls = len(calls)
    weights = [p.detach().clone() for s in model.stages[:2] for p in s.parameters()]
    bn = model.stages[0][1] if isinstance(model.stages[0], torch.nn.Sequential) else None
    stats = None if bn is None else bn.running_mean.clone()
    learner.prefix_forward(_batch(seed=7)[0], 2)
    learner.pack_stats()
    learner.apply()
    assert len(calls) == n_calls, "a frozen stage's hooks no longer compute the rule"
    assert float(learner.buffer.abs().sum()) == 0.0
    after = [p.detach() for s in model.stages[:2] for p in s.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights, after))
    if stats is not None:
        assert not torch.equal(stats, bn.running_mean), "BN statistics keep updating, as under freeze"
    state = learner.state_dict()
    assert state["auto_freeze"]["frozen"] == [0, 1]


@pytest.mark.parametrize("check_every", [1, 3])
def test_resume_mid_epoch_with_auto_freeze_is_exact(tmp_path, check_every: int) -> None:
    # A threshold every stage is under: a stage freezes 5 steps after turning local, so (checked
    # every sync) the checkpoint at step 4 of epoch 2 holds stage 0 frozen and stage 1 mid-window.
    # Checked every 3 syncs, that checkpoint holds unread observations: the resume reads them at
    # the same sync as the uninterrupted run.
    args = [*QUIET, "checkpoint.every_steps=4", "local.auto_freeze.threshold=1.0",
            "local.auto_freeze.window=5", f"local.auto_freeze.check_every={check_every}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _worker(full, *args)
    saved = _cut_mid_epoch_2(cut, *args)["learner"]["auto_freeze"]
    assert saved["frozen"] == [0] if check_every == 1 else saved["pending"]
    _worker(cut, *args)
    _assert_same_run(full, cut, entered_mid_epoch=2)
    assert [r["auto_frozen"] for r in _rows(full)[1:]] == [[1], [1, 1], [1, 1, 1]]
