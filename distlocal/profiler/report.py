"""The report: an epoch's time and memory keys, the run summary and the line a run ends with."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from distlocal.profiler.footprint import CATEGORIES

HEADLINE_KEYS = ("end_to_end_s", "speedup", "footprint_ref_bytes", "footprint_bytes", "footprint_reduction",
                 "activation_bytes_ref", "activation_bytes", "activation_reduction",
                 "grad_allreduce_bytes", "delta_sync_bytes", "comm_bytes_per_step")
"""The keys a run leads with (``summary.json``, the wandb summary, the last stdout line)."""

FOOTPRINT_KEYS = ("footprint_bytes", *(f"footprint_{c}_bytes" for c in CATEGORIES.values()),
                  "footprint_local_buffer_bytes")


def ratio(ref: float | None, now: float | None) -> float | None:
    """``ref / now``; ``None`` when either is unknown (or ``now`` is 0)."""
    return ref / now if ref is not None and now else None


def as_reference(fp: dict[str, Any], act: int | None) -> dict[str, Any]:
    """A run's own footprint keys and saved bytes ``act`` as the reference's (an epoch at boundary 0
    is its own reference)."""
    ref = {k.replace("footprint_", "footprint_ref_", 1): v for k, v in fp.items()
           if k.startswith("footprint_")}
    return {**ref, "cuda_step_peak_ref_bytes": fp.get("cuda_step_peak_bytes"), "activation_bytes_ref": act}


def time_keys(step_time: float | None, ref_step: float | None, n_timed: int, n_ref: int, n_profiled: int,
              overhead_s: float) -> dict[str, Any]:
    """An epoch's time keys: ``step_time_s`` (the timed steps' wall time over their number; ``None``
    when the epoch had no whole lever period to time), ``step_time_ref_s``, ``speedup`` (ref / this),
    ``timed_steps``, ``reference_steps``, ``profiled_steps`` and ``profiler_overhead_s`` (what the
    measurements added to the epoch: the reference steps, and the dedicated steps' excess over a
    timed step). The phases (``phase_<name>_s``) come from :class:`~distlocal.profiler.timing.PhaseTimer`."""
    return {"step_time_s": step_time, "step_time_ref_s": ref_step, "speedup": ratio(ref_step, step_time),
            "timed_steps": n_timed, "reference_steps": n_ref, "profiled_steps": n_profiled,
            "profiler_overhead_s": overhead_s}


def memory_keys(fp: dict[str, Any], ref: dict[str, Any], act: int | None,
                act_stage: list[int] | None) -> dict[str, Any]:
    """An epoch's footprint and activation keys, the run's (``fp``, ``act``, ``act_stage``) beside the
    reference's (``ref``): ``footprint_bytes``, ``footprint_<category>_bytes``, ``footprint_ref_bytes``
    (and its categories), ``footprint_reduction`` (ref / this), ``cuda_step_peak_bytes`` /
    ``cuda_step_peak_ref_bytes`` (CUDA allocator peak over the measured step; ``None`` on CPU),
    ``activation_bytes``, ``activation_bytes_stage``, ``activation_bytes_ref`` and
    ``activation_reduction`` (ref / this)."""
    row: dict[str, Any] = {k: fp.get(k) for k in FOOTPRINT_KEYS}
    row.update({k: v for k, v in ref.items() if k.startswith("footprint_ref_")})
    row["footprint_reduction"] = ratio(ref.get("footprint_ref_bytes"), fp.get("footprint_bytes"))
    row["cuda_step_peak_bytes"] = fp.get("cuda_step_peak_bytes")
    row["cuda_step_peak_ref_bytes"] = ref.get("cuda_step_peak_ref_bytes")
    row["activation_bytes"] = act
    row["activation_bytes_stage"] = act_stage
    row["activation_bytes_ref"] = ref.get("activation_bytes_ref")
    row["activation_reduction"] = ratio(ref.get("activation_bytes_ref"), act)
    return row


@dataclass
class RunTotals:
    """The run's totals over its epochs, for the summary."""

    loop_s: float = 0.0  # the epochs' loops without the profiler's own overhead
    steady_s: float = 0.0  # every step at its epoch's timed step time
    sgd_s: float = 0.0  # the same steps at the epoch's reference step time
    steps: int = 0
    overhead_s: float = 0.0
    speedups: list[float] = field(default_factory=list)

    def add_epoch(self, row: dict[str, Any], loop_s: float, steps: int, fixed_overhead_s: float) -> None:
        """Add an epoch's row (its ``step_time_s``, ``step_time_ref_s``, ``speedup``, overhead)."""
        # The copy's build and measured step happen before the epoch clock starts.
        self.loop_s += loop_s - (row["profiler_overhead_s"] - fixed_overhead_s)
        self.overhead_s += row["profiler_overhead_s"]
        step_time = row["step_time_s"]
        if step_time is not None:
            self.steady_s += step_time * steps
            self.sgd_s += (row["step_time_ref_s"] or step_time) * steps
        self.steps += steps
        if row["speedup"] is not None:
            self.speedups.append(row["speedup"])

    def summary(self, end_to_end_s: float | None, last_row: dict[str, Any]) -> dict[str, Any]:
        """The run summary's keys; see :meth:`distlocal.profiler.Profiler.summary`."""
        out: dict[str, Any] = {"end_to_end_s": end_to_end_s}
        for k in HEADLINE_KEYS[1:-1]:
            out[k] = last_row.get(k)
        g, d = last_row.get("grad_allreduce_bytes"), last_row.get("delta_sync_bytes")
        out["comm_bytes_per_step"] = (g or 0) + (d or 0) if g is not None or d is not None else None
        projected = self.sgd_s if self.steady_s else None
        out.update({
            "mean_speedup": statistics.fmean(self.speedups) if self.speedups else None,
            "final_activation_reduction": last_row.get("activation_reduction"),
            "train_loop_s": self.loop_s, "profiler_overhead_s": self.overhead_s,
            "total_steps": self.steps, "projected_sgd_s": projected, "steady_loop_s": self.steady_s,
            "projected_speedup": ratio(projected, self.steady_s),
        })
        if end_to_end_s is not None and projected is not None:
            sgd_e2e = end_to_end_s - self.overhead_s - self.steady_s + projected
            out["projected_sgd_end_to_end_s"] = sgd_e2e
            out["projected_end_to_end_speedup"] = ratio(sgd_e2e, end_to_end_s - self.overhead_s)
        return out


