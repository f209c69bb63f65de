"""Auto-freeze: a local stage whose rule no longer moves its weights stops paying for the rule.

Per local stage ``s``, each delta application (:meth:`LocalLearner.apply`, on the rank-averaged
buffer) contributes the stage's effective update ``‖lr·ΣΔ_s‖ / ‖W_s‖`` (weights and biases of its
Conv2d/Linear modules together; the buffer already holds the deltas scaled by the local learning
rate in force, summed over the steps since the previous application). Over a window of at least
``window`` steps the mean per step is compared with ``threshold``: below it, the stage is frozen
for the rest of the run — its forward hooks stop computing the rule, exactly as ``mode=freeze``
treats it. Above it, a fresh window starts.

Why: weak supervision may drive the local rate so low, or the rule may converge so far, that the
weights no longer change measurably while every step still pays for the Hebbian GEMM. Such a
stage is a frozen stage that costs more than one; freezing it makes ``mode=local`` no slower than
``mode=freeze`` for the same (non-)learning. The decision is taken from the rank-averaged buffer
and the replicated weights, so every rank takes it identically, and the state is checkpointed so a
resume takes the same decisions at the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from distlocal.errors import ConfigError


class _SlotLike(Protocol):
    module: torch.nn.Module
    stage: int

    def delta_sq(self) -> float:
        """``||lr * delta||^2`` of the module (weight and bias) since the last observation."""
        ...


class AutoFreeze:
    """Tracks the effective update of each local stage and freezes the dead ones for good."""

    def __init__(self, enabled: bool = True, threshold: float = 1e-5, window: int = 200) -> None:
        if threshold < 0.0 or not math.isfinite(threshold):
            raise ConfigError(f"local.auto_freeze.threshold={threshold} must be a finite value >= 0")
        if window < 1:
            raise ConfigError(f"local.auto_freeze.window={window} must be >= 1")
        self.enabled = bool(enabled)
        self.threshold = float(threshold)
        self.window = int(window)
        self.frozen: set[int] = set()
        # stage -> [sum of per-application effective updates, steps covered] of the open window
        self._acc: dict[int, list[float]] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> AutoFreeze:
        """Build from an ``AutoFreezeConfig`` (or its DictConfig)."""
        return cls(enabled=cfg.enabled, threshold=cfg.threshold, window=cfg.window)

    def is_frozen(self, stage: int) -> bool:
        """Whether ``stage`` was auto-frozen (its rule is no longer computed)."""
        return stage in self.frozen

    @torch.no_grad()
    def observe(self, slots: Iterable[_SlotLike], steps: int) -> list[int]:
        """Account one application of the rank-averaged deltas held in ``slots``, covering ``steps``
        steps; returns the stages frozen by it (sorted)."""
        if not self.enabled or steps <= 0:
            return []
        delta_sq: dict[int, float] = {}
        weight_sq: dict[int, float] = {}
        for s in slots:
            if s.stage in self.frozen:
                continue
            d = s.delta_sq()
            bias = getattr(s.module, "bias", None)
            w = float(s.module.weight.double().pow(2).sum())
            if bias is not None:
                w += float(bias.double().pow(2).sum())
            delta_sq[s.stage] = delta_sq.get(s.stage, 0.0) + d
            weight_sq[s.stage] = weight_sq.get(s.stage, 0.0) + w
        newly = []
        for stage in sorted(delta_sq):
            ratio = math.sqrt(delta_sq[stage]) / max(math.sqrt(weight_sq[stage]), 1e-12)
            acc = self._acc.setdefault(stage, [0.0, 0.0])
            acc[0] += ratio
            acc[1] += steps
            if acc[1] >= self.window:
                if acc[0] / acc[1] < self.threshold:
                    self.frozen.add(stage)
                    newly.append(stage)
                del self._acc[stage]
        return newly

    def flags(self, num_local_stages: int) -> list[int]:
        """``[1 if stage i is auto-frozen else 0 for i in range(num_local_stages)]`` (the log row)."""
        return [int(i in self.frozen) for i in range(num_local_stages)]

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {"frozen": sorted(self.frozen), "acc": {int(k): list(v) for k, v in self._acc.items()}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.frozen = {int(s) for s in d["frozen"]}
        self._acc = {int(k): [float(v[0]), float(v[1])] for k, v in d["acc"].items()}
