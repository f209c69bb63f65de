"""The in-process parts of ``profiling/device_check.sh`` and its summary.

    python profiling/device_check.py syncs   --device cuda --out DIR   # host syncs in steady state
    python profiling/device_check.py memory  --device cuda --out DIR   # one local step vs one SGD step
    python profiling/device_check.py summary --out DIR                 # DIR/summary.{json,md}
    python profiling/device_check.py syncs memory summary --device cpu --out DIR --set model=convnet

``syncs``: a 1-process Trainer (``--set model=...``, synthetic 32x32 data, boundary at mid depth)
runs warm-up steps, then steady-state steps (no scheduled read among them) under
``torch.cuda.set_sync_debug_mode("warn")`` (every synchronizing CUDA call warns) and
:class:`distlocal.hostsync.HostReadCounter`; writes the warnings and the host reads. ``memory``:
one local step next to one SGD step: the profiler's peak footprint by category, and on CUDA
``max_memory_allocated`` and an allocator snapshot (``torch.cuda.memory._record_memory_history``;
open it at https://pytorch.org/memory_viz). On CPU the same steps run: the host reads are counted
with the accelerator paths forced and the footprint is measured, and the JSON says plainly that the
CUDA measurements (sync debug mode, allocator peak and snapshot) were not available.
``summary``: the bench tables, the issue's GPU targets checked, the training run's speedup and
footprint.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    import torch

    from distlocal.trainer import Trainer

TARGET_LOCAL_IDEAL, TARGET_SGD_LOCAL = 1.10, 1.3
# What a CPU run writes where a CUDA measurement would be: plainly absent, not silently skipped.
NO_CUDA = "not measured: {what} (CUDA only; this run: --device cpu)"


def _trainer(device: str, mode: str, batch: int, steps: int, run_dir: Path, extra: list[str]) -> Trainer:
    """A 1-process Trainer on synthetic data, its boundary at mid depth (mode local/freeze).

    One epoch of ``steps + 2`` batches: the ``steps`` a part runs are never the epoch's last (which
    syncs and reads by design), and the scheduled reads (``trainer.log_every``,
    ``local.auto_freeze.check_every``) fall after them: every step measured is a steady-state step.
    """
    import torch

    from distlocal.config import compose
    from distlocal.parallel.env import DistEnv
    from distlocal.trainer import Trainer

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    cfg = compose(["data=synthetic", "data.shape=[3,32,32]", "data.num_classes=10",
                   f"data.train_size={batch * (steps + 2)}", "data.test_size=64",
                   f"trainer.batch_size={batch}",
                   f"mode={mode}", f"trainer.device={device}", "trainer.epochs=1", "trainer.progress=false",
                   f"trainer.log_every={steps + 1}", f"local.auto_freeze.check_every={steps + 1}",
                   "wandb.mode=disabled", "profiler.enabled=false", "checkpoint.enabled=false", *extra])
    trainer = Trainer.build(cfg, run_dir, env)
    if mode != "sgd":
        trainer.move_boundary(trainer.model.num_stages // 2)
    return trainer


def _batches(trainer: Trainer, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches fetched up front (pinned on CUDA, so that the step's ``non_blocking`` copies are
    asynchronous): the loader's host work is no step's sync."""
    it = iter(trainer.data.train)
    pin = trainer.env.device.type == "cuda"
    return [tuple(t.pin_memory() if pin else t for t in next(it)) for _ in range(n)]


