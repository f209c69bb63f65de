"""Compare the local rules, freezing and plain SGD on one model/data set; print a Markdown table.

    python profiling/rules_table.py --model convnet --epochs 8 --seeds 0 1 2 > table.md

Each row is a real training run (in this process, one after another, same seeds), so the
figures in docs/local-rules.md can be regenerated with the command printed above the table.
Extra Hydra overrides after ``--`` apply to every run (e.g. ``-- trainer.batch_size=128``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

from distlocal.config import compose
from distlocal.trainer import train

VARIANTS: dict[str, list[str]] = {
    "sgd": ["mode=sgd"],
    "freeze": ["mode=freeze"],
    "hebb": ["mode=local", "local.rule=hebb", "local.lr=1e-4"],
    "oja": ["mode=local", "local.rule=oja", "local.lr=1e-4"],
    "softhebb": ["mode=local", "local.rule=softhebb", "local.lr=1e-3"],
    "softhebb/update_every=4": ["mode=local", "local.rule=softhebb", "local.lr=1e-3", "local.update_every=4"],
    "softhebb/sample_fraction=0.25": ["mode=local", "local.rule=softhebb", "local.lr=1e-3",
                                      "local.sample_fraction=0.25"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="convnet")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    print(f"<!-- python profiling/rules_table.py {' '.join(sys.argv[1:])} -->")
    print(f"model `{args.model}`, data `{args.data}`, {args.epochs} epochs, seeds {args.seeds}, "
          f"median over seeds; extra overrides: {extra or 'none'}\n")
    print("| variant | final acc % (median) | accs per seed | end-to-end s (median) | final boundary |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            accs, times, bounds = [], [], []
            for seed in args.seeds:
                cfg = compose([f"model={args.model}", f"data={args.data}", f"trainer.epochs={args.epochs}",
                               f"trainer.seed={seed}", "wandb.mode=disabled", "trainer.progress=false",
                               "checkpoint.enabled=false", *VARIANTS[name], *extra])
                with contextlib.redirect_stdout(sys.stderr):  # keep stdout the table alone
                    s = train(cfg, Path(tmp) / f"{name.replace('/', '_')}_{seed}")
                accs.append(s["final_test_acc"])
                times.append(s["end_to_end_s"])
                bounds.append(s["final_boundary"])
            print(f"| {name} | {statistics.median(accs):.2f} | {', '.join(f'{a:.2f}' for a in accs)} | "
                  f"{statistics.median(times):.1f} | {max(bounds)} |", flush=True)


if __name__ == "__main__":
    main()
