"""Step time and peak memory of all-SGD, LoCal, a frozen prefix and the ideal local step, per boundary.

    python profiling/bench.py --model resnet18 --data-shape 3,32,32 --classes 10 \\
        --batch-size 64 --steps 5 --device cpu --threads 1 --json out.json

For every boundary k (default 0..num_stages-1, or ``--boundaries 0,2,4``) four variants run
single-process training steps, in round-robin (the order rotates every repetition), so a noisy
machine slows them alike:

* ``sgd``    — boundary 0: full forward, backward and SGD step;
* ``local``  — stages [0, k) under ``no_grad`` with the learner's hooks computing and applying the
  rule's deltas (``--rule``, default softhebb; ``--chunk-bytes``/``--chunk-size`` bound its
  temporaries), suffix SGD — the trainer's step on one process;
* ``frozen`` — the same prefix with no delta (rule ``freeze``): a lower bound no rule reaches;
* ``ideal``  — the frozen step plus, in each local layer's forward hook, its weight-gradient GEMM on
  the same input and output (``rules.correlation_sum``, in the input's dtype, over the same batch
  chunks as the local step's): what a local layer must cost at least (forward + one GEMM), the
  limit for ``update_every=1``.

The step is :func:`distlocal.step.train_step`, the trainer's own step, through parts built as a
1-process run builds them (:func:`distlocal.build.build_step_parts`: the learner and its delta sync
from ``local.*``, a DDP engine, without a process group on one process, with the trainer's default
optimizer; no LR scheduler); ``tests/test_step.py`` checks it gives the trainer's weights bit for bit.
Timing: windows of ``P = lcm(update_every, sync_every)`` consecutive steps, starting at a period
boundary, so every window holds the same number of deltas and syncs as the run does on average and no lever
can flatter the figure; the per-step time is the window over ``P``, and the reported figure the median
over ``--steps`` windows (CUDA events on GPU). Memory: ``*_act_bytes`` are
:class:`distlocal.profiler.ActivationCounter`'s bytes saved for backward (first, untimed step);
``*_peak_bytes`` the whole step's peak footprint from
:func:`distlocal.profiler.footprint.measure_footprint`
on the second, untimed step (plus ``torch.cuda.max_memory_allocated`` on CUDA as
``*_cuda_peak_bytes``); ``local_local_bytes`` is the ``local`` category (rule temporaries and delta
buffer) at the local step's peak. ``--precision bf16|16`` runs the forward under autocast.

The table goes to stdout; ``--json`` writes ``{"model", "device", "batch_size", "precision",
"threads", ..., "rows": [{"boundary", "<v>_s", "<v>_act_bytes", "<v>_peak_bytes", ...}, ...]}``
for every variant ``<v>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from distlocal.build import build_step_parts
from distlocal.config import LocalConfig, compose
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import RULES, correlation_sum
from distlocal.models import StagedModel, build_model
from distlocal.parallel.env import DistEnv
from distlocal.profiler import ActivationCounter
from distlocal.profiler.activations import CountingProbe
from distlocal.profiler.footprint import measure_footprint
from distlocal.step import StepParts, set_boundary, train_step

VARIANTS = ("sgd", "local", "frozen", "ideal")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class Variant:
    """One model copy and the parts its step runs through, at the variant's boundary."""

    name: str
    model: StagedModel
    parts: StepParts
    times: list[float]
    act_bytes: int = 0
    step: int = 0
    footprint: dict[str, int] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)


def _gemm_hook(learner: LocalLearner) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    """The ideal variant's per-layer work: the weight-gradient GEMM of (input, output), discarded.

    In the dtype the layer's forward ran in (autocast casts the input as the conv did), as the
    weight-gradient GEMM of an SGD backward would, and over the same batch chunks as the local
    step's (``learner.chunk_for``): on CPU a 64×32×32 layer's GEMM runs ~25 % faster in two
    chunks of 32 samples than in one of 64, and a bound computed the slower way would flatter
    ``local/ideal``.
    """
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].to(output.dtype)
        step = learner.chunk_for(x, output) or x.shape[0]
        with torch.no_grad(), torch.autocast(device_type=output.device.type, enabled=False):
            for i in range(0, x.shape[0], step):
                correlation_sum(module, x[i: i + step], output[i: i + step])
    return hook


