"""Where the Localized→SGD boundary sits each epoch: static schedules and dynamic selection.

``boundary = k`` means stages ``[0, k)`` are local (docs/design.md, "Stages and the boundary"). Common rules:

* The boundary is 0 during the first ``warmup_epochs`` epochs (pure SGD); epochs are 0-based.
* It never moves back and never reaches the classifier: it is capped by
  ``C = min(max_boundary, num_stages − 1)``, ``max_boundary = None`` meaning ``num_stages − 1``
  (every non-classifier stage). A configured ``max_boundary > num_stages − 1`` is a ``ConfigError``.

Static kinds (``W = warmup_epochs``, ``E = end_epoch``, ``None`` → ``epochs − 1``; all 0 when ``C = 0``):

* ``step``:   ``b(e) = 0 if e < W else min(C, step · (1 + (e − W) // every))`` — the first local
  stage(s) appear *at* epoch ``W``, then ``+step`` every ``every`` epochs.
* ``linear``: ``b(e) = 0 if e < W``; for ``W ≤ e < E``: ``min(C, 1 + ⌊(C − 1)·(e − W)/(E − W)⌋)``;
  ``C`` for ``e ≥ E``. A straight line from **1 stage at epoch W** to C at epoch E, rounded down:
  the first post-warm-up epoch always has one local stage (when ``C ≥ 1``), as with ``step``.
* ``cosine``: as ``linear`` with the progress ``t = (e − W)/(E − W)`` eased:
  ``min(C, 1 + ⌊(C − 1)·(1 − cos πt)/2⌋)``; slow start, slow finish. Monotone (cos is on [0, π]).

Dynamic selection (:class:`DynamicSelector`) decides from the transition stage's relative update
``u_e`` after each epoch; see its docstring for the exact rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distlocal.errors import ConfigError

STATIC_KINDS = ("step", "linear", "cosine")
SCHEDULES = ("static", "dynamic")

# Absorbs float error in the cosine easing so an exact integer is not rounded down to the one below.
_ROUND_EPS = 1e-9


def resolve_cap(max_boundary: int | None, num_stages: int) -> int:
    """The boundary cap ``C = min(max_boundary, num_stages − 1)``; ``None`` → ``num_stages − 1``."""
    if num_stages < 1:
        raise ConfigError(f"a model needs at least 1 stage (its classifier), got {num_stages}")
    last = num_stages - 1
    if max_boundary is None:
        return last
    if max_boundary < 0:
        raise ConfigError(f"schedule.max_boundary={max_boundary} must be >= 0 (or null)")
    if max_boundary > last:
        raise ConfigError(
            f"schedule.max_boundary={max_boundary} is past the last non-classifier stage "
            f"({num_stages} stages: max is {last})"
        )
    return max_boundary


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"schedule.{name}={value} must be >= 1")


class StaticSchedule:
    """A pre-defined boundary per epoch (``kind`` in :data:`STATIC_KINDS`; formulas in the module doc).

    ``max_boundary`` here is the *resolved* cap ``C`` and ``end_epoch`` the resolved ``E`` (see
    :func:`build_schedule`). ``observe``/``state_dict`` mirror :class:`DynamicSelector` so the
    trainer can drive either the same way; a static schedule only records what it is given.
    """

    def __init__(
        self,
        kind: str,
        warmup_epochs: int,
        every: int,
        step: int,
        end_epoch: int,
        max_boundary: int,
    ) -> None:
        if kind not in STATIC_KINDS:
            raise ConfigError(f"unknown schedule.kind '{kind}'; choose one of: {', '.join(STATIC_KINDS)}")
        if warmup_epochs < 0:
            raise ConfigError(f"schedule.warmup_epochs={warmup_epochs} must be >= 0")
        _check_positive("every", every)
        _check_positive("step", step)
        if end_epoch < warmup_epochs:
            raise ConfigError(
                f"schedule.end_epoch={end_epoch} is before the end of warm-up "
                f"(schedule.warmup_epochs={warmup_epochs})"
            )
        self.kind = kind
        self.warmup_epochs = warmup_epochs
        self.every = every
        self.step = step
        self.end_epoch = end_epoch
        self.max_boundary = max_boundary
        self.history: list[dict[str, Any]] = []

    def boundary(self, epoch: int) -> int:
        """The boundary in force during (0-based) ``epoch``."""
        w, cap = self.warmup_epochs, self.max_boundary
        if epoch < w or cap == 0:
            return 0
        if self.kind == "step":
            return min(cap, self.step * (1 + (epoch - w) // self.every))
        if epoch >= self.end_epoch:
            return cap
        span = self.end_epoch - w  # > 0 here: W <= epoch < E
        if self.kind == "linear":
            # Integer arithmetic: exact, so the documented lists hold bit for bit.
            return min(cap, 1 + (cap - 1) * (epoch - w) // span)
        eased = (1.0 - math.cos(math.pi * (epoch - w) / span)) / 2.0
        return min(cap, 1 + math.floor((cap - 1) * eased + _ROUND_EPS))

    def observe(self, epoch: int, u: float) -> dict[str, Any]:
        """Record ``u`` for the log; the decision is the schedule's: the boundary for ``epoch + 1``."""
        now, nxt = self.boundary(epoch), self.boundary(epoch + 1)
        record = {"epoch": epoch, "u": float(u), "u_ratio": None, "moved": nxt > now, "boundary": nxt}
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        """The recorded history (the schedule itself is a pure function of the config)."""
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.history = [dict(r) for r in d.get("history", [])]


