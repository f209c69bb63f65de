"""Does the reported ``speedup`` match what the run really saves? A short, reproducible check.

    OMP_NUM_THREADS=1 python profiling/speedup_check.py --json docs/bench/speedup_check.json

For each lever setting (``local.update_every=4``, ``local.sync_every=4``, neither) it runs, in
alternation and in one process (so load changes hit every variant alike), on digits with the
convnet, 1 process, the boundary at 6 of 7 from epoch 1:

* an ``sgd`` run and the ``local`` run with the profiler off: their train-loop times (the sum of
  ``epoch_time_s`` over the epochs from 1 on) give the *measured* ratio, sgd / local;
* the same ``local`` run with the profiler on: the *reported* ``speedup`` (mean over epochs >= 1).

``--rounds`` repeats the alternation; the table gives the median over rounds of both figures and
their ratio (reported / measured; within 1 +- 0.10 is what the profiler promises).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COMMON = ["model=convnet", "data=digits", "schedule=static", "schedule.warmup_epochs=1", "schedule.step=6",
          "wandb.mode=disabled", "trainer.progress=false", "checkpoint.enabled=false"]
LEVERS = {"update_every=1": [], "update_every=4": ["local.update_every=4"],
          "sync_every=4": ["local.sync_every=4"]}


def _run(overrides: list[str], out: Path) -> list[dict[str, Any]]:
    """One training run in this process; its metrics.jsonl rows."""
    from distlocal.config import compose
    from distlocal.trainer import train

    train(compose(overrides), out)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _loop(rows: list[dict[str, Any]]) -> float:
    return sum(r["epoch_time_s"] for r in rows if r["epoch"] >= 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the pairs, print the table, optionally write the JSON; returns the document."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--max-steps-per-epoch", type=int, default=None,
                    help="cap every epoch (trainer.max_steps_per_epoch): a smoke run that only shows the "
                         "check runs (device_check.sh on CPU); its figures are noise")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    common = COMMON + [f"trainer.epochs={args.epochs}"]
    if args.max_steps_per_epoch is not None:
        common.append(f"trainer.max_steps_per_epoch={args.max_steps_per_epoch}")
    res: dict[str, dict[str, list[float]]] = {k: {"measured": [], "reported": []} for k in args.levers}
    sgd_loops: list[float] = []
    t0 = time.time()
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        n = 0

        def run(extra: list[str]) -> list[dict[str, Any]]:
            nonlocal n
            n += 1
            return _run(common + extra, Path(tmp) / f"run{n}")

        for _ in range(args.rounds):
            sgd = _loop(run(["mode=sgd", "profiler.enabled=false"]))
            sgd_loops.append(sgd)
            for lever in args.levers:
                off = _loop(run(["mode=local", "profiler.enabled=false", *LEVERS[lever]]))
                on = run(["mode=local", *LEVERS[lever]])
                res[lever]["measured"].append(sgd / off)
                res[lever]["reported"].append(statistics.fmean(r["speedup"] for r in on if r["epoch"] >= 1))
                load.append(os.getloadavg()[0])
    rows = []
    for lever, v in res.items():
        m, r = statistics.median(v["measured"]), statistics.median(v["reported"])
        rows.append({"lever": lever, "measured": m, "reported": r, "reported_over_measured": r / m,
                     "measured_rounds": v["measured"], "reported_rounds": v["reported"]})
    used = sys.argv[1:] if argv is None else argv
    doc = {"command": "OMP_NUM_THREADS=1 python profiling/speedup_check.py " + " ".join(used),
           "config": common, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "load_avg_1min": load, "wall_s": time.time() - t0,
           "sgd_loop_s": sgd_loops, "rows": rows}
    print(f"{'lever':<16}{'measured':>10}{'reported':>10}{'rep/meas':>10}")
    for r in rows:
        print(f"{r['lever']:<16}{r['measured']:>10.3f}{r['reported']:>10.3f}{r['reported_over_measured']:>10.3f}")
    print(f"load average (1 min) during the runs: {', '.join(f'{x:.1f}' for x in load)}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
