"""The in-process parts of ``profiling/device_check.sh`` and its summary.

    python profiling/device_check.py syncs   --device cuda --out DIR   # host syncs in steady state
    python profiling/device_check.py memory  --device cuda --out DIR   # one local step vs one SGD step
    python profiling/device_check.py summary --out DIR                 # DIR/summary.{json,md}

``syncs``: a Trainer (ResNet-18, synthetic 32x32 data, boundary at mid depth) runs warm-up steps,
then steady-state steps under ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronizing
CUDA call warns) and :class:`distlocal.hostsync.HostReadCounter`; writes the warnings and reads
per step. On CPU there is no sync debug mode: the accelerator paths are forced and the reads
counted. ``memory``: ``torch.cuda.memory._record_memory_history`` around one local step and one
SGD step, dumped as snapshots (open them at https://pytorch.org/memory_viz), with
``max_memory_allocated``; on CPU the steps run and no snapshot is written. ``summary``: the
bench tables, the issue's GPU targets checked, the training run's speedup and footprint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distlocal.config import compose  # noqa: E402
from distlocal.hostsync import HostReadCounter, force_accelerator_paths  # noqa: E402
from distlocal.parallel.env import DistEnv  # noqa: E402
from distlocal.trainer import Trainer  # noqa: E402

TARGET_LOCAL_IDEAL, TARGET_SGD_LOCAL = 1.10, 1.3


def _trainer(device: str, mode: str, batch: int, run_dir: Path, extra: list[str]) -> Trainer:
    """A 1-process Trainer on synthetic data, its boundary at mid depth (mode local/freeze)."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    cfg = compose(["data=synthetic", "data.shape=[3,32,32]", "data.num_classes=10",
                   f"data.train_size={batch * 64}", "data.test_size=64", f"trainer.batch_size={batch}",
                   f"mode={mode}", f"trainer.device={device}", "trainer.epochs=1", "trainer.progress=false",
                   "wandb.mode=disabled", "profiler.enabled=false", "checkpoint.enabled=false", *extra])
    trainer = Trainer.build(cfg, run_dir, env)
    if mode != "sgd":
        trainer.move_boundary(trainer.model.num_stages // 2)
    return trainer


def _batches(trainer: Trainer, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches fetched up front: the loader's host work is no step's sync."""
    it = iter(trainer.data.train)
    return [next(it) for _ in range(n)]


def syncs(args: argparse.Namespace) -> dict[str, Any]:
    """Host syncs (CUDA sync-debug warnings) and host reads per steady-state step."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(args.device, "local", args.batch, Path(tmp) / "run", args.overrides)
        feed = iter(_batches(trainer, args.warmup + args.steps))
        for step in range(args.warmup):
            trainer.train_step(step, feed)
        cuda = args.device == "cuda"
        forced = contextlib.nullcontext() if cuda else force_accelerator_paths()
        with forced, warnings.catch_warnings(record=True) as caught, HostReadCounter() as counter:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for step in range(args.warmup, args.warmup + args.steps):
                    trainer.train_step(step, feed)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
    sync_warnings = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"device": args.device, "steps": args.steps, "sync_warnings": len(sync_warnings) if cuda else None,
            "sync_warning_lines": sorted(set(sync_warnings))[:20], "host_reads": counter.total,
            "host_reads_by_kind": counter.counts, "host_read_sites": sorted(set(counter.where))[:20],
            "log_every": trainer.cfg.trainer.log_every,
            "check_every": trainer.cfg.local.auto_freeze.check_every}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """One local step next to one SGD step: peak device memory and (CUDA) allocator snapshots."""
    out: dict[str, Any] = {"device": args.device}
    cuda = args.device == "cuda"
    for mode in ("local", "sgd"):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = _trainer(args.device, mode, args.batch, Path(tmp) / "run", args.overrides)
            feed = iter(_batches(trainer, 3))
            for step in range(2):  # warm-up: optimizer state and allocator caches exist
                trainer.train_step(step, feed)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            trainer.train_step(2, feed)
            if cuda:
                torch.cuda.synchronize()
                path = args.out / f"memory_{mode}.pickle"
                torch.cuda.memory._dump_snapshot(str(path))
                torch.cuda.memory._record_memory_history(enabled=None)
                out[mode] = {"max_memory_allocated": int(torch.cuda.max_memory_allocated()),
                             "snapshot": path.name}
            else:
                out[mode] = {"max_memory_allocated": None, "snapshot": None}
    return out


def _ratio(row: dict[str, Any], a: str, b: str) -> float | None:
    return row[f"{a}_s"] / row[f"{b}_s"] if row.get(f"{b}_s") else None


def summary(args: argparse.Namespace) -> dict[str, Any]:
    """Collect DIR's JSON into one document and a markdown table; check the GPU targets."""
    bench_rows, checks = [], []
    for path in sorted(args.out.glob("bench_*.json")):
        doc = json.loads(path.read_text())
        rows = doc["rows"]
        deepest = max(r["boundary"] for r in rows)
        for r in rows:
            row = {"run": path.stem, "batch": doc["batch_size"], "precision": doc["precision"],
                   "boundary": r["boundary"], "local/ideal": _ratio(r, "local", "ideal"),
                   "sgd/local": _ratio(r, "sgd", "local"), "local_s": r["local_s"],
                   "local_cuda_peak_bytes": r.get("local_cuda_peak_bytes")}
            bench_rows.append(row)
            checks.append((f"{path.stem} b{r['boundary']} local/ideal <= {TARGET_LOCAL_IDEAL}",
                           row["local/ideal"] is not None and row["local/ideal"] <= TARGET_LOCAL_IDEAL))
            if r["boundary"] == deepest and doc["batch_size"] >= 256:
                checks.append((f"{path.stem} b{r['boundary']} sgd/local >= {TARGET_SGD_LOCAL}",
                               row["sgd/local"] is not None and row["sgd/local"] >= TARGET_SGD_LOCAL))
    doc: dict[str, Any] = {"bench": bench_rows}
    for name in ("syncs", "memory", "speedup_check"):
        path = args.out / f"{name}.json"
        doc[name] = json.loads(path.read_text()) if path.is_file() else None
    train = args.out / "train" / "summary.json"
    doc["train"] = json.loads(train.read_text()) if train.is_file() else None
    if doc["syncs"] and doc["syncs"]["sync_warnings"] is not None:
        checks.append(("no host-sync warning in steady state", doc["syncs"]["sync_warnings"] == 0))
    doc["targets"] = [{"target": t, "met": bool(ok)} for t, ok in checks]
    (args.out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["| run | boundary | local/ideal | sgd/local | local step (ms) |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['boundary']} | {_fmt(r['local/ideal'])} | {_fmt(r['sgd/local'])} | "
              f"{1e3 * r['local_s']:.2f} |" for r in bench_rows]
    lines += ["", *(f"- {'met' if t['met'] else 'NOT met'}: {t['target']}" for t in doc["targets"])]
    if doc["train"]:
        lines.append(f"- training run: {doc['train'].get('headline', 'no headline')}")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> None:
    """Run one part; its JSON goes to ``--out`` (``syncs.json``, ``memory.json``, ``summary.json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["syncs", "memory", "summary"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model=resnet18")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"syncs": syncs, "memory": memory, "summary": summary}[args.part](args)
    if args.part != "summary":
        (args.out / f"{args.part}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
