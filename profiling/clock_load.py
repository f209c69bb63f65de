"""Shown once: does load bend the CPU clock? The same short run, alone and beside busy processes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python profiling/clock_load.py --json docs/bench/clock_load.json

Runs the same single-process training run (``--overrides``) twice in a row in fresh processes:
once as is, once with ``--busy`` (default 2) spinning Python processes beside it. Reports each
run's ``train_cpu_s`` and ``train_wall_s`` (summary.json; distlocal/profiler/clocks.py) and how much the
busy processes moved each clock. Not a test: its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["data=digits", "model=convnet", "mode=sgd", "trainer.epochs=2",
             "trainer.max_steps_per_epoch=25", "profiler.enabled=false", "wandb.mode=disabled",
             "trainer.progress=false", "checkpoint.enabled=false"]


def _spin() -> None:
    while True:  # a busy neighbour: all CPU, no memory traffic to speak of
        pass


def run_once(overrides: list[str], busy: int) -> dict[str, float]:
    """One training run in a fresh process, ``busy`` spinning processes beside it; its clock totals."""
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *overrides,
                            f"hydra.run.dir={tmp}/run"], cwd=REPO, env=env, check=True, capture_output=True)
            summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    return {"busy": busy, "train_cpu_s": summary["train_cpu_s"], "train_wall_s": summary["train_wall_s"],
            "final_test_acc": summary["final_test_acc"]}


def main(argv: list[str] | None = None) -> dict:
    """Run alone, then beside the busy processes; print and (``--json``) save the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=2, help="spinning processes beside the loaded run")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--overrides", nargs="*", default=OVERRIDES, help="the run's overrides")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    alone = run_once(args.overrides, 0)
    loaded = run_once(args.overrides, args.busy)
    out = {
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=. python profiling/clock_load.py " + " ".join(sys.argv[1:]),
        "overrides": args.overrides, "cpu_count": os.cpu_count(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "alone": alone, "loaded": loaded,
        "cpu_change": loaded["train_cpu_s"] / alone["train_cpu_s"] - 1,
        "wall_change": loaded["train_wall_s"] / alone["train_wall_s"] - 1,
    }
    print(f"alone: cpu {alone['train_cpu_s']:.2f} s wall {alone['train_wall_s']:.2f} s | "
          f"with {args.busy} busy: cpu {loaded['train_cpu_s']:.2f} s ({out['cpu_change']:+.1%}) "
          f"wall {loaded['train_wall_s']:.2f} s ({out['wall_change']:+.1%})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
