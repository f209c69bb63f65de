"""Local rules: deltas against a slow explicit reference, the shard-mean invariant, stability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distlocal.errors import ConfigError
from distlocal.local.rules import RULES, _softmax, chunk_rows, correlation, is_finite, make_rule

ACTIVE_RULES = ("hebb", "oja", "softhebb")

# PyTorch's own note on padding='same' with an even kernel (the "same_even_kernel" case).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

# (kwargs for Conv2d(in, out, ...), in, out): every geometry the GEMM must get right.
CONV_CASES = {
    "3x3_padded": (4, 6, dict(kernel_size=3, padding=1)),
    "strided": (4, 6, dict(kernel_size=3, stride=2, padding=1)),
    "strided_rect": (3, 5, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))),
    "dilated": (4, 6, dict(kernel_size=3, dilation=2, padding=2)),
    "grouped": (4, 6, dict(kernel_size=3, padding=1, groups=2)),
    "depthwise": (5, 5, dict(kernel_size=3, padding=1, groups=5)),
    "1x1": (4, 6, dict(kernel_size=1)),
    "same_even_kernel": (3, 4, dict(kernel_size=4, padding="same")),
    "valid": (3, 4, dict(kernel_size=3, padding="valid")),
}


def _unfold_padded(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches ``(B, C_in·kh·kw, L)`` exactly as the conv sees them (string paddings resolved)."""
    pad = module.padding
    if isinstance(pad, str):
        if pad == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        pad = (0, 0)
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)


