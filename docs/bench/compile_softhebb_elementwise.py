"""softhebb's elementwise part on ResNet-18 layer shapes (batch 64, 1 thread): eager vs torch.compile.

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/bench/compile_softhebb_elementwise.py

The measurement behind docs/profiling.md's "torch.compile ... measured, not added".
"""

import time

import torch
from torch import nn

from distlocal.local.rules import _softmax, correlation_sum

torch.set_num_threads(1)


def eager(z: torch.Tensor):
    """What LocalRule.delta does besides the GEMM: the softmax, then Σy per channel.

    (Σ y·z per channel is read off the GEMM's result since issue 13: no elementwise pass.)
    """
    y = _softmax(z, 1, 1.0)
    return y, y.sum(dim=(0, 2, 3))


@torch.compile(dynamic=False)
def fused(z: torch.Tensor):
    """The same terms, for inductor to fuse."""
    y = torch.softmax(z, dim=1)
    return y, y.sum(dim=(0, 2, 3))


def median_s(fn, z: torch.Tensor, n: int = 10) -> float:
    fn(z)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(z)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


for shape, cin in [((64, 64, 32, 32), 64), ((64, 128, 16, 16), 128), ((64, 256, 8, 8), 256),
                   ((64, 512, 4, 4), 512)]:
    z = torch.randn(shape)
    x = torch.randn(shape[0], cin, shape[2], shape[3])
    conv = nn.Conv2d(cin, shape[1], 3, padding=1, bias=False)
    t0 = time.perf_counter()
    fused(z)
    tc = time.perf_counter() - t0
    e, f = median_s(eager, z), median_s(fused, z)
    g = median_s(lambda z, conv=conv, x=x: correlation_sum(conv, x, z), z)
    print(f"{shape}: eager {e * 1e3:.2f} ms, compiled {f * 1e3:.2f} ms (compile {tc:.1f} s), "
          f"weight GEMM {g * 1e3:.2f} ms")
