"""Weak supervision: the overall training loss scales the local learning rate (docs/local-rules.md).

The local rate is ``η_t = η₀ · m_t``. The losses fed in (one per delta sync, rank-averaged) are
grouped into consecutive windows of ``window`` values; at the end of window ``k`` with mean ``μ_k``
and standard error ``s_k`` (sample std / √n):

* **cut** on a *real* rise: ``μ_k − μ_{k−1} > z·√(s_k² + s_{k−1}²)`` and ``μ_k > (1 + rise_tol)·μ_{k−1}``
  → ``m ← m · backoff``;
* **recover** slowly while the loss falls over whole windows: ``μ_k < μ_{k−1}`` → ``m ← m · recover``;
* **cap** by the loss ratio and **floor**: ``m ← max(min_multiplier, min(m, clamp(μ_k / L_ref, 0, 1)))``,

where ``L_ref`` is the window mean when a stage became local.

Why a test against the loss's own noise: mini-batch losses are noisy; a fixed relative threshold on
a short moving average (the former rule: +5 % of a 0.9-EMA over 20 steps) fires by chance several
times an epoch, and with ``m`` never allowed back up it switched local learning off within a few
epochs (docs/local-rules.md has the figures). Comparing window means with their standard error
fires on a stationary loss with probability ~0.1 % per window (``z = 3``), while a sustained rise
of a few percent is many standard errors.

Why a rise can never raise ``m``: local plasticity perturbs the features the SGD suffix relies on,
which raises the loss. If a rising loss could raise ``m``, the rise would raise the local rate, which
raises the loss further — a positive-feedback loop (a prototype did exactly this). Here ``m`` grows
only after a window whose loss *fell*, by a small factor, and never above the loss-ratio cap, so the
loop cannot close; a real rise still cuts ``m`` multiplicatively (AIMD-like: cut fast, recover slowly).
The floor keeps the rule alive; a rule that is dead anyway is frozen by auto-freeze instead
(``distlocal/local/autofreeze.py``), which stops paying for it.

On an accelerator the loss fed in is one sync late: the sync's rank-averaged loss is copied into
pinned memory without waiting and read at the next sync (``distlocal.hostsync.LaggedRead``), so a
cut or recovery acts one sync period later than on CPU, and a skipped update backs off one sync
later. The unread value is in the learner's checkpoint, so a resume feeds the same losses at the
same syncs. On CPU the read is free and there is no lag.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from distlocal.errors import ConfigError


class WeakSupervision:
    """The multiplier ``m_t ∈ [min_multiplier, 1]`` of the local learning rate.

    Lifecycle: :meth:`update` on every delta sync with the loss (already averaged across ranks, so
    every rank computes the same ``m``); :meth:`reset_reference` when a stage becomes local;
    :meth:`backoff` after an external incident (a skipped non-finite update).

    * Disabled: :attr:`multiplier` is always 1 and nothing else happens.
    * Before the first :meth:`reset_reference` (no local stage yet) ``m = 1``; window means are
      still tracked so the reference is ready when needed.
    * :meth:`reset_reference` moves the reference, never ``m``, and restarts the window comparison
      (a rise that began before the switch is not the local stage's doing).
    * Non-finite losses are ignored (they would poison the window statistics).
    * :attr:`backoffs` counts the cuts (real rises and external back-offs) since the start.
    """

    def __init__(
        self,
        enabled: bool = True,
        window: int = 50,
        z: float = 3.0,
        rise_tol: float = 0.05,
        backoff: float = 0.5,
        recover: float = 1.1,
        min_multiplier: float = 0.05,
    ) -> None:
        if window < 2:
            raise ConfigError(f"local.weak_supervision.window={window} must be >= 2 (a spread needs two)")
        if z < 0.0:
            raise ConfigError(f"local.weak_supervision.z={z} must be >= 0")
        if rise_tol < 0.0:
            raise ConfigError(f"local.weak_supervision.rise_tol={rise_tol} must be >= 0")
        if not 0.0 <= backoff <= 1.0:
            raise ConfigError(f"local.weak_supervision.backoff={backoff} must be in [0, 1]")
        if recover < 1.0:
            raise ConfigError(f"local.weak_supervision.recover={recover} must be >= 1")
        if not 0.0 <= min_multiplier <= 1.0:
            raise ConfigError(f"local.weak_supervision.min_multiplier={min_multiplier} must be in [0, 1]")
        self.enabled = bool(enabled)
        self.window = int(window)
        self.z = float(z)
        self.rise_tol = float(rise_tol)
        self.backoff_factor = float(backoff)
        self.recover = float(recover)
        self.min_multiplier = float(min_multiplier)
        self._m = 1.0
        self._ref: float | None = None  # L_ref
        self._active = False  # reset_reference was called: a local stage exists
        self._current: list[float] = []  # losses of the window in progress
        self._last: tuple[float, float] | None = None  # (mean, standard error) of the last window
        self._prev_for_test: tuple[float, float] | None = None  # the window compared against
        self.backoffs = 0

    @classmethod
    def from_config(cls, cfg: Any) -> WeakSupervision:
        """Build from a ``WeakSupervisionConfig`` (or its DictConfig)."""
        return cls(
            enabled=cfg.enabled,
            window=cfg.window,
            z=cfg.z,
            rise_tol=cfg.rise_tol,
            backoff=cfg.backoff,
            recover=cfg.recover,
            min_multiplier=cfg.min_multiplier,
        )

    @property
    def multiplier(self) -> float:
        """The current ``m`` (1.0 when disabled or before any stage is local)."""
        return self._m if self.enabled else 1.0

    @property
    def running_loss(self) -> float | None:
        """The mean loss of the last complete window (``None`` before the first one)."""
        return None if self._last is None else self._last[0]

    @property
    def reference(self) -> float | None:
        """``L_ref`` (``None`` before a stage became local, or until the first window after that)."""
        return self._ref

    def reset_reference(self) -> None:
        """A stage became local: ``L_ref :=`` the last window mean (or the next one, if none yet)."""
        if not self.enabled:
            return
        self._active = True
        self._ref = self.running_loss
        self._prev_for_test = None  # the next window is compared with nothing: no cut, no recovery
        self._current = []

    def update(self, loss: float) -> float:
        """Feed one sync's loss (averaged across ranks); returns the multiplier for the next steps."""
        if not self.enabled:
            return 1.0
        loss = float(loss)
        if not math.isfinite(loss):
            return self._m
        self._current.append(loss)
        if len(self._current) < self.window:
            return self._m
        mean = statistics.fmean(self._current)
        se = statistics.stdev(self._current) / math.sqrt(len(self._current))
        self._current = []
        self._last = (mean, se)
        prev, self._prev_for_test = self._prev_for_test, (mean, se)
        if not self._active:
            return self._m
        if self._ref is None:
            # reset_reference came before any complete window (e.g. a run that starts local).
            self._ref = mean
        if prev is not None:
            p_mean, p_se = prev
            rise = mean - p_mean
            if rise > self.z * math.hypot(se, p_se) and mean > (1.0 + self.rise_tol) * p_mean:
                self._m *= self.backoff_factor
                self.backoffs += 1
            elif mean < p_mean:
                self._m *= self.recover
        cap = min(max(mean / self._ref, 0.0), 1.0) if self._ref > 0 else 1.0
        self._m = max(self.min_multiplier, min(self._m, cap))
        return self._m

    def backoff(self) -> None:
        """External back-off (e.g. after a skipped non-finite local update): ``m *= backoff``.

        No effect when disabled or before any stage is local (``m`` is 1 by definition then).
        """
        if self.enabled and self._active:
            self._m = max(self.min_multiplier, self._m * self.backoff_factor)
            self.backoffs += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {
            "multiplier": self._m,
            "ref": self._ref,
            "active": self._active,
            "current": list(self._current),
            "last": None if self._last is None else list(self._last),
            "prev_for_test": None if self._prev_for_test is None else list(self._prev_for_test),
            "backoffs": self.backoffs,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the rule's parameters come from the config."""
        def pair(v: Any) -> tuple[float, float] | None:
            return None if v is None else (float(v[0]), float(v[1]))

        self._m = float(d["multiplier"])
        self._ref = None if d["ref"] is None else float(d["ref"])
        self._active = bool(d["active"])
        self._current = [float(v) for v in d["current"]]
        self._last = pair(d["last"])
        self._prev_for_test = pair(d["prev_for_test"])
        self.backoffs = int(d["backoffs"])
