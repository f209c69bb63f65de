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

    def delta_sq(self) -> torch.Tensor:
        """``||lr * delta||^2`` of the module (weight and bias) since the last observation (0-dim float64)."""
        ...


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().pow(2).sum()


class AutoFreeze:
    """Tracks the effective update of each local stage and freezes the dead ones for good.

    No host read per sync: :meth:`observe` computes the per-stage ratios on the device and keeps
    them; every ``check_every`` observations :meth:`check` reads all of them at once and replays the
    window logic over them in order, so the decisions are those of ``check_every=1``, taken up to
    ``check_every - 1`` syncs later (a stage found dead keeps its rule until the check).
    """

    def __init__(self, enabled: bool = True, threshold: float = 1e-5, window: int = 200,
                 check_every: int = 1) -> None:
        if threshold < 0.0 or not math.isfinite(threshold):
            raise ConfigError(f"local.auto_freeze.threshold={threshold} must be a finite value >= 0")
        if window < 1:
            raise ConfigError(f"local.auto_freeze.window={window} must be >= 1")
        if check_every < 1:
            raise ConfigError(f"local.auto_freeze.check_every={check_every} must be >= 1")
        self.enabled = bool(enabled)
        self.threshold = float(threshold)
        self.window = int(window)
        self.check_every = int(check_every)
        self.frozen: set[int] = set()
        # stage -> [sum of per-application effective updates, steps covered] of the open window
        self._acc: dict[int, list[float]] = {}
        # Observations not read yet: (stages, [ratio per stage..., ok] on the device or as floats
        # restored from a checkpoint, steps covered).
        self._pending: list[tuple[list[int], torch.Tensor | list[float], int]] = []

    @classmethod
    def from_config(cls, cfg: Any) -> AutoFreeze:
        """Build from an ``AutoFreezeConfig`` (or its DictConfig)."""
        return cls(enabled=cfg.enabled, threshold=cfg.threshold, window=cfg.window,
                   check_every=cfg.check_every)

    def is_frozen(self, stage: int) -> bool:
        """Whether ``stage`` was auto-frozen (its rule is no longer computed)."""
        return stage in self.frozen

    @torch.no_grad()
    def observe(self, slots: Iterable[_SlotLike], steps: int, ok: torch.Tensor | None = None) -> list[int]:
        """Account one application of the rank-averaged deltas held in ``slots``, covering ``steps``
        steps; returns the stages frozen by it (sorted; only at a check, else ``[]``).

        ``ok``: a 0-dim bool device tensor, false when the application was skipped (non-finite):
        such an observation is dropped at the check, as if it had never been made.
        """
        if not self.enabled or steps <= 0:
            return []
        delta_sq: dict[int, torch.Tensor] = {}
        weight_sq: dict[int, torch.Tensor] = {}
        for s in slots:
            if s.stage in self.frozen:
                continue
            w = _sq(s.module.weight)
            bias = getattr(s.module, "bias", None)
            if bias is not None:
                w = w + _sq(bias)
            d = s.delta_sq()
            delta_sq[s.stage] = delta_sq[s.stage] + d if s.stage in delta_sq else d
            weight_sq[s.stage] = weight_sq[s.stage] + w if s.stage in weight_sq else w
        if delta_sq:
            stages = sorted(delta_sq)
            ratios = [delta_sq[k].sqrt() / weight_sq[k].sqrt().clamp_min(1e-12) for k in stages]
            flag = torch.ones((), dtype=torch.float64, device=ratios[0].device) if ok is None \
                else ok.to(torch.float64)
            self._pending.append((stages, torch.stack([*ratios, flag]), int(steps)))
        if len(self._pending) >= self.check_every:
            return self.check()
        return []

    def check(self) -> list[int]:
        """Read the pending observations (one host read) and take their freeze decisions in order;
        returns the stages frozen (sorted)."""
        pending, self._pending = self._pending, []
        on_device = [v for _, v, _ in pending if isinstance(v, torch.Tensor)]
        read = iter(torch.cat(on_device).tolist() if on_device else [])
        newly: list[int] = []
        for stages, v, steps in pending:
            values = v if isinstance(v, list) else [next(read) for _ in range(len(stages) + 1)]
            if not values[-1]:  # a skipped (non-finite) application: never applied, never counted
                continue
            for stage, ratio in zip(stages, values):
                if stage in self.frozen:  # frozen by an earlier observation of this check
                    continue
                acc = self._acc.setdefault(stage, [0.0, 0.0])
                acc[0] += ratio
                acc[1] += steps
                if acc[1] >= self.window:
                    if acc[0] / acc[1] < self.threshold:
                        self.frozen.add(stage)
                        newly.append(stage)
                    del self._acc[stage]
        return sorted(newly)

    def flags(self, num_local_stages: int) -> list[int]:
        """``[1 if stage i is auto-frozen else 0 for i in range(num_local_stages)]`` (the log row)."""
        return [int(i in self.frozen) for i in range(num_local_stages)]

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (safe for ``torch.load(weights_only=True)``); the observations not yet
        checked are read (a checkpoint is a scheduled read) and kept unchecked, so a resume takes
        its decisions at the same syncs as the uninterrupted run."""
        pending = [[list(st), v.tolist() if isinstance(v, torch.Tensor) else list(v), n]
                   for st, v, n in self._pending]
        return {"frozen": sorted(self.frozen), "acc": {int(k): list(v) for k, v in self._acc.items()},
                "pending": pending}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.frozen = {int(s) for s in d["frozen"]}
        self._acc = {int(k): [float(v[0]), float(v[1])] for k, v in d["acc"].items()}
        self._pending = [([int(s) for s in st], [float(x) for x in v], int(n))
                         for st, v, n in d.get("pending", [])]  # absent before check_every existed
