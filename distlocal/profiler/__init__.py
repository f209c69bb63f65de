"""Per-epoch memory and time accounting (docs/profiling.md, docs/design.md), one concern per module:

* :mod:`.activations` — :class:`ActivationCounter`: the exact bytes autograd keeps for backward;
* :mod:`.memory` — device and host memory readers (CUDA peaks, NVML, RSS, model bytes);
* :mod:`.footprint` — the peak footprint of a step by category (the one user of torch's MemTracker);
* :mod:`.timing` — the clock, the epoch's plan (which step is measured how) and the phases;
* :mod:`.reference` — the all-SGD reference step, the run's own step at boundary 0;
* :mod:`.report` — an epoch's keys, the run summary and the headline a run ends with;
* :mod:`.facade` — the :class:`Profiler` the trainer drives.

The training step itself is :func:`distlocal.step.train_step`; the profiler measures it from outside.
"""

from distlocal.profiler.activations import ActivationCounter, saved_activation_bytes
from distlocal.profiler.facade import Profiler
from distlocal.profiler.memory import device_memory, model_memory, nvml_used_bytes, rss_bytes
from distlocal.profiler.reference import ReferenceStep
from distlocal.profiler.report import HEADLINE_KEYS, fmt_bytes, headline
from distlocal.profiler.timing import EpochPlan, plan_epoch

PHASES = ("data", "prefix", "sync", "suffix_fwd", "backward", "optimizer", "rebuild")
"""Phase names the trainer uses; :meth:`Profiler.phase` accepts any name."""

__all__ = [
    "HEADLINE_KEYS",
    "PHASES",
    "ActivationCounter",
    "EpochPlan",
    "Profiler",
    "ReferenceStep",
    "device_memory",
    "fmt_bytes",
    "headline",
    "model_memory",
    "nvml_used_bytes",
    "plan_epoch",
    "rss_bytes",
    "saved_activation_bytes",
]
