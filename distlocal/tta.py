"""Time to accuracy: when a run first reached each accuracy, on every training clock.

Each evaluation (``trainer.eval_every_steps``, and every epoch end) is a *point*: the accuracy on
the tracked split (the validation split if the run has one, else the test set), the global step,
and the cumulative training time on each clock (:mod:`distlocal.profiler.clocks`: ``wall_s``, ``cpu_s``,
``device_s``; evaluation excluded). A threshold is *reached* at the first point whose accuracy is
``>=`` it; its time is that point's (no interpolation: the resolution is the evaluation period).

The summary's threshold grid is every whole percentage point (1 %, 2 %, …) up to the best accuracy
reached, plus the final accuracy itself (the last point's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from distlocal.trainer import Trainer

CLOCKS = ("wall", "cpu", "device")
"""The clocks a point carries, each as ``<clock>_s``."""

GRID_STEP = 1.0
"""The summary's threshold grid, in accuracy points (every whole percent)."""


def first_crossing(points: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point (in step order as given) whose ``acc`` is ``>= target``; ``None`` if none."""
    return next((p for p in points if p.get("acc") is not None and p["acc"] >= target), None)


def grid(best: float) -> list[float]:
    """The thresholds up to ``best``: every :data:`GRID_STEP` points from the first one."""
    return [GRID_STEP * i for i in range(1, int(math.floor(best / GRID_STEP + 1e-9)) + 1)]


def _label(threshold: float) -> str:
    return f"{threshold:g}"


class TimeToAccuracy:
    """The run's evaluation points; carried in the checkpoint so a resumed run keeps its history."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.points: list[dict[str, Any]] = []

    def observe(self, acc: float, step: int, times: dict[str, float | None]) -> dict[str, Any]:
        """Record one evaluation: ``times`` has ``train_<clock>_s`` (a clocks reading); returns the point."""
        point = {"acc": float(acc), "step": int(step),
                 **{f"{c}_s": times.get(f"train_{c}_s") for c in CLOCKS}}
        self.points.append(point)
        return point

    def summary(self) -> dict[str, Any]:
        """``time_to_acc``: per reached threshold (``"85"``), the first point's step and clock times;
        ``time_to_final_acc_*``: the same for the final accuracy (``tta_final_acc``). Empty without points."""
        if not self.points:
            return {}
        best = max(p["acc"] for p in self.points)
        final = self.points[-1]["acc"]
        table = {}
        for t in grid(best):
            p = first_crossing(self.points, t)
            table[_label(t)] = {k: v for k, v in p.items() if k != "acc"}  # reached: best >= t
        hit = first_crossing(self.points, final) or self.points[-1]
        out: dict[str, Any] = {"tta_split": self.split, "tta_final_acc": final,
                               "time_to_final_acc_step": hit["step"]}
        out.update({f"time_to_final_acc_{c}_s": hit[f"{c}_s"] for c in CLOCKS})
        out["time_to_acc"] = table
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (the checkpoint loads with ``weights_only=True``)."""
        return {"split": self.split, "points": [dict(p) for p in self.points]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s points (the run goes on adding to them)."""
        self.split = state["split"]
        self.points = [dict(p) for p in state["points"]]


TRAIN_KEYS = ("train_wall_s", "train_cpu_s", "train_cpu_max_s", "train_device_s")
"""The cumulative clock keys (:meth:`distlocal.profiler.clocks.TrainClocks.read`) of evaluations and
the summary."""


# ------------------------------------------------------------------ the trainer's hooks
def _record(trainer: Trainer, epoch: int, loss: float, acc: float, times: dict[str, Any]) -> dict[str, Any]:
    """Add the evaluation's point; returns its ``metrics.jsonl`` row (``kind: eval``)."""
    step = trainer.loop.global_step
    trainer.tta.observe(acc, step, times)
    return {"kind": "eval", "epoch": epoch, "global_step": step, "split": trainer.tta.split,
            "eval_loss": loss, "eval_acc": acc, **{k: times[k] for k in TRAIN_KEYS}}


def periodic_evaluation(trainer: Trainer, epoch: int) -> None:
    """``trainer.eval_every_steps``: evaluate between two steps and log the row, every training clock
    (and the profiler's timed window) stopped meanwhile. The evaluation runs under a forked RNG: the
    loader's iterator draws a seed from torch's generator, which the training must not see (a
    resumed run would otherwise diverge from an uninterrupted one)."""
    loader = trainer.data.test if trainer.data.val is None else trainer.data.val
    trainer.clocks.pause()
    cuda = [torch.cuda.current_device()] if trainer.env.device.type == "cuda" else []
    with trainer.prof.excluded(), torch.random.fork_rng(devices=cuda):
        loss, acc = trainer.evaluate(loader)
        row = _record(trainer, epoch, loss, acc, trainer.clocks.read(trainer.env))
    trainer.logger.log(row)
    trainer.clocks.resume()


def epoch_end_evaluation(trainer: Trainer, row: dict[str, Any]) -> dict[str, Any] | None:
    """At the epoch end (clocks paused): put the clock keys (``epoch_cpu_s``, ``train_cpu_s``, …,
    ``global_step``) into the epoch's ``row``, record the epoch's evaluation of the tracked split as a
    point, close the epoch's clocks. Returns the evaluation row to log when ``trainer.eval_every_steps``
    is set (the series of evaluations then ends each epoch), else ``None``."""
    times = trainer.clocks.read(trainer.env)
    row.update(times)
    row["global_step"] = trainer.loop.global_step
    split = trainer.tta.split
    eval_row = _record(trainer, row["epoch"], row[f"{split}_loss"], row[f"{split}_acc"], times)
    trainer.clocks.end_epoch()
    return eval_row if trainer.cfg.trainer.eval_every_steps else None


def run_summary(trainer: Trainer) -> dict[str, Any]:
    """The summary's clock totals (:data:`TRAIN_KEYS`) and :meth:`TimeToAccuracy.summary` (a collective)."""
    times = trainer.clocks.read(trainer.env)
    return {**{k: times[k] for k in TRAIN_KEYS}, **trainer.tta.summary()}


def with_time_to_accuracy(line: str | None, summary: dict[str, Any]) -> str | None:
    """The run's last line with :func:`headline_part` appended (or alone, without a profiler line)."""
    part = headline_part(summary)
    return " | ".join(p for p in (line, part) if p) or None


def headline_part(summary: dict[str, Any]) -> str | None:
    """The run's last line's time-to-accuracy part, on the CPU clock, e.g.
    ``88.21 % test at 412.3 s CPU (step 5622)``; ``None`` without points."""
    acc, cpu = summary.get("tta_final_acc"), summary.get("time_to_final_acc_cpu_s")
    if acc is None:
        return None
    when = f"{cpu:.1f} s CPU" if cpu is not None else "? s CPU"
    step = summary.get("time_to_final_acc_step")
    return f"{acc:.2f} % {summary.get('tta_split', '')} at {when} (step {step})"
