"""Where a local step's time goes beyond the ideal one: ATen self-CPU time per op, by variant.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/bench/softhebb_op_breakdown.py [BOUNDARY]

ResNet-18 32×32, batch 64, 1 thread, one process: the ``local``, ``ideal`` and ``frozen`` variants
of ``profiling/bench.py`` (same construction), each profiled over one step per round, alternately,
for 4 rounds; the mean per step is printed split into the weight-gradient GEMM
(``convolution_backward``), the forward (conv, BN, ReLU, residual add) and everything else, with
the ten largest other ops. The measurement behind docs/profiling.md's op breakdown.
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "profiling"))
import bench  # noqa: E402

GEMM = "aten::convolution_backward"
FORWARD = ("aten::mkldnn_convolution", "aten::native_batch_norm", "aten::clamp_min_", "aten::add")

boundary = int(sys.argv[1]) if len(sys.argv) > 1 else 9
torch.set_num_threads(1)
args = bench.parse_args(["--boundaries", str(boundary)])
torch.manual_seed(0)
base = bench.build_model("resnet18", (3, 32, 32), 10).train()
x, y = torch.randn(64, 3, 32, 32), torch.randint(10, (64,))
variants = {n: bench.make_variant(n, base, boundary, args) for n in ("local", "ideal", "frozen")}
ms = {n: defaultdict(float) for n in variants}


def step(v: bench.Variant) -> None:
    bench.train_step(v.model, v.learner, v.optimizer, x, y, v.step, sync_every=1)
    v.step += 1


for v in variants.values():  # warm-up
    step(v)
    step(v)
ROUNDS = 4
for _ in range(ROUNDS):
    for name, v in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(v)
        for e in prof.key_averages():
            ms[name][e.key] += e.self_cpu_time_total / 1e3 / ROUNDS
for name, ops in ms.items():
    total, gemm = sum(ops.values()), ops[GEMM]
    fwd = sum(ops[k] for k in FORWARD)
    rest = sorted(((t, k) for k, t in ops.items() if k != GEMM and k not in FORWARD), reverse=True)
    top = ", ".join(f"{k.removeprefix('aten::')} {t:.1f}" for t, k in rest[:10])
    print(f"{name}: total {total:.0f} ms, GEMM {gemm:.0f}, forward {fwd:.0f}, "
          f"other {total - gemm - fwd:.0f} ({top})")