def run_config(args: argparse.Namespace, rule: str) -> DictConfig:
    """The run config the bench's steps are built from: ``mode=local`` with ``--rule`` (``freeze``:
    ``mode=freeze``), the local levers and the precision from ``args``, everything else the defaults."""
    mode = ["mode=freeze"] if rule == "freeze" else ["mode=local", f"local.rule={rule}"]
    return compose([*mode, f"local.lr={args.local_lr}", f"local.update_every={args.update_every}",
                    f"local.sync_every={args.sync_every}", f"local.sample_fraction={args.sample_fraction}",
                    f"local.chunk_size={args.chunk_size}", f"local.chunk_bytes={args.chunk_bytes}",
                    f"trainer.precision={args.precision}", f"trainer.batch_size={args.batch_size}",
                    f"local.compile={str(args.compile).lower()}", "engine=ddp"])


def make_variant(name: str, base: StagedModel, boundary: int, cfgs: dict[str, DictConfig],
                 device: torch.device) -> Variant:
    """A fresh copy of ``base`` set up as ``name`` at ``boundary`` (``sgd`` ignores the boundary), its
    parts built as a 1-process run of ``cfgs["local"]`` (``cfgs["freeze"]`` for frozen and ideal)."""
    model = copy.deepcopy(base)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    cfg = cfgs["freeze" if name in ("frozen", "ideal") else "local"]
    parts = build_step_parts(cfg, model, env)
    parts.learner.lr = cfg.local.lr  # > 0, or the hooks would skip the delta (the trainer's lr at start)
    hooks = []
    if name != "sgd" and boundary > 0:
        set_boundary(parts.learner, parts.engine, boundary)
        if name == "ideal":
            hooks = [m.register_forward_hook(_gemm_hook(parts.learner)) for s in model.stages[:boundary]
                     for m in s.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return Variant(name, model, parts, [], hooks=hooks)


def timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], Any]], float]:
    """A function timing one call in seconds: CUDA events on GPU, ``perf_counter`` on CPU.

    ``clock="cpu"`` (CPU only): the process's CPU time (``time.process_time``) instead of wall
    time. With ``--threads 1`` that is the step's own work, unaffected by waiting for a core on an
    oversubscribed machine (it still counts cache and memory-bandwidth contention).
    """
    if device.type == "cuda":
        def run_cuda(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return run_cuda

    now = time.process_time if clock == "cpu" else time.perf_counter

    def run_cpu(fn: Callable[[], Any]) -> float:
        t0 = now()
        fn()
        return now() - t0
    return run_cpu


def bench_boundary(base: StagedModel, boundary: int, x: torch.Tensor, y: torch.Tensor,
                   args: argparse.Namespace, device: torch.device,
                   cfgs: dict[str, DictConfig]) -> dict[str, Any]:
    """Measure the variants at ``boundary`` in alternation; one JSON row."""
    variants = [make_variant(n, base, boundary, cfgs, device) for n in VARIANTS]
    time_one = timer(device, args.clock)

    def step(v: Variant) -> None:
        train_step(v.parts, x, y, v.step)
        v.step += 1

    period = math.lcm(args.update_every, args.sync_every)
    for v in variants:
        # Step 0 counts saved bytes, step 1 the peak footprint: both untimed.
        counter = ActivationCounter(v.model.stages)
        train_step(v.parts, x, y, v.step, probe=CountingProbe(counter))
        v.act_bytes, v.step = counter.total, v.step + 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        fp = measure_footprint(lambda v=v: step(v), device, modules=(v.model,),
                               optimizers=(v.parts.engine.optimizer,), local=(v.parts.learner.buffer,))
        v.footprint = {"peak_bytes": fp.total, "local_bytes": fp.by_category["local"]}
        if device.type == "cuda":
            v.footprint["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        while v.step % period:  # windows start at a period boundary
            step(v)
    for rep in range(args.warmup - 1 + args.steps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate: no variant is always first after a pause
            t = time_one(lambda v=v: [step(v) for _ in range(period)])
            if rep >= args.warmup - 1:
                v.times.append(t / period)
    for v in variants:
        v.parts.learner.remove_hooks()
        for h in v.hooks:
            h.remove()
    row: dict[str, Any] = {"boundary": boundary}
    for v in variants:
        row[f"{v.name}_s"] = statistics.median(v.times)
    for v in variants:
        row[f"{v.name}_act_bytes"] = v.act_bytes
        for key, val in v.footprint.items():
            if key != "local_bytes" or v.name == "local":
                row[f"{v.name}_{key}"] = val
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table printed to stdout: times in ms, the ratios, peak footprints in MiB."""
    mib = 2**20
    head = ("bnd", "sgd_ms", "local_ms", "frozen_ms", "ideal_ms", "sgd/local", "local/frozen",
            "local/ideal", "peak_sgd", "peak_local", "peak_frozen", "peak_ideal", "local/frozen_mem")
    lines = [" ".join(f"{h:>11}" if i else f"{h:>3}" for i, h in enumerate(head)) + "   (peaks in MiB)"]
    for r in rows:
        cells = (str(r["boundary"]), *(f"{1e3 * r[f'{v}_s']:.1f}" for v in VARIANTS),
                 f"{r['sgd_s'] / r['local_s']:.3f}", f"{r['local_s'] / r['frozen_s']:.3f}",
                 f"{r['local_s'] / r['ideal_s']:.3f}",
                 *(f"{r[f'{v}_peak_bytes'] / mib:.1f}" for v in VARIANTS),
                 f"{r['local_peak_bytes'] / r['frozen_peak_bytes']:.3f}")
        lines.append(" ".join(f"{c:>11}" if i else f"{c:>3}" for i, c in enumerate(cells)))
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
    ap.add_argument("--sync-every", type=int, default=1,
                    help="apply the deltas every k steps (1: direct application, no delta buffer)")
    ap.add_argument("--sample-fraction", type=float, default=1.0)
    ap.add_argument("--chunk-size", type=int, default=0, help="samples per delta chunk (0: --chunk-bytes)")
    ap.add_argument("--chunk-bytes", type=int, default=LocalConfig.chunk_bytes,
                    help="automatic delta chunking bound (0: whole batch); default as local.chunk_bytes")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="CPU timing: wall clock, or process CPU time (with --threads 1: robust to a "
                         "machine shared with other jobs)")
    ap.add_argument("--precision", default="32", choices=list(PRECISIONS), help="autocast: 32, bf16 or 16")
    ap.add_argument("--boundaries", default=None, help="comma-separated subset, e.g. 0,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true",
                    help="local.compile: torch.compile the rule's elementwise work (give --warmup room "
                         "for the first compile)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS); 1 is steadiest on a "
                         "busy machine, where multi-threaded steps stall at OpenMP barriers")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    if args.update_every < 1 or args.sync_every < 1:
        ap.error("--update-every and --sync-every must be >= 1")
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
          f"rule {args.rule}, update_every {args.update_every}, sync_every {args.sync_every}, "
          f"sample_fraction {args.sample_fraction}, precision {args.precision}, "
          f"chunk_size {args.chunk_size}, chunk_bytes {args.chunk_bytes}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    cfgs = {"local": run_config(args, args.rule), "freeze": run_config(args, "freeze")}
    rows = []
    for b in boundaries:
        rows.append(bench_boundary(base, b, x, y, args, device, cfgs))
        print(f"bench: boundary {b} done", file=sys.stderr, flush=True)
    doc = {"model": args.model, "device": str(device), "batch_size": args.batch_size, "rule": args.rule,
           "update_every": args.update_every, "sync_every": args.sync_every,
           "sample_fraction": args.sample_fraction, "precision": args.precision,
           "chunk_size": args.chunk_size,
           "chunk_bytes": args.chunk_bytes, "threads": torch.get_num_threads(), "clock": args.clock,
           "steps": args.steps,
           "warmup": args.warmup, "period": math.lcm(args.update_every, args.sync_every),
           "command": " ".join(["profiling/bench.py", *(sys.argv[1:] if argv is None else argv)]),
           "rows": rows}
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
