"""Project the per-step time and all-reduce volume of sgd / local / freeze to 8…1024 GPUs.

    python profiling/project.py docs/bench/bench_resnet18_b1024.json --boundary 4 \\
        --bandwidth-gbps 100 --latency-us 10 --sync-every 4 --json projection.json

This is a **projection, not a measurement**. It combines one measured single-GPU step time per
mode (a ``profiling/bench.py`` JSON: ``sgd_s``, ``local_s``, ``frozen_s`` at each boundary) with
the all-reduce volume of each mode, computed from the model itself (``distlocal.models.
build_model`` and the :class:`~distlocal.local.learner.LocalLearner` buffer layout), and the ring
all-reduce α-β cost model

    t_allreduce(bytes, N) = 2(N−1)·α + 2(N−1)/N · bytes / β        (α = latency, β = bandwidth)

Assumptions (printed with every table):

* weak scaling: the per-GPU batch is the bench's ``batch_size`` at every N, so the compute time
  of a step is the measured single-GPU time, constant in N;
* communication is not overlapped with compute: ``step_s = compute_s + comm_s``;
* one flat ring over N GPUs with one link bandwidth (no hierarchy, no contention, no in-network
  reduction); ``--bandwidth-gbps`` is in Gbit/s, so β = bandwidth·10⁹/8 bytes/s;
* gradients are fp32 (``--grad-bytes`` per parameter) and DDP sends them in buckets of
  ``--bucket-mb`` MB, each bucket one all-reduce paying the latency term;
* per mode and step:
  ``sgd``    — all-reduce of every parameter's gradient (boundary 0);
  ``freeze`` — all-reduce of the suffix gradients only (stages ``[boundary, S)``);
  ``local``  — the suffix gradients plus, every ``--sync-every`` steps, one all-reduce of the
  learner's buffer (the Hebbian deltas of the prefix conv/linear weights — the size of those
  parameters — plus the prefix BatchNorm running statistics and two loss slots), amortised per
  step. With ``sync_every=1`` local sends about as much as sgd (prefix deltas replace prefix
  gradients); its saving in bytes comes from ``sync_every > 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("sgd", "local", "freeze")
DEFAULT_GPUS = tuple(2**k for k in range(3, 11))  # 8, 16, ..., 1024
BANNER = "PROJECTION, not a measurement"
ASSUMPTIONS = (
    "weak scaling: per-GPU batch fixed, compute time per step = measured single-GPU step time",
    "communication not overlapped with compute: step_s = compute_s + comm_s",
    "flat ring all-reduce, t = 2(N-1)*alpha + 2(N-1)/N * bytes/beta, one link bandwidth, no contention",
    "gradient all-reduce in DDP-sized buckets (one latency term per bucket)",
    "local: delta all-reduce every sync_every steps, amortised per step",
)


@dataclass(frozen=True)
class Volumes:
    """Bytes a model all-reduces at one boundary."""

    all_grad_bytes: int
    """Gradients of every parameter (sgd)."""
    suffix_grad_bytes: int
    """Gradients of the parameters of stages ``[boundary, S)`` (freeze, local)."""
    prefix_param_bytes: int
    """Parameters of stages ``[0, boundary)`` (for reference: what a Hebbian delta replaces)."""
    delta_sync_bytes: int
    """One LocalLearner buffer: prefix conv/linear deltas, prefix BN statistics, loss slots."""


@dataclass(frozen=True)
class Row:
    """One projected step: N GPUs, one mode."""

    gpus: int
    mode: str
    boundary: int
    compute_s: float
    comm_s: float
    step_s: float
    allreduce_bytes: float
    """Bytes all-reduced per step and GPU (input size of the all-reduces, amortised)."""


def ring_allreduce_s(nbytes: float, gpus: int, alpha_s: float, beta_bytes_per_s: float) -> float:
    """Time of one ring all-reduce of ``nbytes`` over ``gpus`` ranks (α-β model); 0 for one rank."""
    if gpus <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (gpus - 1) * alpha_s + 2 * (gpus - 1) / gpus * nbytes / beta_bytes_per_s


def bucketed_allreduce_s(nbytes: float, gpus: int, alpha_s: float, beta_bytes_per_s: float,
                         bucket_bytes: float) -> float:
    """DDP-style: ``ceil(nbytes / bucket_bytes)`` all-reduces, each paying the latency term."""
    if nbytes <= 0:
        return 0.0
    buckets = max(1, math.ceil(nbytes / bucket_bytes)) if bucket_bytes > 0 else 1
    return buckets * ring_allreduce_s(nbytes / buckets, gpus, alpha_s, beta_bytes_per_s)


def model_volumes(model_name: str, data_shape: tuple[int, int, int], classes: int, boundary: int,
                  grad_bytes: int = 4, rule: str = "softhebb") -> Volumes:
    """Build ``model_name`` and measure its all-reduce volumes at ``boundary``."""
    from distlocal.local.learner import LocalLearner
    from distlocal.local.rules import make_rule
    from distlocal.models import build_model

    model = build_model(model_name, data_shape, classes)
    if not 0 <= boundary < model.num_stages:
        raise ValueError(f"boundary {boundary} out of range: {model_name} has {model.num_stages} stages "
                         f"(boundary 0..{model.num_stages - 1})")
    per_stage = [sum(p.numel() for p in stage.parameters()) * grad_bytes for stage in model.stages]
    learner = LocalLearner(model, make_rule(rule), 1, 1.0)
    if boundary > 0:
        learner.set_boundary(boundary)
    return Volumes(
        all_grad_bytes=sum(per_stage),
        suffix_grad_bytes=sum(per_stage[boundary:]),
        prefix_param_bytes=sum(per_stage[:boundary]),
        delta_sync_bytes=learner.delta_bytes,
    )


def bench_row(bench: dict[str, Any], boundary: int) -> dict[str, Any]:
    """The bench row measured at ``boundary``."""
    for row in bench["rows"]:
        if int(row["boundary"]) == boundary:
            return row
    have = ", ".join(str(r["boundary"]) for r in bench["rows"])
    raise ValueError(f"the bench JSON has no row at boundary {boundary} (has: {have})")


def project(bench: dict[str, Any], volumes_at: dict[int, Volumes], boundary: int,
            gpus: Sequence[int] = DEFAULT_GPUS, bandwidth_gbps: float = 100.0, latency_us: float = 10.0,
            sync_every: int = 1, bucket_mb: float = 25.0) -> list[Row]:
    """Projected rows for every N in ``gpus`` and every mode at ``boundary``.

    ``volumes_at`` maps a boundary to its :class:`Volumes` and must hold 0 and ``boundary``.
    """
    if sync_every < 1:
        raise ValueError("sync_every must be >= 1")
    alpha = latency_us * 1e-6
    beta = bandwidth_gbps * 1e9 / 8
    bucket = bucket_mb * 1024 * 1024
    sgd_row, row = bench_row(bench, 0), bench_row(bench, boundary)
    vol0, vol = volumes_at[0], volumes_at[boundary]
    out: list[Row] = []
    for n in gpus:
        for mode in MODES:
            if mode == "sgd":
                b, compute, grad, delta = 0, float(sgd_row["sgd_s"]), vol0.all_grad_bytes, 0.0
            elif mode == "freeze":
                b, compute, grad, delta = boundary, float(row["frozen_s"]), vol.suffix_grad_bytes, 0.0
            else:
                b, compute, grad = boundary, float(row["local_s"]), vol.suffix_grad_bytes
                delta = vol.delta_sync_bytes if boundary > 0 else 0.0
            comm = bucketed_allreduce_s(grad, n, alpha, beta, bucket)
            comm += ring_allreduce_s(delta, n, alpha, beta) / sync_every
            out.append(Row(n, mode, b, compute, comm, compute + comm, grad + delta / sync_every))
    return out


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table."""
    head = f"{'N':>5} {'mode':>6} {'boundary':>8} {'compute_s':>10} {'comm_s':>10} {'step_s':>10} " \
           f"{'allreduce_bytes':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.gpus:>5} {r.mode:>6} {r.boundary:>8} {r.compute_s:>10.5f} {r.comm_s:>10.5f} "
                     f"{r.step_s:>10.5f} {r.allreduce_bytes:>16,.0f}")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W, got {text!r}")
    return parts[0], parts[1], parts[2]