def reference_delta(rule: str, module: nn.Module, x: torch.Tensor, z: torch.Tensor, tau: float = 1.0):
    """The rules written out per position with unfold + einsum: slow, obviously right."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.Conv2d):
        g = module.groups
        patches = _unfold_padded(module, x)  # (B, C_in·k·k, L)
        bsz, _, positions = patches.shape
        cout = z.shape[1]
        zf = z.reshape(bsz, cout, positions)  # (B, C_out, L), same L ordering as unfold
        channel_dim = 1
    else:
        patches = x.reshape(-1, x.shape[-1]).t().unsqueeze(0)  # (1, in, N)
        zf = z.reshape(-1, z.shape[-1]).t().unsqueeze(0)  # (1, out, N)
        g, cout = 1, zf.shape[1]
        channel_dim = 1
    n = zf.shape[0] * zf.shape[2]
    post = zf
    if rule == "softhebb":
        post = torch.softmax(zf / tau, dim=channel_dim)
    # Grouped: output channel o of group j sees input rows of group j only.
    pg = patches.reshape(patches.shape[0], g, -1, patches.shape[2])
    yg = post.reshape(post.shape[0], g, cout // g, post.shape[2])
    corr = torch.einsum("bgol,bgil->goi", yg, pg).reshape(w.shape) / n
    corr_b = post.sum(dim=(0, 2)) / n
    if rule == "hebb":
        return corr, (corr_b if b is not None else None)
    scale = (zf * zf).sum(dim=(0, 2)) / n if rule == "oja" else (post * zf).sum(dim=(0, 2)) / n
    dw = corr - scale.reshape((-1,) + (1,) * (w.dim() - 1)) * w
    db = corr_b - scale * b if b is not None else None
    return dw, db


def _conv(case: str, bias: bool, dtype=torch.float64) -> nn.Conv2d:
    cin, cout, kw = CONV_CASES[case]
    torch.manual_seed(1)
    return nn.Conv2d(cin, cout, bias=bias, **kw).to(dtype)


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _close(a, b, atol: float = 1e-10) -> None:
    assert (a[1] is None) == (b[1] is None)
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-8)
    if a[1] is not None:
        torch.testing.assert_close(a[1], b[1], atol=atol, rtol=1e-8)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("rule", ACTIVE_RULES)
def test_conv_delta_matches_reference(rule: str, case: str, bias: bool) -> None:
    m = _conv(case, bias)
    torch.manual_seed(2)
    x = torch.randn(3, m.in_channels, 9, 8, dtype=torch.float64)
    z = _forward(m, x)
    r = make_rule(rule, temperature=0.7)
    got = r.delta(m, x, z)
    assert got[0].shape == m.weight.shape and got[0].dtype == torch.float64
    _close(got, reference_delta(rule, m, x, z, tau=0.7))


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rule", ACTIVE_RULES)
def test_linear_delta_matches_reference(rule: str, bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    m = nn.Linear(7, 6, bias=bias).double()
    x = torch.randn(*shape, dtype=torch.float64)
    z = _forward(m, x)
    r = make_rule(rule, temperature=1.3)
    _close(r.delta(m, x, z), reference_delta(rule, m, x, z, tau=1.3))


def test_correlation_is_conv2d_weight() -> None:
    """The documented identity: ⟨z xᵀ⟩ = conv2d_weight(x, W.shape, z, ...) / (B·H'·W')."""
    m = _conv("grouped", bias=True)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    z = _forward(m, x)
    corr, corr_b = correlation(m, x, z)
    expect = torch.nn.grad.conv2d_weight(x, m.weight.shape, z, m.stride, m.padding, m.dilation, m.groups)
    torch.testing.assert_close(corr, expect / (z.shape[0] * z.shape[2] * z.shape[3]))
    torch.testing.assert_close(corr_b, z.mean(dim=(0, 2, 3)))


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_correlation_is_autograd_weight_gradient(case: str) -> None:
    """Independent of the unfold reference: ⟨z xᵀ⟩ is the weight gradient of the real conv for
    upstream gradient z/N — so the padding/stride/dilation handling matches what the forward did."""
    m = _conv(case, bias=True)
    x = torch.randn(2, m.in_channels, 8, 7, dtype=torch.float64)
    out = m(x)
    z = out.detach()
    n = z.shape[0] * z.shape[2] * z.shape[3]
    gw, gb = torch.autograd.grad(out, (m.weight, m.bias), z / n)
    corr, corr_b = correlation(m, x, z)
    torch.testing.assert_close(corr, gw)
    torch.testing.assert_close(corr_b, gb)


@pytest.mark.parametrize("rule", ACTIVE_RULES)
@pytest.mark.parametrize("kind", ["conv", "linear3d"])
def test_shard_mean_equals_whole_batch(rule: str, kind: str) -> None:
    """N ranks on N equal shards average to the whole-batch delta (the distributed invariant)."""
    torch.manual_seed(4)
    if kind == "conv":
        m = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
        x = torch.randn(8, 4, 9, 9, dtype=torch.float64)
    else:
        m = nn.Linear(5, 3).double()
        x = torch.randn(8, 4, 5, dtype=torch.float64)
    z = _forward(m, x)
    r = make_rule(rule)
    whole = r.delta(m, x, z)
    halves = [r.delta(m, x[i : i + 4], z[i : i + 4]) for i in (0, 4)]
    mean = ((halves[0][0] + halves[1][0]) / 2, (halves[0][1] + halves[1][1]) / 2)
    _close(whole, mean, atol=1e-10)


def test_freeze_is_free_and_changes_nothing() -> None:
    m = nn.Conv2d(3, 4, 3, padding=1)
    before = [p.detach().clone() for p in m.parameters()]
    r = make_rule("freeze")
    x = torch.randn(2, 3, 5, 5)
    assert r.delta(m, x, _forward(m, x)) is None
    r.apply(m, torch.ones_like(m.weight), torch.ones_like(m.bias), lr=1.0)
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)


def _filter_norms(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().reshape(m.weight.shape[0], -1)
    if m.bias is not None:
        w = torch.cat([w, m.bias.detach().unsqueeze(1)], dim=1)
    return w.norm(dim=1)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_hebb_preserves_filter_norms(bias: bool) -> None:
    """1,000 hebb updates: every filter (weights and bias together) keeps its norm exactly."""
    torch.manual_seed(5)
    m = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
    r = make_rule("hebb")
    norms0 = _filter_norms(m)
    w0 = m.weight.detach().clone()
    for _ in range(1000):
        x = torch.randn(4, 3, 6, 6)
        dw, db = r.delta(m, x, _forward(m, x))
        r.apply(m, dw, db, lr=0.05)
    torch.testing.assert_close(_filter_norms(m), norms0, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(m.weight, w0), "hebb must actually move the weights"


@pytest.mark.parametrize("rule", ["oja", "softhebb"])
def test_self_normalising_rules_stay_bounded(rule: str) -> None:
    """oja (and softhebb) on white input: filter norms converge towards 1, never blow up."""
    torch.manual_seed(6)
    m = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        m.weight.mul_(3.0)  # start well away from the fixed point
    r = make_rule(rule)
    for _ in range(1000):
        x = torch.randn(4, 3, 6, 6)
        dw, db = r.delta(m, x, _forward(m, x))
        assert is_finite(dw, db)
        r.apply(m, dw, db, lr=0.02)
    norms = _filter_norms(m)
    assert torch.all(norms > 0.5) and torch.all(norms < 2.0), norms
    if rule == "oja":
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=0.1, rtol=0)


@pytest.mark.parametrize("rule", ACTIVE_RULES)
def test_low_precision_input_gives_float32_delta(rule: str) -> None:
    torch.manual_seed(7)
    m = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(4, 4, 8, 8)
    z = _forward(m, x)
    r = make_rule(rule)
    low = r.delta(m, x.bfloat16(), z.bfloat16())
    assert low[0].dtype == torch.float32 and low[1].dtype == torch.float32
    # Same bf16 values upcast: identical up to float32 summation order.
    upcast = r.delta(m, x.bfloat16().float(), z.bfloat16().float())
    torch.testing.assert_close(low[0], upcast[0], atol=1e-6, rtol=1e-5)
    # Against the float32 original: bf16 rounding of the inputs only (~3 significant digits).
    full = r.delta(m, x, z)
    torch.testing.assert_close(low[0], full[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(low[1], full[1], atol=2e-2, rtol=2e-2)


def test_autocast_does_not_lower_the_linear_gemm() -> None:
    m = nn.Linear(8, 4)
    x = torch.randn(16, 8)
    z = _forward(m, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dw, _ = make_rule("hebb").delta(m, x, z)
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dw, z.t() @ x / 16)


def test_apply_adds_lr_times_delta() -> None:
    m = nn.Linear(3, 2)
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    dw, db = torch.randn(2, 3), torch.randn(2)
    make_rule("oja").apply(m, dw, db, lr=0.1)
    torch.testing.assert_close(m.weight.detach(), w0 + 0.1 * dw)
    torch.testing.assert_close(m.bias.detach(), b0 + 0.1 * db)


def test_is_finite() -> None:
    ok = torch.ones(3)
    assert is_finite(ok, None) and is_finite(ok, ok)
    assert not is_finite(torch.tensor([1.0, float("nan")]), None)
    assert not is_finite(ok, torch.tensor([float("inf")]))
    assert not is_finite(torch.tensor([float("inf"), float("-inf")]), None)  # sum NaN
    # Finite entries whose float32 sum overflows: the exact check decides, not the sum.
    big = torch.full((4,), 3e38)
    assert torch.isinf(big.sum()) and is_finite(big, None) and is_finite(ok, big)


def test_unknown_rule_and_bad_padding_mode() -> None:
    with pytest.raises(ConfigError) as e:
        make_rule("hebbian")
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in RULES)
    m = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ConfigError, match="padding_mode"):
        make_rule("hebb").delta(m, x, _forward(m, x))
    with pytest.raises(TypeError):
        make_rule("hebb").delta(nn.Conv1d(2, 2, 3), torch.randn(1, 2, 5), torch.randn(1, 2, 3))


CHUNK_CONV_CASES = ("strided", "grouped", "depthwise", "same_even_kernel")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("case", [*CHUNK_CONV_CASES, "linear", "linear3d"])
@pytest.mark.parametrize("rule", ACTIVE_RULES)
def test_chunked_delta_equals_unchunked(rule: str, case: str, chunk: int) -> None:
    """Bounded temporaries are exact: chunks of 1..B samples (uneven last chunk included) give the
    whole-batch delta in float64 to summation-order precision, with and without bias."""
    torch.manual_seed(7)
    for bias in (False, True):
        if case.startswith("linear"):
            m = nn.Linear(7, 6, bias=bias).double()
            x = torch.randn(*((5, 7) if case == "linear" else (5, 3, 7)), dtype=torch.float64)
        else:
            m = _conv(case, bias)
            x = torch.randn(5, m.in_channels, 9, 8, dtype=torch.float64)
        z = _forward(m, x)
        z_before = z.clone()
        r = make_rule(rule, temperature=0.7)
        whole = r.delta(m, x, z)
        _close(r.delta(m, x, z, chunk=chunk), whole, atol=1e-12)
        _close(whole, reference_delta(rule, m, x, z, tau=0.7))
        assert torch.equal(z, z_before)  # the layer's output is never written to


def test_chunk_rows_bounds_the_float32_bytes_of_a_chunk() -> None:
    x, z = torch.zeros(64, 3, 8, 8), torch.zeros(64, 16, 8, 8)
    per_sample = 4 * (3 * 64 + 16 * 64)
    assert chunk_rows(x, z, 10 * per_sample) == 10
    assert chunk_rows(x, z, 10 * per_sample + per_sample - 1) == 10
    assert chunk_rows(x, z, 1) == 1  # never zero rows


@pytest.mark.parametrize("tau", [1.0, 0.3])
@pytest.mark.parametrize("case", ["moderate", "overflow", "underflow", "nan"])
def test_softmax_equals_torch_softmax_on_both_paths(case: str, tau: float) -> None:
    """``exp`` normalised as is while every normaliser is finite and ≥ _MIN_NORMALISER, max-
    subtracted otherwise (a position overflowing or underflowing): torch.softmax either way, and
    ``z`` untouched."""
    torch.manual_seed(11)
    z = torch.randn(3, 7, 5, 4, dtype=torch.float32) * 3
    if case == "overflow":
        z[0, 2, 1, 1] = 200.0  # exp overflows at this position
    elif case == "underflow":
        z[1, :, 2, 3] -= 60.0  # every exp at this position is below 1e-20
    elif case == "nan":
        z[2, 3, 0, 0] = float("nan")
    before = z.clone()
    for dim, zz in ((1, z), (-1, z.movedim(1, -1))):
        got = _softmax(zz, dim, tau)
        torch.testing.assert_close(got, torch.softmax(zz / tau, dim=dim), rtol=1e-5, atol=1e-7,
                                   equal_nan=True)
    torch.testing.assert_close(z, before, rtol=0, atol=0, equal_nan=True)
