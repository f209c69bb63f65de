"""distlocal.profiler.footprint: the one wrapper around torch's private MemTracker, pinned by hand counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distlocal.profiler.footprint import local_scope, measure_footprint

B, D, H, C = 5, 7, 11, 3  # distinct primes so a wrong term shows
F32 = 4
P1 = (D * H + H) * F32  # first Linear
P2 = (H * C + C) * F32  # second Linear


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))


def test_first_step_peak_is_params_grads_and_momentum():
    """A fresh SGD-with-momentum step peaks after the optimizer step: P params + P grads + P momentum."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(B, D), torch.randint(C, (B,))

    def step() -> None:
        F.cross_entropy(net(x), y).backward()
        opt.step()

    fp = measure_footprint(step, "cpu", modules=(net,), optimizers=(opt,))
    cat = fp.by_category
    assert cat["param"] == cat["grad"] == cat["optim"] == P1 + P2
    assert cat["local"] == cat["buffer"] == 0
    assert fp.total == sum(cat.values())
    assert fp.as_metrics()["footprint_bytes"] == fp.total
    assert fp.as_metrics()["footprint_optim_bytes"] == P1 + P2


def test_frozen_prefix_and_local_scope():
    """Frozen parameters are accepted (MemTracker alone raises on them); the local scope's tensors and
    the ``local`` buffers are filed as ``local``; only the suffix gets gradients and momentum."""
    net = _net()
    for p in net[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(net[2].parameters(), lr=0.1, momentum=0.9)
    delta = torch.zeros(D * H + H)
    x, y = torch.randn(B, D), torch.randint(C, (B,))
    kept = []

    def step() -> None:
        with torch.no_grad():
            h = net[1](net[0](x))
            with local_scope():
                kept.append(torch.ones(B, H, 13))  # a rule temporary of known size, alive at the peak
        F.cross_entropy(net[2](h), y).backward()
        opt.step()

    fp = measure_footprint(step, "cpu", modules=(net,), optimizers=(opt,), local=(delta,))
    cat = fp.by_category
    assert cat["param"] == P1 + P2
    assert cat["grad"] == cat["optim"] == P2
    assert cat["local"] == (D * H + H) * F32 + B * H * 13 * F32
    # Outside a measurement the scope changes nothing and costs nothing.
    with local_scope():
        pass