def parse_gpus(text: str) -> list[int]:
    """``"8,16,32"`` -> ``[8, 16, 32]``."""
    gpus = [int(p) for p in text.split(",")]
    if min(gpus) < 1:
        raise argparse.ArgumentTypeError("GPU counts must be >= 1")
    return gpus


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", type=Path, help="a profiling/bench.py --json file")
    p.add_argument("--boundary", type=int, default=None,
                   help="boundary of local/freeze (default: the middle bench row)")
    p.add_argument("--model", default=None, help="model name (default: the bench JSON's 'model')")
    p.add_argument("--data-shape", type=parse_shape, default=(3, 32, 32), help="C,H,W (default 3,32,32)")
    p.add_argument("--classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--bandwidth-gbps", type=float, default=100.0, help="link bandwidth, Gbit/s (default 100)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per-message latency α, µs (default 10)")
    p.add_argument("--sync-every", type=int, default=1, help="local.sync_every (default 1)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket size, MB (default 25)")
    p.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient element (default 4)")
    p.add_argument("--gpus", type=parse_gpus, default=list(DEFAULT_GPUS),
                   help="GPU counts (default 8,16,...,1024)")
    p.add_argument("--json", type=Path, default=None, help="also write the projection here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the projection table (and write ``--json``); returns the exit code."""
    args = build_parser().parse_args(argv)
    bench = json.loads(args.bench.read_text())
    model = args.model or bench["model"]
    boundaries = sorted(int(r["boundary"]) for r in bench["rows"])
    boundary = args.boundary if args.boundary is not None else boundaries[len(boundaries) // 2]
    rule = bench.get("rule", "softhebb")
    try:
        bench_row(bench, 0)
        bench_row(bench, boundary)
        volumes_at = {b: model_volumes(model, args.data_shape, args.classes, b, args.grad_bytes, rule)
                      for b in {0, boundary}}
        rows = project(bench, volumes_at, boundary, args.gpus, args.bandwidth_gbps, args.latency_us,
                       args.sync_every, args.bucket_mb)
    except ValueError as exc:
        print(f"project.py: error: {exc}", file=sys.stderr)
        return 2
    vol = volumes_at[boundary]
    print(f"{BANNER}: {model} (bench on {bench.get('device', '?')}, per-GPU batch "
          f"{bench.get('batch_size', '?')}), boundary {boundary}, {args.bandwidth_gbps:g} Gbit/s, "
          f"{args.latency_us:g} us, sync_every {args.sync_every}")
    print(f"bytes: all grads {vol.all_grad_bytes:,}, suffix grads {vol.suffix_grad_bytes:,}, "
          f"prefix params {vol.prefix_param_bytes:,}, delta sync {vol.delta_sync_bytes:,}")
    for a in ASSUMPTIONS:
        print(f"assumption: {a}")
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "kind": "projection", "note": BANNER, "assumptions": list(ASSUMPTIONS),
            "bench": str(args.bench), "model": model, "data_shape": list(args.data_shape),
            "classes": args.classes, "boundary": boundary, "bandwidth_gbps": args.bandwidth_gbps,
            "latency_us": args.latency_us, "sync_every": args.sync_every, "bucket_mb": args.bucket_mb,
            "volumes": {str(b): asdict(v) for b, v in sorted(volumes_at.items())},
            "rows": [asdict(r) for r in rows],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
