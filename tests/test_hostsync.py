"""distlocal.hostsync: the read counter counts each kind, the forcing switch, the lagged read."""

from __future__ import annotations

import pytest
import torch

from distlocal.hostsync import (
    HostReadCounter,
    LaggedRead,
    force_accelerator_paths,
    reads_are_free,
    zero_unless,
)


@pytest.mark.parametrize("kind, read", [
    ("item", lambda t: t.sum().item()),
    ("bool", lambda t: bool(t.sum() > 0)),
    ("bool", lambda t: 1 if t[0] else 0),  # an `if` on a tensor is a read too
    ("float", lambda t: float(t.sum())),
    ("int", lambda t: int(t[0])),
    ("tolist", lambda t: t.tolist()),
    ("to_host", lambda t: t.cpu()),
    ("to_host", lambda t: t.numpy()),
    ("to_host", lambda t: t.to("cpu")),
    ("to_host", lambda t: t.to(torch.device("cpu"), torch.float64)),
])
def test_the_counter_counts_each_kind_of_read(kind: str, read) -> None:
    t = torch.tensor([1.0, 2.0])
    with HostReadCounter() as counter:
        read(t)
    assert counter.counts == {kind: 1} and counter.total == 1
    assert counter.where[0].startswith(f"{kind} at test_hostsync.py:")


def test_device_work_and_non_blocking_copies_are_not_reads() -> None:
    t = torch.tensor([1.0, float("nan")])
    with HostReadCounter() as counter:
        ok = torch.isfinite(t).all()
        u = t.to(torch.float64).mul(2).to("cpu", non_blocking=True)
        zero_unless(ok, u)
    assert counter.total == 0 and not u.any()


def test_forcing_switch_and_zero_unless() -> None:
    cpu = torch.device("cpu")
    assert reads_are_free(cpu) and reads_are_free(torch.zeros(1))
    with force_accelerator_paths():
        assert not reads_are_free(cpu)
    assert reads_are_free(cpu)
    a, b = torch.ones(3), torch.ones(2)
    zero_unless(True, a, None)
    zero_unless(torch.tensor(True), b)
    assert a.sum() == 3 and b.sum() == 2
    zero_unless(False, a)
    zero_unless(torch.tensor(False), b)
    assert not a.any() and not b.any()


def test_lagged_read_is_one_push_late_forced_and_immediate_on_cpu() -> None:
    free = LaggedRead()
    assert free.push(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
    lagged = LaggedRead()
    with force_accelerator_paths(), HostReadCounter() as counter:
        assert lagged.push(torch.tensor([1.0])) is None
        assert lagged.push(torch.tensor([2.0])) == [1.0]
        assert lagged.push(torch.tensor([3.0])) == [2.0]
        saved = lagged.state()  # a checkpoint: the value in flight, not consumed
    assert counter.total == 0  # the staging copies are host memory: no device read
    assert saved == [3.0]
    resumed = LaggedRead()
    resumed.pending = saved
    with force_accelerator_paths():
        assert resumed.push(torch.tensor([4.0])) == [3.0] == lagged.push(torch.tensor([4.0]))