class DynamicSelector:
    """Moves the boundary by the trend of the transition stage's weight updates (docs/design.md, "Selection").

    ``observe(e, u_e)`` is called once after every epoch ``e`` (0-based, increasing) with
    ``u_e = ‖W_T(e) − W_T(e−1)‖ / ‖W_T(e−1)‖`` of the transition stage ``T`` (the first SGD stage,
    index ``boundary()``). The rule, exactly:

    1. Epochs ``e < warmup_epochs``: ``u`` is recorded, not used; no move (boundary 0).
    2. The first finite ``u`` observed with no reference — the first epoch ``≥ warmup_epochs``, or
       the first epoch after a move — becomes ``u_ref`` (ratio 1.0, no move). After a move ``T``
       is a different layer, whose own update scale is not comparable with the old one's.
    3. Otherwise ``ratio = u / u_ref``. ``ratio < tau`` increments a counter; anything else resets
       it. When the counter reaches ``patience`` the boundary grows by ``step`` (capped by
       ``max_boundary``), the counter resets and ``u_ref`` is cleared (so rule 2 applies next).
       At the cap, ``moved`` is false and nothing changes.

    The earliest move is therefore decided after epoch ``warmup_epochs + patience`` and takes effect
    in the epoch after that. The boundary returned after ``observe(e, ·)`` is the one for epoch
    ``e + 1``. Every decision is returned and appended to :attr:`history`.

    ``max_boundary`` is the resolved cap ``C`` (see :func:`resolve_cap`).
    """

    def __init__(self, tau: float, patience: int, step: int, warmup_epochs: int, max_boundary: int) -> None:
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"schedule.tau={tau} must be in (0, 1]: a move needs the updates to shrink")
        _check_positive("patience", patience)
        _check_positive("step", step)
        if warmup_epochs < 0:
            raise ConfigError(f"schedule.warmup_epochs={warmup_epochs} must be >= 0")
        if max_boundary < 0:
            raise ConfigError(f"schedule.max_boundary={max_boundary} must be >= 0")
        self.tau = float(tau)
        self.patience = patience
        self.step = step
        self.warmup_epochs = warmup_epochs
        self.max_boundary = max_boundary
        self._boundary = 0
        self._u_ref: float | None = None
        self._count = 0
        self._last_epoch: int | None = None
        self.history: list[dict[str, Any]] = []

    def boundary(self, epoch: int | None = None) -> int:
        """The current boundary (``epoch`` is accepted for symmetry with :class:`StaticSchedule`)."""
        return self._boundary

    def observe(self, epoch: int, u: float) -> dict[str, Any]:
        """Take the decision after ``epoch``; returns and records it (see the class docstring)."""
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise ValueError(f"DynamicSelector.observe: epoch {epoch} after epoch {self._last_epoch}")
        self._last_epoch = epoch
        u = float(u)
        ratio: float | None = None
        moved = False
        if epoch >= self.warmup_epochs:
            if self._u_ref is None:
                # A NaN/inf reference would make every later ratio meaningless: wait for a finite one.
                if math.isfinite(u):
                    self._u_ref = u
                    ratio = 1.0
            else:
                ratio = _ratio(u, self._u_ref)
                # NaN compares false: a broken measurement resets the count rather than moving.
                self._count = self._count + 1 if ratio < self.tau else 0
                if self._count >= self.patience:
                    self._count = 0
                    if self._boundary < self.max_boundary:
                        self._boundary = min(self.max_boundary, self._boundary + self.step)
                        self._u_ref = None
                        moved = True
        record = {
            "epoch": epoch,
            "u": u,
            "u_ratio": ratio,
            "moved": moved,
            "boundary": self._boundary,
            "u_ref": self._u_ref,
        }
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the same decisions (plain Python values only)."""
        return {
            "boundary": self._boundary,
            "u_ref": self._u_ref,
            "count": self._count,
            "last_epoch": self._last_epoch,
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the rule's parameters come from the config)."""
        self._boundary = int(d["boundary"])
        self._u_ref = None if d["u_ref"] is None else float(d["u_ref"])
        self._count = int(d["count"])
        self._last_epoch = None if d["last_epoch"] is None else int(d["last_epoch"])
        self.history = [dict(r) for r in d["history"]]


