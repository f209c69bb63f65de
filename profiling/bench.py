"""Step time and activation memory of all-SGD, LoCal and a frozen prefix, side by side, per boundary.

    python profiling/bench.py --model resnet18 --data-shape 3,32,32 --classes 10 \\
        --batch-size 64 --steps 5 --device cpu --json out.json

For every boundary k (default 0..num_stages-1, or ``--boundaries 0,2,4``) three variants run one
single-process training step each, in round-robin (the order rotates every repetition), so a noisy
machine slows them alike:

* ``sgd``    — boundary 0: full forward, backward and SGD step;
* ``local``  — stages [0, k) under ``no_grad`` with the learner's hooks computing and applying the
  rule's deltas (``--rule``, default softhebb), suffix SGD — the trainer's step with sync_every=1;
* ``frozen`` — the same prefix with no delta (rule ``freeze``): the physical limit of the local step.

The step is :func:`distlocal.profiler.train_step` (what the calibration uses too), the bytes are
:class:`distlocal.profiler.ActivationCounter`'s (saved for backward, deduplicated, weights excluded).
Times are medians over ``--steps`` after ``--warmup`` steps (CUDA events on GPU). The table goes to
stdout; ``--json`` writes ``{"model", "device", "batch_size", "rows": [{"boundary", "sgd_s",
"local_s", "frozen_s", "sgd_act_bytes", "local_act_bytes"}, ...]}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distlocal.local.learner import LocalLearner
from distlocal.local.rules import RULES, make_rule
from distlocal.models import StagedModel, build_model
from distlocal.profiler import ActivationCounter, train_step

VARIANTS = ("sgd", "local", "frozen")


@dataclass
class Variant:
    """One model copy, its learner at the variant's boundary and its suffix optimizer."""

    name: str
    model: StagedModel
    learner: LocalLearner
    optimizer: torch.optim.Optimizer
    times: list[float]
    act_bytes: int = 0
    step: int = 0


def make_variant(name: str, base: StagedModel, boundary: int, rule: str, local_lr: float,
                 update_every: int, sample_fraction: float) -> Variant:
    """A fresh copy of ``base`` set up as ``name`` at ``boundary`` (``sgd`` ignores the boundary)."""
    model = copy.deepcopy(base)
    learner = LocalLearner(model, make_rule("freeze" if name == "frozen" else rule), update_every,
                           sample_fraction)
    learner.lr = local_lr  # > 0, or the hooks would skip the delta
    if name != "sgd" and boundary > 0:
        learner.set_boundary(boundary)
    # The trainer's default optimizer: SGD with momentum and weight decay, over the suffix only.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=5e-4)
    return Variant(name, model, learner, opt, [])


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """A function timing one call in seconds: CUDA events on GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        def run_cuda(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return run_cuda

    def run_cpu(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run_cpu


def bench_boundary(base: StagedModel, boundary: int, x: torch.Tensor, y: torch.Tensor,
                   args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Measure the three variants at ``boundary`` in alternation; one JSON row."""
    variants = [make_variant(n, base, boundary, args.rule, args.local_lr, args.update_every,
                             args.sample_fraction) for n in VARIANTS]
    time_one = timer(device)
    for v in variants:
        # Counted on the first (warm-up) step: the pack-hook callbacks never touch a timed step.
        counter = ActivationCounter(v.model.stages)
        train_step(v.model, v.learner, v.optimizer, x, y, v.step, counter=counter)
        v.act_bytes, v.step = counter.total, v.step + 1
    for rep in range(args.warmup - 1 + args.steps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate: no variant is always first after a pause
            t = time_one(lambda v=v: train_step(v.model, v.learner, v.optimizer, x, y, v.step))
            v.step += 1
            if rep >= args.warmup - 1:
                v.times.append(t)
    for v in variants:
        v.learner.remove_hooks()
    by = {v.name: v for v in variants}
    return {
        "boundary": boundary,
        "sgd_s": statistics.median(by["sgd"].times),
        "local_s": statistics.median(by["local"].times),
        "frozen_s": statistics.median(by["frozen"].times),
        "sgd_act_bytes": by["sgd"].act_bytes,
        "local_act_bytes": by["local"].act_bytes,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table printed to stdout: times in seconds, ratios, activation bytes."""
    head = ("boundary", "sgd_s", "local_s", "frozen_s", "sgd/local", "local/frozen", "sgd_act_bytes",
            "local_act_bytes")
    lines = [" ".join(f"{h:>15}" for h in head)]
    for r in rows:
        cells = (str(r["boundary"]), f"{r['sgd_s']:.4f}", f"{r['local_s']:.4f}", f"{r['frozen_s']:.4f}",
                 f"{r['sgd_s'] / r['local_s']:.3f}", f"{r['local_s'] / r['frozen_s']:.3f}",
                 str(r["sgd_act_bytes"]), str(r["local_act_bytes"]))
        lines.append(" ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--data-shape", default="3,32,32", help="C,H,W of one sample")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant and boundary")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps first (>= 1; the first counts bytes)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--rule", default="softhebb", choices=[r for r in RULES if r != "freeze"])
    ap.add_argument("--local-lr", type=float, default=1e-3)
    ap.add_argument("--update-every", type=int, default=1)
    ap.add_argument("--sample-fraction", type=float, default=1.0)
    ap.add_argument("--boundaries", default=None, help="comma-separated subset, e.g. 0,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS); 1 is steadiest on a "
                         "busy machine, where multi-threaded steps stall at OpenMP barriers")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and optionally writes) the JSON document."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    shape = tuple(int(s) for s in args.data_shape.split(","))
    if len(shape) != 3:
        sys.exit(f"bench: --data-shape must be C,H,W, got {args.data_shape!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = build_model(args.model, shape, args.classes).to(device).train()
    if args.boundaries is None:
        boundaries = list(range(base.num_stages))
    else:
        boundaries = [int(b) for b in args.boundaries.split(",") if b.strip()]
        bad = [b for b in boundaries if not 0 <= b < base.num_stages]
        if bad:
            sys.exit(f"bench: boundaries {bad} outside 0..{base.num_stages - 1} for {args.model}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn((args.batch_size, *shape), generator=gen, device=device)
    y = torch.randint(args.classes, (args.batch_size,), generator=gen, device=device)
    print(f"bench: {args.model} ({base.num_stages} stages), batch {args.batch_size}, {shape}, "
          f"device {device}, "
          f"rule {args.rule}, update_every {args.update_every}, sample_fraction {args.sample_fraction}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    rows = []
    for b in boundaries:
        rows.append(bench_boundary(base, b, x, y, args, device))
        print(f"bench: boundary {b} done", file=sys.stderr, flush=True)
    doc = {"model": args.model, "device": str(device), "batch_size": args.batch_size, "rule": args.rule,
           "update_every": args.update_every, "sample_fraction": args.sample_fraction, "steps": args.steps,
           "rows": rows}
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
