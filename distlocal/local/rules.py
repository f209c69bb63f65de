"""Local (Hebbian) learning rules for ``Conv2d`` and ``Linear`` layers, as pure tensor functions.

A rule sees a layer's input ``x`` and its own output ``z`` (bias included, before any
normalisation) and produces a weight delta ``(dW, db)``. ``⟨·⟩`` below is the mean over the
batch and every spatial (or other leading) position:

========== ======================================= ======================================
rule       dW                                      db
========== ======================================= ======================================
hebb       ⟨z xᵀ⟩                                   ⟨z⟩
oja        ⟨z xᵀ⟩ − ⟨z²⟩ ⊙ W                        ⟨z⟩ − ⟨z²⟩ ⊙ b
softhebb   ⟨y xᵀ⟩ − ⟨y z⟩ ⊙ W,  y = softmax(z/τ)    ⟨y⟩ − ⟨y z⟩ ⊙ b
freeze     (nothing: ``delta`` returns ``None``)
========== ======================================= ======================================

``⟨z²⟩``, ``⟨y z⟩`` are per output channel and broadcast over that channel's filter. The bias is
treated as the weight of a constant input 1, which is where its column of the table comes from.

The work is split in two so that the distributed invariant holds (docs/design.md, "The
distributed step"): every ``delta`` is a *mean over samples* of per-sample terms (the ``W``/``b``
factors are the current weights, identical on every rank), so averaging the deltas of N equal
shards gives the delta of the whole batch.
Anything non-linear — ``hebb``'s norm-preserving rescale — happens in ``apply``, which runs on the
averaged delta. The learning rate η is not part of the delta either: the learner scales each
delta by the η in force when it accumulates it (``LocalLearner``'s hooks), so weak supervision can
change η from step to step, and ``apply`` then writes the accumulated ``η·delta`` with a rate of 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distlocal.errors import ConfigError
from distlocal.hostsync import reads_are_free

RULES = ("hebb", "oja", "softhebb", "freeze")

# local.lr above which a rule lost accuracy in our measurements (docs/local-rules.md, "Safe ranges"):
# above it the run warns, it does not stop.
SAFE_LOCAL_LR = {"hebb": 1e-4, "oja": 1e-4, "softhebb": 5e-3}

Delta = tuple[Tensor, Tensor | None]

# Guards hebb's rescale against dividing by a zero-norm filter.
_EPS = 1e-12


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (tests, reference runs); everything else is computed in float32.

    bf16/fp16 accumulations over B·H'·W' positions lose too much precision for a weight update
    that is a small difference of large terms (oja, softhebb).
    """
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _conv_input(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The conv input with string paddings resolved to explicit zero padding.

    Returns ``(x, padding)`` where ``padding`` is the symmetric padding to hand to the weight GEMM.
    ``padding='same'`` with an even total is asymmetric in PyTorch (the extra row/column goes
    right/bottom), which no symmetric ``padding`` argument can express, so ``x`` is padded here.
    """
    if module.padding_mode != "zeros":
        raise ConfigError(
            f"local rules support Conv2d(padding_mode='zeros') only, got padding_mode="
            f"'{module.padding_mode}' in {module}"
        )
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return x, (0, 0)
        # 'same': total padding d·(k−1) per dim; left gets the floor, right the rest (as aten does).
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        left = [t // 2 for t in total]
        if all(t % 2 == 0 for t in total):
            return x, (left[0], left[1])
        # F.pad takes the last dim first: (w_left, w_right, h_left, h_right).
        x = F.pad(x, (left[1], total[1] - left[1], left[0], total[0] - left[0]))
        return x, (0, 0)
    return x, (int(pad[0]), int(pad[1]))


def _flatten_linear(t: Tensor) -> Tensor:
    """``(B, *, F)`` → ``(N, F)``: every leading position counts as a sample."""
    return t.reshape(-1, t.shape[-1])


def correlation_sum(module: nn.Module, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None, int]:
    """``(Σ z xᵀ, Σ z, n)`` over the batch and positions of ``x``/``z`` (already in compute dtype).

    The sums, not the means: chunks of one batch add up exactly (see :meth:`LocalRule.delta`).
    """
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4 or z.dim() != 4:
            raise ValueError(
                f"Conv2d rule expects 4-D x and z, got {tuple(x.shape)} and {tuple(z.shape)}"
            )
        x, padding = _conv_input(module, x)
        n = z.shape[0] * z.shape[2] * z.shape[3]
        # The GEMM only reads the weight's shape: an expanded 1-element tensor costs nothing.
        w_shape = z.new_empty(1).expand(module.weight.shape)
        corr = torch.ops.aten.convolution_backward(
            z,
            x,
            w_shape,
            None,
            list(module.stride),
            list(padding),
            list(module.dilation),
            False,
            [0, 0],
            module.groups,
            (False, True, False),
        )[1]
        return corr, (z.sum(dim=(0, 2, 3)) if has_bias else None), n
    if isinstance(module, nn.Linear):
        x2 = _flatten_linear(x)
        z2 = _flatten_linear(z)
        return z2.t() @ x2, (z2.sum(dim=0) if has_bias else None), z2.shape[0]
    raise TypeError(f"local rules act on nn.Conv2d and nn.Linear, got {type(module).__name__}")


def correlation(module: nn.Module, x: Tensor, z: Tensor) -> Delta:
    """``(⟨z xᵀ⟩, ⟨z⟩)`` for a ``Conv2d`` or ``Linear`` — the rules' one GEMM.

    ``z`` has the module's output shape; it is the output itself (hebb, oja) or any per-output
    signal such as softhebb's ``y``. The first item has the weight's shape; the second is the
    per-output-channel mean of ``z`` (the bias "correlation", bias = weight of a constant input 1),
    or ``None`` when the module has no bias. Inputs are cast to float32 (float64 kept).

    Conv2d: ``torch.ops.aten.convolution_backward`` with only the weight output requested — the
    same GEMM ``torch.nn.grad.conv2d_weight`` runs (it is a thin wrapper) — divided by B·H'·W'.
    Strided, padded (incl. ``'same'``/``'valid'``), dilated, grouped and depthwise convs are
    handled by the GEMM itself; ``padding_mode`` other than ``'zeros'`` raises ``ConfigError``.
    Linear: ``x`` is ``(B, in)`` or ``(B, *, in)``, ``z`` likewise; one ``zᵀ x`` matmul.
    """
    dtype = _compute_dtype(x)
    # Autocast would silently run the matmul below in fp16/bf16 again; the delta must be float32.
    with torch.autocast(device_type=x.device.type, enabled=False):
        # ``.to`` of a tensor already in ``dtype`` returns it as is: no copy for fp32 input.
        corr, corr_b, n = correlation_sum(module, x.to(dtype), z.to(dtype))
        return corr.div_(n), (corr_b.div_(n) if corr_b is not None else None)


def chunk_rows(x: Tensor, z: Tensor, chunk_bytes: int) -> int:
    """Samples per chunk so that one chunk's float32 copies of ``x`` and ``z`` fit ``chunk_bytes``.

    What a chunk allocates is at most: ``y`` (softhebb's softmax, ``z``-sized), the up-cast copies
    of ``x`` and ``z`` under autocast, and the GEMM's own workspace, all proportional to the rows
    in the chunk; so bounding the rows bounds the rule's temporaries. At least one sample.
    """
    per_sample = 4 * (x[0].numel() + z[0].numel()) if x.shape[0] else 1
    return max(1, int(chunk_bytes) // max(per_sample, 1))


def _channel_dot(weight: Tensor, bias: Tensor | None, corr_w: Tensor, corr_b: Tensor | None) -> Tensor:
    """Per-output-channel ``Σ s·z`` from the GEMM's ``Σ s xᵀ`` (``corr_w``) and ``Σ s`` (``corr_b``).

    ``z`` is the layer's output, ``z_c = ⟨W_c, x⟩ + b_c`` at every position (``x`` the input patch),
    so ``Σ s_c z_c = ⟨W_c, Σ s_c xᵀ⟩ + b_c Σ s_c`` for any per-output signal ``s``: softhebb's
    ``Σ y·z`` (``s = y``) and oja's ``Σ z²`` (``s = z``) cost a weight-sized product instead of a
    pass over an activation-sized tensor. Exact up to rounding when ``z`` is ``module(x)``; under
    autocast ``z`` was rounded to bf16/fp16 and this is the float32 value it was rounded from.
    """
    w = weight.to(corr_w.dtype)
    dot = torch.linalg.vecdot(w.reshape(w.shape[0], -1), corr_w.reshape(w.shape[0], -1))
    if corr_b is not None:
        dot.add_(bias.to(corr_b.dtype) * corr_b)
    return dot


# The smallest per-position normaliser Σ exp(z/τ) accepted without max subtraction: every entry
# down to 2^-60 of its position's sum is then above 1e-38, float32's normal range, so it keeps
# full precision.
_MIN_NORMALISER = 1e-20


def _softmax(z: Tensor, dim: int, temperature: float) -> Tensor:
    """``softmax(z / τ)`` over ``dim`` in one new tensor; ``z`` (the layer's output) is only read.

    On CPU ``exp(z/τ)`` is first normalised as it is, without the per-position max over the
    channel dim (a strided reduction that costs more than the ``exp`` on an NCHW tensor): that is
    the softmax itself whenever every position's normaliser is finite (no overflow) and at least
    ``_MIN_NORMALISER`` (no precision lost to underflow); the check reads the normalisers only,
    a tensor C times smaller than ``z``, and its host sync is free on CPU. Otherwise, and on
    accelerators (where the check would stall the stream), it is max-subtracted like
    ``torch.softmax`` (``max(z/τ) = max(z)/τ`` for τ > 0). The first pass allocates ``y``, the
    rest run in its storage, so ``y`` is the chunk's only activation-sized temporary besides the
    GEMM's workspace. At ResNet-18's shapes on CPU these eager passes beat ``torch.softmax`` over
    the channels of NCHW (3× at 64×32×32).
    """
    inv = 1.0 / temperature
    if reads_are_free(z):  # CPU (distlocal.hostsync: tests can force the accelerator branch)
        y = torch.exp(z) if temperature == 1.0 else torch.mul(z, inv).exp_()
        norm = y.sum(dim=dim, keepdim=True)
        lo, hi = torch.aminmax(norm)
        if float(lo) >= _MIN_NORMALISER and float(hi) < math.inf:  # False for NaN
            return y.mul_(norm.reciprocal_())
        del y, norm
    return _stable_softmax(z, dim, temperature)


def _stable_softmax(z: Tensor, dim: int, temperature: float) -> Tensor:
    """The max-subtracted ``softmax(z / τ)`` over ``dim``, in place in one new tensor; no host read
    (the accelerator path of :func:`_softmax`, and what ``local.compile`` fuses into one kernel)."""
    y = torch.sub(z, z.amax(dim=dim, keepdim=True))
    if temperature != 1.0:
        y.mul_(1.0 / temperature)
    y.exp_()
    return y.mul_(y.sum(dim=dim, keepdim=True).reciprocal_())


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-output-channel vector to broadcast over a weight of shape ``like``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _decay_(weight: Tensor, bias: Tensor | None, corr_w: Tensor, corr_b: Tensor | None) -> Delta:
    """``corr − s ⊙ [W, b]`` written into ``corr`` (the rule's own sums), ``s`` the per-channel
    :func:`_channel_dot`: the subtractive normalisation shared by oja and softhebb, one pass over
    the weight and no temporary. Pure tensor work (what ``local.compile`` fuses)."""
    scale = _channel_dot(weight, bias, corr_w, corr_b)
    w = weight.to(corr_w.dtype)
    dw = corr_w.addcmul_(_per_channel(scale, w), w, value=-1)
    if corr_b is not None:
        corr_b.addcmul_(scale, bias.to(corr_b.dtype), value=-1)
    return dw, corr_b


class _Kernels(NamedTuple):
    """The rule's elementwise work besides the GEMM: eager, or compiled (``local.compile``)."""

    softmax: Callable[[Tensor, int, float], Tensor]
    decay: Callable[[Tensor, Tensor | None, Tensor, Tensor | None], Delta]


_EAGER = _Kernels(_softmax, _decay_)
_COMPILED: _Kernels | None = None
# Each distinct layer shape (and an uneven last chunk) is one compiled graph of the same function;
# dynamo's default of 8 per function would fall back to eager past ResNet-18's eighth shape.
_COMPILE_CACHE = 256


def _compiled_kernels() -> _Kernels:
    """The kernels through ``torch.compile(dynamic=False)``, built on first use.

    Static shapes: one graph per distinct shape, each compiled at its first call (the first update
    step, whose time the learner logs as ``compile_s``), none after. The softmax is the
    max-subtracted one (:func:`_stable_softmax`), which has no host read to break the graph.
    """
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _COMPILE_CACHE)
        _COMPILED = _Kernels(torch.compile(_stable_softmax, dynamic=False),
                             torch.compile(_decay_, dynamic=False))
    return _COMPILED


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process so far (0 before any compile)."""
    if _COMPILED is None:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass(frozen=True)
class LocalRule:
    """One local rule: ``delta`` computes the (shard-averageable) delta, ``apply`` writes it.

    Build with :func:`make_rule`. ``temperature`` is softhebb's τ (ignored by the others).
    ``compiled`` (``local.compile``): the per-layer elementwise work (softhebb's softmax, oja's and
    softhebb's subtractive normalisation) runs through ``torch.compile``; the weight GEMM stays
    eager (it already is one library call). See :func:`_compiled_kernels`.
    """

    name: str
    temperature: float = 1.0
    compiled: bool = False

    def _kernels(self) -> _Kernels:
        return _compiled_kernels() if self.compiled else _EAGER

    def __post_init__(self) -> None:
        # Validated here rather than only in make_rule, so a directly built rule cannot be bogus.
        if self.name not in RULES:
            raise ConfigError(f"unknown local rule '{self.name}'; choose one of: {', '.join(RULES)}")
        if not self.temperature > 0:
            raise ConfigError(f"local.temperature must be > 0, got {self.temperature}")

    def delta(self, module: nn.Module, x: Tensor, z: Tensor, chunk: int | None = None) -> Delta | None:
        """``(dW, db)`` for ``module`` from its input ``x`` and output ``z``; ``None`` for freeze.

        ``z`` must be ``module(x)`` (what the forward hook sees): oja's ``⟨z²⟩`` and softhebb's
        ``⟨y·z⟩`` are read off the GEMM's result through ``z = W x + b`` (:func:`_channel_dot`).
        ``db`` is ``None`` when the module has no bias. Results are float32 (float64 if the input
        is float64), not scaled by η, and may be non-finite — callers check :func:`is_finite`.
        Must be called under ``torch.no_grad()`` (the hooks are); nothing here builds a graph.

        ``chunk``: samples per chunk (``None``: the whole batch at once). Every term is a sum over
        samples and positions (softhebb's softmax is per position), so the chunks' sums add up to
        the whole batch's: the result is the same up to summation order, and the rule's
        temporaries are those of one chunk. ``z`` is never written to (it is the layer's output).
        """
        if self.name == "freeze":
            # Freezing costs nothing: not even the GEMM.
            return None
        if self.name not in ("hebb", "oja", "softhebb"):
            raise AssertionError(f"unreachable: rule {self.name!r}")
        dtype = _compute_dtype(x)
        total = x.shape[0]
        step = total if chunk is None else max(1, int(chunk))
        corr_w: Tensor | None = None
        corr_b: Tensor | None = None
        n = 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            for i in range(0, total, step):
                xc, zc = x[i: i + step].to(dtype), z[i: i + step].to(dtype)
                if self.name == "softhebb":
                    # Soft winner-take-all over *all* output channels at each position, also for
                    # grouped convs: the competition is between the layer's output features,
                    # whatever group their inputs come from. ``y`` is a fresh tensor (``zc`` may
                    # be the layer's output itself, never modified).
                    dim = 1 if isinstance(module, nn.Conv2d) else -1
                    y = self._kernels().softmax(zc, dim, self.temperature)
                    cw, cb, m = correlation_sum(module, xc, y)
                    del y
                else:
                    cw, cb, m = correlation_sum(module, xc, zc)
                corr_w = cw if corr_w is None else corr_w.add_(cw)
                if cb is not None:
                    corr_b = cb if corr_b is None else corr_b.add_(cb)
                n += m
            if corr_w is None:
                raise ValueError(f"a local rule needs at least one sample, got x of shape {tuple(x.shape)}")
            corr_w.div_(n)
            if corr_b is not None:
                corr_b.div_(n)
            if self.name == "hebb":
                return corr_w, corr_b
            # oja's ⟨z²⟩ and softhebb's ⟨y·z⟩, read off the GEMM's result (no pass over z).
            bias = module.bias.detach() if corr_b is not None else None
            return self._kernels().decay(module.weight.detach(), bias, corr_w, corr_b)

    def apply(self, module: nn.Module, dW: Tensor, db: Tensor | None, lr: float) -> None:
        """Write the (possibly rank-averaged) delta into ``module`` in place: ``W += lr·dW``.

        hebb then rescales each output filter — its weights *and* its bias together, the bias being
        the weight of a constant input — back to that filter's norm before the update. Including
        the bias matters: left out, ``b += η⟨z⟩`` feeds back on itself (a larger ``b`` raises
        ``⟨z⟩``) and grows without bound. oja and softhebb normalise themselves and are applied
        as is. ``freeze`` is a no-op. Non-finite deltas are applied as they are: skipping them is
        the caller's job (:func:`is_finite`). ``db`` is ignored for a module without bias.
        """
        if self.name == "freeze":
            return
        with torch.no_grad():
            weight = module.weight
            bias = getattr(module, "bias", None)
            if db is not None and bias is None:
                raise ValueError(f"a bias delta was given for {module}, which has no bias")
            if db is None:
                bias = None
            if self.name == "hebb":
                _apply_norm_preserving(weight, bias, dW, db, lr)
                return
            _add_(weight, dW, lr)
            if bias is not None:
                _add_(bias, db, lr)


def _add_(param: Tensor, delta: Tensor, lr: float) -> None:
    """``param += lr·delta`` in place, computed in the delta's precision."""
    if param.dtype == delta.dtype:
        param.add_(delta, alpha=lr)
    else:
        # A low-precision parameter: add in float32, round once.
        param.copy_(param.to(delta.dtype).add_(delta, alpha=lr))


def _apply_norm_preserving(
    weight: Tensor, bias: Tensor | None, dW: Tensor, db: Tensor | None, lr: float
) -> None:
    """hebb's application: per output filter ``[W_c, b_c]``, add ``lr·[dW_c, db_c]`` and restore its norm."""
    dtype = dW.dtype
    w = weight.to(dtype).reshape(weight.shape[0], -1)
    d = dW.reshape(dW.shape[0], -1)
    if bias is not None:
        w = torch.cat([w, bias.to(dtype).unsqueeze(1)], dim=1)
        d = torch.cat([d, db.to(dtype).unsqueeze(1)], dim=1)
    old_norm = w.norm(dim=1, keepdim=True)
    new = w + lr * d
    new = new * (old_norm / new.norm(dim=1, keepdim=True).clamp_min(_EPS))
    if bias is not None:
        bias.copy_(new[:, -1])
        new = new[:, :-1]
    weight.copy_(new.reshape(weight.shape))


def make_rule(name: str, temperature: float = 1.0, compiled: bool = False) -> LocalRule:
    """The rule called ``name`` (one of :data:`RULES`); ``temperature`` is softhebb's τ > 0;
    ``compiled``: ``local.compile`` (the elementwise work through ``torch.compile``)."""
    return LocalRule(name=name, temperature=float(temperature), compiled=bool(compiled))


def finite_flag(dW: Tensor, db: Tensor | None) -> Tensor:
    """:func:`is_finite` as a 0-dim bool tensor on ``dW``'s device, without a host read.

    A float64 sum of float32 (or narrower) entries cannot overflow (n·3.4e38 is far below float64's
    range), so it is finite exactly when every entry is: one read-only reduction settles it. float64
    entries could overflow their own sum, so they are checked entry by entry.
    """
    parts = [dW] if db is None else [dW, db]
    if dW.dtype == torch.float64:
        flags = [torch.isfinite(p).all() for p in parts]
        return flags[0] if len(flags) == 1 else flags[0] & flags[1]
    total = parts[0].sum(dtype=torch.float64)
    if len(parts) == 2:
        total = total + parts[1].sum(dtype=torch.float64)
    return torch.isfinite(total)


def is_finite(dW: Tensor, db: Tensor | None) -> bool:
    """True when every entry of ``dW`` (and ``db``, if given) is finite.

    A sum is finite only if every term is (a NaN or an infinity propagates), so one read-only
    reduction settles the usual case; ``isfinite`` over every entry (an elementwise pass plus a
    bool temporary, ~20× the sum on CPU) runs only when that sum is not finite, which finite
    entries can also cause by overflowing. One host sync per call in the usual case.
    """
    total = dW.sum() if db is None else dW.sum() + db.sum()
    if bool(torch.isfinite(total)):
        return True
    ok = torch.isfinite(dW).all()
    if db is not None:
        ok = ok & torch.isfinite(db).all()
    return bool(ok)