def syncs(args: argparse.Namespace) -> dict[str, Any]:
    """Host syncs (CUDA sync-debug warnings) and host reads per steady-state step.

    On CPU there is no sync debug mode (``torch.cuda.set_sync_debug_mode`` needs CUDA): the same
    steps run with the accelerator paths forced and the host reads are counted; ``sync_warnings`` is
    ``None`` and ``sync_debug_mode`` says why.
    """
    import torch

    from distlocal.hostsync import HostReadCounter, force_accelerator_paths

    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(args.device, "local", args.batch, args.warmup + args.steps, Path(tmp) / "run",
                           args.overrides)
        feed = iter(_batches(trainer, args.warmup + args.steps))
        for step in range(args.warmup):
            trainer.train_step(step, feed)
        forced = contextlib.nullcontext() if cuda else force_accelerator_paths()
        with forced, warnings.catch_warnings(record=True) as caught, HostReadCounter() as counter:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.synchronize()  # the warm-up's queue drained: only the window's syncs warn
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for step in range(args.warmup, args.warmup + args.steps):
                    trainer.train_step(step, feed)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        cfg = trainer.cfg
        del trainer
    # c10's warning text: "called a synchronizing CUDA operation".
    sync_warnings = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"device": args.device, "steps": args.steps, "warmup": args.warmup,
            "sync_debug_mode": "warn" if cuda else NO_CUDA.format(what="torch.cuda.set_sync_debug_mode"),
            "sync_warnings": len(sync_warnings) if cuda else None,
            "sync_warning_lines": sorted(set(sync_warnings))[:20],
            "accelerator_paths_forced": not cuda, "host_reads": counter.total,
            "host_reads_by_kind": counter.counts, "host_read_sites": sorted(set(counter.where))[:20],
            "log_every": cfg.trainer.log_every, "check_every": cfg.local.auto_freeze.check_every}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """One local step next to one SGD step: the peak footprint by category (any device, the
    profiler's tracker), and on CUDA the allocator's peak and a snapshot of the step."""
    import torch

    from distlocal.profiler.footprint import measure_footprint
    from distlocal.profiler.memory import MemorySnapshot, cuda_peak, reset_cuda_peak

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    no_cuda = NO_CUDA.format(what="the allocator's peak and snapshot")
    out: dict[str, Any] = {"device": args.device, "cuda": "measured" if cuda else no_cuda}
    for mode in ("local", "sgd"):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = _trainer(args.device, mode, args.batch, 4, Path(tmp) / "run", args.overrides)
            feed = iter(_batches(trainer, 4))
            for step in range(2):  # warm-up: optimizer state and allocator caches exist
                trainer.train_step(step, feed)
            fp = measure_footprint(lambda t=trainer, f=feed: t.train_step(2, f), device,
                                   modules=(trainer.model,), optimizers=(trainer.engine.optimizer,),
                                   local=(trainer.learner.buffer,))
            snap = MemorySnapshot(cuda, device, log=lambda line: print(line, file=sys.stderr))
            reset_cuda_peak(device)
            snap.start()
            trainer.train_step(3, feed)
            peak = cuda_peak(device)
            written = snap.dump(Path(tmp), 0)
            if written is not None:
                shutil.move(written, args.out / f"memory_{mode}.pickle")  # tmp may be another filesystem
            out[mode] = {**fp.as_metrics(), "max_memory_allocated": peak,
                         "snapshot": f"memory_{mode}.pickle" if written is not None else None}
            # The next mode's peak and snapshot must not hold this trainer (reference cycles).
            del trainer, feed
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return out


def _ratio(row: dict[str, Any], a: str, b: str) -> float | None:
    return row[f"{a}_s"] / row[f"{b}_s"] if row.get(f"{b}_s") else None


def _bench(out: Path) -> tuple[list[dict[str, Any]], list[tuple[str, bool]]]:
    """The bench rows of ``out/bench_*.json``, and the GPU targets checked on those run on CUDA (a CPU
    run's figures are no GPU figures: listed, not checked)."""
    bench_rows, checks = [], []
    for path in sorted(out.glob("bench_*.json")):
        doc = json.loads(path.read_text())
        rows = doc["rows"]
        deepest = max(r["boundary"] for r in rows)
        gpu = doc["device"].startswith("cuda")
        for r in rows:
            row = {"run": path.stem, "device": doc["device"], "batch": doc["batch_size"],
                   "precision": doc["precision"], "boundary": r["boundary"],
                   "local/ideal": _ratio(r, "local", "ideal"), "sgd/local": _ratio(r, "sgd", "local"),
                   "local_s": r["local_s"], "local_cuda_peak_bytes": r.get("local_cuda_peak_bytes")}
            bench_rows.append(row)
            if not gpu:
                continue
            checks.append((f"{path.stem} b{r['boundary']} local/ideal <= {TARGET_LOCAL_IDEAL}",
                           row["local/ideal"] is not None and row["local/ideal"] <= TARGET_LOCAL_IDEAL))
            if r["boundary"] == deepest and doc["batch_size"] >= 256:
                checks.append((f"{path.stem} b{r['boundary']} sgd/local >= {TARGET_SGD_LOCAL}",
                               row["sgd/local"] is not None and row["sgd/local"] >= TARGET_SGD_LOCAL))
    return bench_rows, checks


def summary(args: argparse.Namespace) -> dict[str, Any]:
    """Collect DIR's JSON into one document and a markdown table; check the GPU targets."""
    bench_rows, checks = _bench(args.out)
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
    if not doc["targets"]:
        lines.append("- GPU targets not checked: no part ran on CUDA")
    if doc["train"]:
        lines.append(f"- training run: {doc['train'].get('headline', 'no headline')}")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> None:
    """Run the parts in order, in one process (one import of torch and the trainer); each writes its
    JSON to ``--out`` (``syncs.json``, ``memory.json``; ``summary`` reads them, then the rest)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=list(PARTS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for syncs and memory, e.g. --set model=resnet18 (last option)")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.batch < 1:
        ap.error("--batch, --warmup and --steps must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        print(f"device_check: {part}", file=sys.stderr, flush=True)
        result = PARTS[part](args)
        if part != "summary":
            (args.out / f"{part}.json").write_text(json.dumps(result, indent=2) + "\n")


PARTS = {"syncs": syncs, "memory": memory, "summary": summary}


if __name__ == "__main__":
    main()
