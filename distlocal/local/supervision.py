"""Weak supervision: the overall training loss scales the local learning rate (DESIGN §2).

The local rate is ``η_t = η₀ · m_t`` with a multiplier

    m_t = max(min_multiplier, min(m_{t−1}, clamp(L̄_t / L̄_ref, 0, 1)))

where ``L̄`` is an exponential moving average of the (rank-averaged) training loss and ``L̄_ref``
its value when a stage became local. On top of that, if ``L̄`` rose by more than ``rise_tol``
(relative) over the last ``window`` steps, ``m`` is multiplied by ``backoff``.

Why *non-increasing*: local plasticity perturbs the features the SGD suffix relies on, which raises
the loss. If a rising loss could raise ``m`` again, that rise would raise the local rate, which
raises the loss further — a positive-feedback loop (a prototype did exactly this). With ``m`` only
ever going down, a loss rise can at most stop ``m`` from falling, and a sustained rise cuts it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from distlocal.errors import ConfigError


class WeakSupervision:
    """The multiplier ``m_t ∈ [min_multiplier, 1]`` of the local learning rate.

    Lifecycle: :meth:`update` every step with the loss (already averaged across ranks, so every
    rank computes the same ``m``); :meth:`reset_reference` when a stage becomes local;
    :meth:`backoff` after an external incident (a skipped non-finite update).

    * Disabled: :attr:`multiplier` is always 1 and nothing else happens.
    * Before the first :meth:`reset_reference` (no local stage yet) ``m = 1``; the running loss is
      still tracked so the reference is ready when needed.
    * :meth:`reset_reference` moves the reference, never ``m``: ``m`` stays non-increasing over the
      whole run, across boundary moves. One instance per stage gives per-stage multipliers instead.
    * Non-finite losses are ignored (they would poison the running mean for good).
    """

    def __init__(
        self,
        enabled: bool = True,
        ema: float = 0.9,
        rise_tol: float = 0.05,
        window: int = 20,
        backoff: float = 0.5,
        min_multiplier: float = 0.0,
    ) -> None:
        if not 0.0 <= ema < 1.0:
            raise ConfigError(f"local.weak_supervision.ema={ema} must be in [0, 1)")
        if rise_tol < 0.0:
            raise ConfigError(f"local.weak_supervision.rise_tol={rise_tol} must be >= 0")
        if window < 1:
            raise ConfigError(f"local.weak_supervision.window={window} must be >= 1")
        if not 0.0 <= backoff <= 1.0:
            raise ConfigError(f"local.weak_supervision.backoff={backoff} must be in [0, 1]")
        if not 0.0 <= min_multiplier <= 1.0:
            raise ConfigError(f"local.weak_supervision.min_multiplier={min_multiplier} must be in [0, 1]")
        self.enabled = bool(enabled)
        self.ema = float(ema)
        self.rise_tol = float(rise_tol)
        self.window = int(window)
        self.backoff_factor = float(backoff)
        self.min_multiplier = float(min_multiplier)
        self._m = 1.0
        self._running: float | None = None  # L̄
        self._ref: float | None = None  # L̄_ref
        self._active = False  # reset_reference was called: a local stage exists
        # L̄ of the last window+1 steps: the oldest is the value `window` steps ago.
        self._recent: deque[float] = deque(maxlen=self.window + 1)

    @classmethod
    def from_config(cls, cfg: Any) -> WeakSupervision:
        """Build from a ``WeakSupervisionConfig`` (or its DictConfig)."""
        return cls(
            enabled=cfg.enabled,
            ema=cfg.ema,
            rise_tol=cfg.rise_tol,
            window=cfg.window,
            backoff=cfg.backoff,
            min_multiplier=cfg.min_multiplier,
        )

    @property
    def multiplier(self) -> float:
        """The current ``m`` (1.0 when disabled or before any stage is local)."""
        return self._m if self.enabled else 1.0

    @property
    def running_loss(self) -> float | None:
        """``L̄``, the running mean of the loss (``None`` before the first finite loss)."""
        return self._running

    @property
    def reference(self) -> float | None:
        """``L̄_ref`` (``None`` before a stage became local, or until the first loss after that)."""
        return self._ref

    def reset_reference(self) -> None:
        """A stage became local: ``L̄_ref := L̄`` now (or at the first loss, if none was seen yet)."""
        if not self.enabled:
            return
        self._active = True
        self._ref = self._running
        # A rise that began before the switch is not the local stage's doing.
        self._recent.clear()

    def update(self, loss: float) -> float:
        """Feed one step's loss (averaged across ranks); returns the multiplier for this step."""
        if not self.enabled:
            return 1.0
        loss = float(loss)
        if not math.isfinite(loss):
            return self._m
        self._running = loss if self._running is None else self.ema * self._running + (1 - self.ema) * loss
        if not self._active:
            return self._m
        if self._ref is None:
            # reset_reference came before any loss (e.g. a run that starts with local stages).
            self._ref = self._running
        self._recent.append(self._running)
        full = len(self._recent) == self._recent.maxlen
        if full and self._recent[-1] > self._recent[0] * (1 + self.rise_tol):
            self._m *= self.backoff_factor
            # Start a fresh window: otherwise the same rise would trigger a back-off on each of the
            # next `window` steps and collapse m by backoff**window.
            self._recent.clear()
        ratio = self._running / self._ref if self._ref > 0 else 1.0
        self._m = max(self.min_multiplier, min(self._m, min(max(ratio, 0.0), 1.0)))
        return self._m

    def backoff(self) -> None:
        """External back-off (e.g. after a skipped non-finite local update): ``m *= backoff``.

        No effect when disabled or before any stage is local (``m`` is 1 by definition then).
        """
        if self.enabled and self._active:
            self._m = max(self.min_multiplier, self._m * self.backoff_factor)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {
            "multiplier": self._m,
            "running": self._running,
            "ref": self._ref,
            "active": self._active,
            "recent": list(self._recent),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the rule's parameters come from the config."""
        self._m = float(d["multiplier"])
        self._running = None if d["running"] is None else float(d["running"])
        self._ref = None if d["ref"] is None else float(d["ref"])
        self._active = bool(d["active"])
        self._recent = deque((float(v) for v in d["recent"]), maxlen=self.window + 1)