def fmt_bytes(n: float | None, binary: bool = False) -> str:
    """``1536 -> '1.5 KB'`` (decimal units; ``binary``: KiB, MiB, ...); ``'?'`` for ``None``."""
    if n is None:
        return "?"
    base, units = ((1024.0, ("B", "KiB", "MiB", "GiB", "TiB")) if binary
                   else (1000.0, ("B", "KB", "MB", "GB", "TB")))
    v, u = float(n), units[0]
    for u in units:
        if abs(v) < base or u == units[-1]:
            break
        v /= base
    return f"{v:.0f} {u}" if u == "B" or v >= 100 else f"{v:.3g} {u}"


def _x(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}x" if v >= 100 else f"{v:.2f}x"


def why_no_speedup(last_row: dict[str, Any] | None) -> str:
    """Why a run has no speedup, from its last epoch's row: the reason the headline gives."""
    row = last_row or {}
    if not row.get("boundary"):
        return "no local epoch, so no all-SGD reference was run, and the epochs were too short to time"
    if row.get("step_time_s") is None:
        return "no step was timed: the epochs were too short for one timing window"
    return "no all-SGD reference step was timed: profiler.reference_steps=0"


def headline(summary: dict[str, Any], last_row: dict[str, Any] | None = None) -> str:
    """The one line a run ends with, from the :data:`HEADLINE_KEYS` of its summary, e.g.
    ``end-to-end 20.6 s | speedup 1.21x vs all-SGD step | peak footprint 161 -> 98 MiB (1.64x) |
    activations 35 MB -> 18 KB (1954x) | grad + delta 5.2 KB + 0.6 MB per step``. Without a speedup
    it says why (see :func:`why_no_speedup`; ``last_row``: the run's last epoch row)."""
    s = summary
    e2e = s.get("end_to_end_s")
    speedup = s.get("speedup")
    return " | ".join([
        f"end-to-end {e2e:.1f} s" if e2e is not None else "end-to-end ?",
        f"speedup {_x(speedup)} vs all-SGD step" if speedup is not None
        else f"speedup ? ({why_no_speedup(last_row)})",
        f"peak footprint {fmt_bytes(s.get('footprint_ref_bytes'), True)} -> "
        f"{fmt_bytes(s.get('footprint_bytes'), True)} ({_x(s.get('footprint_reduction'))})",
        f"activations {fmt_bytes(s.get('activation_bytes_ref'))} -> {fmt_bytes(s.get('activation_bytes'))} "
        f"({_x(s.get('activation_reduction'))})",
        f"grad + delta {fmt_bytes(s.get('grad_allreduce_bytes'))} + "
        f"{fmt_bytes(s.get('delta_sync_bytes'))} per step",
    ])
