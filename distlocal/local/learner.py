"""The boundary-split model: a local prefix updated in its forward pass, an SGD suffix.

Stages ``[0, boundary)`` run under ``torch.no_grad()``; forward hooks on their ``Conv2d`` and
``Linear`` modules compute the rule's delta from each module's own input and output while the
forward runs, so no activation of the prefix is ever kept. The deltas (scaled by the local
learning rate in force) accumulate in one flat buffer, which is also what the ranks average in a
single all-reduce: see :class:`distlocal.parallel.sync.DeltaSync`.

Two things keep a local layer near its physical limit (its forward plus one weight-gradient GEMM):

* **Bounded temporaries.** Each hook computes its delta over chunks of the batch
  (``chunk_size`` samples, or as many as fit ``chunk_bytes``, see
  :func:`distlocal.local.rules.chunk_rows`); the rule's sums add up exactly.
* **Direct application.** With ``direct=True`` (one process, a sync every step: nothing to
  average, nothing to accumulate) a hook applies ``lr * delta`` to its layer right away, so no
  prefix-weight-sized delta buffer exists at all; the buffer keeps only the BN statistics and
  the loss. Applying right after the layer's own forward is the same update as applying at the
  end of the step: the layer's output is already computed and no other layer reads its weights.
  A non-finite delta is then skipped for that layer alone (counted like a skipped update).

No host read per step on an accelerator (:mod:`distlocal.hostsync`): the non-finite checks run on
the device (a skipped delta is zeroed with ``masked_fill_``, an exact no-op when applied), and
what a sync reports to the host (its mean loss and whether it was skipped) is read one sync late
through :class:`~distlocal.hostsync.LaggedRead`; the skip counters follow that read. On CPU reads
are free and the report is read at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from distlocal.hostsync import LaggedRead, reads_are_free, zero_unless
from distlocal.local.autofreeze import AutoFreeze
from distlocal.local.rules import LocalRule, chunk_rows, compiled_graphs, finite_flag, is_finite
from distlocal.local.scope import local_scope
from distlocal.models.staged import StagedModel

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Norm layers' affine parameters are frozen in a local stage by design (docs/local-rules.md):
# unruled_parameters does not report them.
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def unruled_parameters(model: StagedModel, stop: int) -> list[str]:
    """Names of the parameters of stages ``[0, stop)`` that no local rule updates, norms' affine aside.

    A local stage's parameters all stop taking gradients, but the rule only reaches the weight and
    bias of a ``Conv2d`` or ``Linear`` that is *called*: a parameter held by any other module (ViT's
    class token and position embedding, ``nn.MultiheadAttention``'s ``in_proj_weight``) and the
    Linears inside an MHA (its forward reads ``out_proj.weight`` without calling ``out_proj``) stay
    frozen. The trainer names them in the run's first line, so none is frozen silently.
    """
    names = []
    for i, stage in enumerate(model.stages[:stop]):
        mhas = [m for m in stage.modules() if isinstance(m, nn.MultiheadAttention)]
        in_mha = {id(m) for mha in mhas for m in mha.modules()}
        for mod_name, mod in stage.named_modules():
            ruled = isinstance(mod, (nn.Conv2d, nn.Linear)) and id(mod) not in in_mha
            if ruled or isinstance(mod, _NORMS):
                continue
            prefix = f"stages.{i}.{mod_name}." if mod_name else f"stages.{i}."
            names += [prefix + p for p, _ in mod.named_parameters(recurse=False)]
    return names


def unruled_note(model: StagedModel) -> str:
    """``" | frozen when local, no rule reaches them: <names>"`` for the run's first line (``mode=local``),
    or ``""`` when a rule reaches every non-norm parameter of every stage that can turn local."""
    names = unruled_parameters(model, model.num_stages - 1)
    if not names:
        return ""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f" | frozen when local, no rule reaches them: {shown}"


class SyncResult(NamedTuple):
    """What the host learns from a delta application (one sync late on an accelerator)."""

    mean_loss: float | None  # the rank-averaged loss of the synced period; None: no sync or no loss
    skipped: bool  # the sync's update was non-finite and not applied (weak supervision backs off)


@dataclass
class _Slot:
    """Where one local module's delta lives in the flat buffer."""

    module: nn.Module
    name: str
    stage: int
    w: torch.Tensor | None  # None with ``direct``: no buffer
    b: torch.Tensor | None
    applied_sq: torch.Tensor | None = None
    """``direct`` with auto-freeze: ``||lr * delta||^2`` applied since the last sync (no buffer holds it)."""

    def delta_sq(self) -> torch.Tensor:
        """``||lr * delta||^2`` (weight and bias) accumulated since the last sync, a 0-dim float64
        tensor on the device (no host read); direct slots restart."""
        if self.w is not None:
            d = self.w.double().pow(2).sum()
            return d + self.b.double().pow(2).sum() if self.b is not None else d
        if self.applied_sq is None:
            return torch.zeros((), dtype=torch.float64, device=self.module.weight.device)
        d = self.applied_sq.clone()
        self.applied_sq.zero_()
        return d


class LocalLearner:
    """Owns the local prefix of a :class:`StagedModel`: its hooks, deltas and BN statistics.

    The flat buffer is laid out as ``[deltas | BN running stats | loss_sum, loss_count]`` so one
    all-reduce carries everything the ranks must agree on.
    """

    def __init__(
        self, model: StagedModel, rule: LocalRule, update_every: int = 1, sample_fraction: float = 1.0,
        chunk_size: int = 0, chunk_bytes: int = 0, direct: bool = False,
    ) -> None:
        if chunk_size < 0 or chunk_bytes < 0:
            raise ValueError("local.chunk_size and local.chunk_bytes must be >= 0 (0: no bound)")
        if update_every < 1:
            raise ValueError("local.update_every must be >= 1")
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError("local.sample_fraction must be in (0, 1]")
        self.model = model
        self.rule = rule
        self.update_every = update_every
        self.sample_fraction = sample_fraction
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.direct = direct
        self.delta_pending = False  # a delta was computed since the last apply (DeltaSync asks)
        # Direct mode: every layer's delta of the period was finite (a bool, or a device flag).
        self._direct_ok: bool | torch.Tensor = True
        self._report = LaggedRead()  # what apply() tells the host: [loss_sum, loss_count, ok]
        self.boundary = 0
        self.lr = 0.0  # local learning rate in force for the next forward (eta0 * multiplier)
        self._update_now = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._slots: list[_Slot] = []
        self._bn: list[nn.Module] = []
        self._switch: dict[str, torch.Tensor] = {}  # weights when their stage turned local (drift)
        self.buffer = torch.zeros(0)
        self._n_delta = 0
        self._n_stats = 0
        self.pending_steps = 0  # steps accumulated in the buffer since the last apply
        self.skipped_updates = 0
        self.skipped_in_a_row = 0
        # local.compile: seconds of the update steps that compiled a graph (first-step cost, logged
        # as compile_s; such a step's eager work is counted in too, a step's worth at most).
        self.compile_s = 0.0
        # Auto-freeze (distlocal/local/autofreeze.py): off unless the trainer sets it from local.auto_freeze.
        self.auto_freeze = AutoFreeze(enabled=False)

    # ------------------------------------------------------------------ boundary
    def local_parameters(self) -> list[nn.Parameter]:
        """Parameters of the local stages ``[0, boundary)``."""
        return [p for s in self.model.stages[: self.boundary] for p in s.parameters()]

    def set_boundary(self, boundary: int) -> list[nn.Parameter]:
        """Move the boundary (never back); returns the parameters that just turned local.

        Newly local parameters get ``requires_grad=False`` and lose their ``.grad``; the caller
        drops them from the optimizer and rebuilds the engine over the new suffix.
        """
        if boundary < self.boundary:
            raise ValueError(f"the boundary never moves back ({self.boundary} -> {boundary})")
        if boundary > self.model.num_stages - 1:
            raise ValueError("the classifier stage is never local")
        if boundary == self.boundary:
            return []
        old = self.boundary
        self.boundary = boundary
        newly = [p for s in self.model.stages[old:boundary] for p in s.parameters()]
        for p in newly:
            p.requires_grad_(False)
            p.grad = None
        self._rebuild_layout(first_new_stage=old)
        return newly

    def _rebuild_layout(self, first_new_stage: int) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._slots, self._bn = [], [], []
        stage_modules = []
        for i, stage in enumerate(self.model.stages[: self.boundary]):
            for name, mod in stage.named_modules():
                full = f"stages.{i}.{name}" if name else f"stages.{i}"
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    stage_modules.append((i, full, mod))
                    if i >= first_new_stage:
                        self._switch[full] = mod.weight.detach().clone()
                elif isinstance(mod, _BN) and mod.track_running_stats:
                    self._bn.append(mod)
        use_rule = self.rule.name != "freeze"
        n_delta = 0
        if use_rule and not self.direct:
            n_delta = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                          for _, _, m in stage_modules)
        n_stats = sum(m.running_mean.numel() + m.running_var.numel() for m in self._bn)
        device = next(self.model.parameters()).device
        self.buffer = torch.zeros(n_delta + n_stats + 2, device=device, dtype=torch.float32)
        self._n_delta, self._n_stats = n_delta, n_stats
        if use_rule:
            off = 0
            for i, full, mod in stage_modules:
                w, b = None, None
                if self.direct:  # no buffer: the hook applies the delta itself
                    slot = _Slot(mod, full, i, w, b, torch.zeros((), dtype=torch.float64, device=device))
                    self._slots.append(slot)
                    self._hooks.append(mod.register_forward_hook(self._make_hook(slot)))
                    continue
                w = self.buffer[off: off + mod.weight.numel()].view_as(mod.weight)
                off += mod.weight.numel()
                if mod.bias is not None:
                    b = self.buffer[off: off + mod.bias.numel()].view_as(mod.bias)
                    off += mod.bias.numel()
                slot = _Slot(mod, full, i, w, b)
                self._slots.append(slot)
                self._hooks.append(mod.register_forward_hook(self._make_hook(slot)))
        self.pending_steps = 0

    def _make_hook(self, slot: _Slot):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            # Only inside prefix_forward on an update step: the hook must not fire when the
            # whole model runs for evaluation.
            if not self._update_now:
                return
            if self.auto_freeze.is_frozen(slot.stage):  # auto-frozen: the rule is no longer computed
                return
            x = inputs[0]
            if self.sample_fraction < 1.0:
                # The leading slice of the rank's batch. The sampler interleaves the ranks (rank r
                # holds positions r, r+W, r+2W, ... of the global batch, see build_loaders), so the
                # ranks' leading m samples are exactly the global batch's leading W*m: N ranks and
                # one process pick the same samples whenever fraction * per-rank batch is whole.
                # A per-rank stride (x[::s]) would break that: its union is not x[::s] globally.
                n = max(1, math.ceil(self.sample_fraction * x.shape[0]))
                x, output = x[:n], output[:n]
            with local_scope():  # the rule's temporaries: their own footprint category
                d = self.rule.delta(module, x, output, chunk=self.chunk_for(x, output))
                if d is None:
                    return
                dw, db = d
                self.delta_pending = True
                if slot.w is None:  # direct: apply now, nothing is accumulated
                    self._apply_direct(slot, dw, db)
                    return
                slot.w.add_(dw, alpha=self.lr)
                if slot.b is not None and db is not None:
                    slot.b.add_(db, alpha=self.lr)
        return hook

    def _finite(self, dw: torch.Tensor, db: torch.Tensor | None) -> bool | torch.Tensor:
        """Whether a delta is finite: a ``bool`` where reads are free, else a device flag."""
        return is_finite(dw, db) if reads_are_free(dw) else finite_flag(dw, db)

    def _apply_direct(self, slot: _Slot, dw: torch.Tensor, db: torch.Tensor | None) -> None:
        """Apply one layer's ``lr * delta`` right away (direct mode), unless it is non-finite: on
        CPU it is skipped, on an accelerator zeroed on the device first (adding zero changes
        nothing, and hebb's rescale of an unchanged filter is by exactly 1)."""
        module = slot.module
        ok = self._finite(dw, db)
        self._direct_ok = ok & self._direct_ok
        if ok is False:
            return
        db = db if module.bias is not None else None
        zero_unless(ok, dw, db)
        self.rule.apply(module, dw, db, self.lr)
        if self.auto_freeze.enabled:  # no buffer keeps the delta: its size, for it
            sq = dw.double().square().sum()
            if db is not None:
                sq = sq + db.double().square().sum()
            slot.applied_sq.add_(sq * self.lr**2)

    @property
    def delta_part(self) -> torch.Tensor:
        """The buffer's leading part that holds the accumulated ``η·delta`` of every local layer
        (a view; empty in direct mode); BN statistics and the two loss slots follow it."""
        return self.buffer[: self._n_delta]

    def chunk_for(self, x: torch.Tensor, z: torch.Tensor) -> int | None:
        """Samples per delta chunk for a layer with input ``x`` and output ``z`` (``None``: all).

        ``local.chunk_size`` if set, else as many as fit ``local.chunk_bytes`` (:func:`chunk_rows`).
        """
        if self.chunk_size:
            return self.chunk_size
        return chunk_rows(x, z, self.chunk_bytes) if self.chunk_bytes else None

    # ------------------------------------------------------------------ step
    @property
    def has_local(self) -> bool:
        return self.boundary > 0

    def prefix_forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Run the local stages without autograd; on update steps the hooks add ``lr * delta``."""
        if not self.has_local:
            return x
        self._update_now = bool(self._slots) and step % self.update_every == 0 and self.lr > 0
        timed = self._update_now and self.rule.compiled
        graphs, t0 = (compiled_graphs(), time.perf_counter()) if timed else (0, 0.0)
        try:
            with torch.no_grad():
                h = self.model.forward_range(x, 0, self.boundary)
        finally:
            self._update_now = False
        if timed and compiled_graphs() > graphs:
            self.compile_s += time.perf_counter() - t0
        self.pending_steps += 1
        return h

    def add_loss(self, loss: float | torch.Tensor) -> None:
        """Record a step's loss in the buffer, so the ranks average it with the deltas."""
        if self.has_local:
            self.buffer[-2] += loss
            self.buffer[-1] += 1.0

    def pack_stats(self) -> None:
        """Copy the prefix BatchNorm running statistics into the buffer (before the all-reduce)."""
        off = self._n_delta
        for bn in self._bn:
            for t in (bn.running_mean, bn.running_var):
                self.buffer[off: off + t.numel()].copy_(t.reshape(-1))
                off += t.numel()

    def average(self, world_size: int, low: torch.Tensor | None = None) -> None:
        """Turn the buffer's all-reduced sum into the mean over ``world_size`` ranks.

        ``low`` is the delta part as it was reduced in a lower precision (``local.sync_dtype``);
        it is copied back into the buffer first, so every rank applies the same rounded mean.
        """
        if low is not None:
            self.buffer[: low.numel()].copy_(low)
        # gloo has no AVG op: the ranks sum, then divide (the same on every rank, so still identical).
        self.buffer.div_(world_size)

    def apply(self) -> SyncResult | None:
        """Apply the (rank-averaged) buffer: deltas to weights, stats back to BatchNorm.

        A non-finite delta (or loss) is never applied: the update is skipped and counted. Returns
        what the host learns of an application, read without waiting for the device: this one's on
        CPU, the previous one's on an accelerator (``None``: none to report yet).
        """
        if not self.has_local:
            return None
        off = self._n_delta
        for bn in self._bn:
            for t in (bn.running_mean, bn.running_var):
                t.copy_(self.buffer[off: off + t.numel()].view_as(t))
                off += t.numel()
        # The loss slots count too: a non-finite loss means this period's deltas came from a
        # diverging step. The buffer is rank-averaged, so every rank takes the same decision.
        delta = self.buffer[: self._n_delta]
        ok = self._finite(delta, self.buffer[-2:]) & self._direct_ok
        self._direct_ok, self.delta_pending = True, False
        if ok is not False:  # on an accelerator always: a non-finite buffer is zeroed first
            zero_unless(ok, delta)
            with torch.no_grad():
                for s in self._slots:
                    # Direct slots were applied in their hooks; auto-frozen ones hold no delta.
                    if s.w is not None and not self.auto_freeze.is_frozen(s.stage):
                        self.rule.apply(s.module, s.w, s.b, 1.0)
            # Auto-freeze decides from the rank-averaged buffer (or, direct, the deltas applied
            # since the last call): the same on every rank.
            self.auto_freeze.observe(self._slots, self.pending_steps,
                                     ok if isinstance(ok, torch.Tensor) else None)
        flag = ok.float() if isinstance(ok, torch.Tensor) else self.buffer.new_tensor(float(ok))
        read = self._report.push(torch.stack([self.buffer[-2], self.buffer[-1], flag]))
        self.buffer.zero_()
        self.pending_steps = 0
        return None if read is None else self._take(read)

    def _take(self, report: list[float]) -> SyncResult:
        """Count a report ``[loss_sum, loss_count, ok]`` read on the host; its mean loss and skip."""
        loss_sum, count, ok = report
        skipped = not ok
        if skipped:
            self.skipped_updates += 1
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0
        loss = loss_sum / count if count > 0 and math.isfinite(loss_sum) else None
        return SyncResult(loss, skipped)

    @property
    def delta_bytes(self) -> int:
        """Bytes of the buffer (deltas, BN statistics and the loss slots): what one fp32 sync sends.

        ``DeltaSync.bytes_sent`` counts what is really sent (``local.sync_dtype=bf16`` halves the
        delta part; a direct learner has no delta part)."""
        return self.buffer.numel() * self.buffer.element_size() if self.has_local else 0

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The accumulated-but-unsynced buffer, the switch-time weights and the counters."""
        return {"boundary": self.boundary, "buffer": self.buffer.detach().cpu().clone(),
                "pending_steps": self.pending_steps, "skipped_updates": self.skipped_updates,
                "skipped_in_a_row": self.skipped_in_a_row, "auto_freeze": self.auto_freeze.state_dict(),
                "report": self._report.state(),
                "switch": {k: v.detach().cpu().clone() for k, v in self._switch.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore after :meth:`set_boundary` has rebuilt the same layout.

        A buffer saved with and without ``direct`` (a resume on another world size) differs only by
        its delta part: the tail (BN statistics, loss) is copied, pending deltas carried over when
        this learner has a delta part, and a direct learner refuses a non-zero pending delta.
        """
        if int(state["boundary"]) != self.boundary:
            raise ValueError("set_boundary(saved boundary) before load_state_dict")
        saved = state["buffer"].to(self.buffer.device)
        tail = self._n_stats + 2
        n_saved_delta = saved.numel() - tail
        if n_saved_delta == self._n_delta:
            self.buffer.copy_(saved)
        elif n_saved_delta == 0:  # saved by a direct learner: no pending delta
            self.buffer.zero_()
            self.buffer[-tail:].copy_(saved)
        elif self._n_delta == 0 and not bool(saved[:n_saved_delta].any()):
            self.buffer.copy_(saved[-tail:])
        else:
            raise ValueError(f"saved learner buffer has {saved.numel()} entries, this layout "
                             f"{self.buffer.numel()}: resume with the same world size and local.sync_every")
        self.pending_steps = int(state["pending_steps"])
        self.skipped_updates = int(state["skipped_updates"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
        if "auto_freeze" in state:  # absent in checkpoints written before auto-freeze existed
            self.auto_freeze.load_state_dict(state["auto_freeze"])
        self._report.pending = state.get("report")  # the unread report of the last sync, if any
        dev = self.buffer.device
        self._switch = {k: v.to(dev) for k, v in state["switch"].items()}

    # ------------------------------------------------------------------ health
    def drift(self) -> dict[str, float]:
        """Per local layer, ``||W - W_switch|| / ||W_switch||``."""
        out = {}
        for s in self._slots:
            ref = self._switch.get(s.name)
            if ref is not None:
                out[s.name] = float((s.module.weight - ref).norm() / ref.norm().clamp_min(1e-12))
        return out

    def remove_hooks(self) -> None:
        """Detach the forward hooks (end of training)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