def _ratio(u: float, u_ref: float) -> float:
    """``u / u_ref``; a transition stage that did not move at all (``u_ref = 0``) counts as settled
    when it still does not move (0.0), and as not settled otherwise (inf)."""
    if u_ref > 0:
        return u / u_ref
    return 0.0 if u == 0 else math.inf


def build_schedule(cfg: Any, num_stages: int, epochs: int) -> StaticSchedule | DynamicSelector:
    """The schedule described by ``cfg`` (a Static/DynamicScheduleConfig or its DictConfig).

    Resolves ``max_boundary`` (``None`` → ``num_stages − 1``; past it → ``ConfigError``) and, for
    static ``linear``/``cosine``, ``end_epoch`` (``None`` → ``epochs − 1``, at least ``warmup_epochs``).
    """
    name = cfg.name
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
    cap = resolve_cap(cfg.max_boundary, num_stages)
    if name == "dynamic":
        return DynamicSelector(
            tau=cfg.tau,
            patience=cfg.patience,
            step=cfg.step,
            warmup_epochs=cfg.warmup_epochs,
            max_boundary=cap,
        )
    if cfg.end_epoch is None:
        # A warm-up covering the whole run leaves nothing to ramp; that is not the user's error.
        end = max(epochs - 1, cfg.warmup_epochs)
    else:
        end = cfg.end_epoch
    return StaticSchedule(
        kind=cfg.kind,
        warmup_epochs=cfg.warmup_epochs,
        every=cfg.every,
        step=cfg.step,
        end_epoch=end,
        max_boundary=cap,
    )


def relative_update(prev: dict[str, Tensor], now: dict[str, Tensor]) -> float:
    """``‖now − prev‖ / ‖prev‖`` over all tensors together (one flattened vector).

    ``inf`` if ``prev`` is all zeros and something moved, 0.0 if nothing did.
    """
    if prev.keys() != now.keys():
        raise ValueError(f"relative_update: different tensors {sorted(prev)} vs {sorted(now)}")
    diff_sq = 0.0
    prev_sq = 0.0
    for k, p in prev.items():
        p64 = p.detach().to(torch.float64)
        diff_sq += float((now[k].detach().to(device=p.device, dtype=torch.float64) - p64).pow(2).sum())
        prev_sq += float(p64.pow(2).sum())
    if prev_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / prev_sq)


def stage_weights(model_stage: nn.Module) -> dict[str, Tensor]:
    """Detached float32 copies of the ``weight`` of every Conv2d/Linear in a stage, by name.

    Taken at each epoch end for :func:`relative_update`; copies stay on the weights' device.
    """
    return {
        f"{name}.weight" if name else "weight": m.weight.detach().to(torch.float32, copy=True)
        for name, m in model_stage.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
