"""polyattn.attention against an independent float64 reference, masking rules, dtypes, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polyattn
from polyattn import PolyAttention, attention, get_activation

ALL_SPECS = [
    "softmax",
    "x",
    "x^2",
    "x^3",
    "x^3/14",
    "x^3/16",
    "x^3/sqrt(N)",
    "x^3/N",
    "x/14",
    "x/sqrt(N)",
    "relu",
    "relu/N",
    "elu",
    "gelu",
    "tanh",
    "exp",
    "sigmoid",
    "sigmoid/sqrt(N)",
    "gelu/4",
    "x^4/N",
    "sigmoid-log(N)",
]


# --- an independent reference: explicit loops over rows, written from the spec, float64 ----------
def _phi(name: str, power: int, s: float) -> float:
    if name == "x":
        return s**power
    if name == "relu":
        return max(s, 0.0)
    if name == "elu":
        return s if s > 0 else math.exp(s) - 1.0
    if name == "gelu":
        return 0.5 * s * (1.0 + math.erf(s / math.sqrt(2.0)))
    if name == "tanh":
        return math.tanh(s)
    if name == "exp":
        return math.exp(s)
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-s))
    raise AssertionError(name)


def _parse(spec: str) -> tuple[str, int, str | None]:
    base, _, div = spec.partition("/")
    if base.startswith("x"):
        return "x", int(base[2:]) if "^" in base else 1, div or None
    return base, 1, div or None


def loop_reference(q, k, v, spec, allowed, bias=None, scale=None):
    """q (Nq, d), k (Nk, d), v (Nk, dv), allowed (Nq, Nk) bool; plain Python over rows."""
    q, k, v = q.double(), k.double(), v.double()
    nq, nk = q.shape[0], k.shape[0]
    scale = 1.0 / math.sqrt(q.shape[1]) if scale is None else scale
    out = torch.zeros(nq, v.shape[1], dtype=torch.float64)
    for i in range(nq):
        keys = [j for j in range(nk) if allowed[i, j]]
        if not keys:
            continue
        s = {j: float((q[i] @ k[j]).detach()) * scale for j in keys}
        if bias is not None:
            s = {j: s[j] + float(bias[i, j].detach()) for j in keys}
        if spec == "softmax":
            m = max(s.values())
            e = {j: math.exp(s[j] - m) for j in keys}
            z = sum(e.values())
            w = {j: e[j] / z for j in keys}
        elif spec == "sigmoid-log(N)":  # sigmoid attention: b = -log n, n the row's keys
            w = {j: _phi("sigmoid", 1, s[j] - math.log(len(keys))) for j in keys}
        else:
            name, power, div = _parse(spec)
            n = len(keys)
            d = {None: 1.0, "sqrt(N)": math.sqrt(n), "N": float(n)}.get(div)
            if d is None:
                d = float(div)
            w = {j: _phi(name, power, s[j]) / d for j in keys}
        for j in keys:
            out[i] += w[j] * v[j]
    return out


def check_against_loops(q, k, v, spec, allowed, bias=None, atol=1e-9):
    """q (B, H, Nq, d) etc.; allowed broadcastable to (B, H, Nq, Nk)."""
    out = attention(q, k, v, spec, attn_mask=allowed, bias=bias)
    b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    allowed_full = torch.ones(b, h, nq, nk, dtype=torch.bool) if allowed is None else allowed.expand(b, h, nq, nk)
    for bi in range(b):
        for hi in range(h):
            bb = None if bias is None else bias.expand(b, h, nq, nk)[bi, hi]
            ref = loop_reference(q[bi, hi], k[bi, hi], v[bi, hi], spec, allowed_full[bi, hi], bb)
            torch.testing.assert_close(out[bi, hi], ref, atol=atol, rtol=1e-9)


def _qkv(b=2, h=2, nq=5, nk=7, d=4, dv=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, nq, d, generator=g, dtype=dtype),
        torch.randn(b, h, nk, d, generator=g, dtype=dtype),
        torch.randn(b, h, nk, dv, generator=g, dtype=dtype),
    )


# --- activation specs --------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_spec_round_trip(spec):
    act = get_activation(spec)
    assert act.spec == spec
    assert get_activation(act.spec) == act
    assert get_activation(act) is act


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (" x ^ 3 / sqrt( N ) ", "x^3/sqrt(N)"),
        ("X^3/SQRT(n)", "x^3/sqrt(N)"),
        ("x^1", "x"),
        ("x^3/14.0", "x^3/14"),
        ("ReLU / n", "relu/N"),
        ("x^2/0.5", "x^2/0.5"),
        ("Softmax", "softmax"),
        ("Sigmoid - log(n)", "sigmoid-log(N)"),
    ],
)
def test_spec_normalisation(raw, canonical):
    assert get_activation(raw).spec == canonical


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("x^0", "positive integer"),
        ("x^-1", "positive integer"),
        ("x^1.5", "positive integer"),
        ("softmax/2", "softmax takes no divisor"),
        ("swish", "unknown activation"),
        ("", "bad activation spec"),
        ("x^3/0", "positive"),
        ("x^3/-2", "positive"),
        ("x^3/abc", "not a number"),
        ("x^3/inf", "finite"),
        ("relu-log(N)", "defined for sigmoid only"),
        ("sigmoid-log(N)/2", "it takes no divisor"),
        ("sigmoid-log(7)", "write the shift as 'sigmoid-log(N)'"),
    ],
)
def test_bad_spec_errors_show_forms(bad, fragment):
    with pytest.raises(ValueError) as e:
        get_activation(bad)
    assert fragment in str(e.value)
    assert repr(bad) in str(e.value)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="spec string"):
        get_activation(3)


def test_list_activations_names_every_form():
    text = "\n".join(polyattn.list_activations())
    for form in ["softmax", "x^P", "relu", "elu", "gelu", "tanh", "exp", "sigmoid", "/C", "/sqrt(N)", "/N", "-log(N)"]:
        assert form in text


def test_bad_spec_in_attention_is_value_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="accepted forms"):
        attention(q, k, v, "x^three")


# --- values against the loop reference -------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_no_mask(spec):
    q, k, v = _qkv()
    check_against_loops(q, k, v, spec, None)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_padding_causal_bias_cross(spec):
    q, k, v = _qkv(nq=6, nk=6, seed=1)
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[0, ..., 4:] = False
    pad[1, ..., 1:] = False
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    out_causal = attention(q, k, v, spec, attn_mask=pad, bias=bias, causal=True)
    torch.testing.assert_close(out_causal, attention(q, k, v, spec, attn_mask=pad & causal, bias=bias))
    check_against_loops(q, k, v, spec, pad & causal, bias)
    # cross-attention, Nq != Nk, with a padding mask only
    q2, k2, v2 = _qkv(nq=3, nk=8, seed=2)
    check_against_loops(q2, k2, v2, spec, pad[..., :1].expand(2, 1, 1, 8).clone().fill_(True) & (torch.arange(8) < 5))


def test_causal_is_top_left_aligned_like_sdpa():
    q, k, v = _qkv(nq=4, nk=7, seed=3)
    ours = attention(q, k, v, "softmax", causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, sdpa)


def test_softmax_matches_sdpa_with_mask_and_scale():
    q, k, v = _qkv(seed=4)
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[..., 0] = True
    ours = attention(q, k, v, "softmax", attn_mask=mask, scale=0.3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ours, sdpa)


def test_batch_and_head_broadcasting():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 3, 6, 4, generator=g, dtype=torch.float64)  # shared over batch
    v = torch.randn(2, 1, 6, 2, generator=g, dtype=torch.float64)  # shared over heads
    out = attention(q, k, v, "x^3/sqrt(N)")
    assert out.shape == (2, 3, 5, 2)
    full = attention(q, k.expand(2, 3, 6, 4), v.expand(2, 3, 6, 2), "x^3/sqrt(N)")
    torch.testing.assert_close(out, full)


@pytest.mark.parametrize("spec", ["x^3/sqrt(N)", "x^3", "x", "relu/N", "exp", "softmax"])
def test_masked_entries_are_exactly_zero_not_large_negative(spec):
    # A masked key with a huge value must contribute nothing, whatever phi does with large negatives.
    q, k, v = _qkv(b=1, h=1, nq=3, nk=4, seed=6)
    v = v.clone()
    v[..., 3, :] = 1e30
    mask = torch.tensor([True, True, True, False])
    out = attention(q, k, v, spec, attn_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention(q[..., :3, :], k[..., :3, :], v[..., :3, :], spec))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_empty_rows_give_zeros_and_finite_grads(spec):
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=1, nq=3, nk=4, seed=7))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out = attention(q, k, v, spec, attn_mask=mask)
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_dynamic_n_counts_keys_per_row_and_example():
    q, k, v = _qkv(b=2, h=1, nq=1, nk=4, seed=8)
    ones = torch.ones_like(k)
    # with q = 0 and x^1, every score is 0 -> use x^0-like trick: relu of constant bias instead
    bias = torch.ones(1, 1, 1, 4, dtype=torch.float64)
    zeros = torch.zeros_like(q)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]]).view(2, 1, 1, 4)
    out = attention(zeros, ones, torch.ones(2, 1, 4, 1, dtype=torch.float64), "x/sqrt(N)", attn_mask=mask, bias=bias)
    # row weight 1/sqrt(n) on each of n keys -> sum = sqrt(n)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0, 1.0], dtype=torch.float64))
    out_n = attention(zeros, ones, torch.ones(2, 1, 4, 1, dtype=torch.float64), "x/N", attn_mask=mask, bias=bias)
    torch.testing.assert_close(out_n.flatten(), torch.tensor([1.0, 1.0], dtype=torch.float64))


# --- gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["softmax", "x^3/sqrt(N)", "x/14", "relu/N"])
def test_gradcheck_with_padding_mask(spec):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[True] * 5, [True, True, True, False, False]]).view(2, 1, 1, 5)
    assert torch.autograd.gradcheck(lambda q, k, v, b: attention(q, k, v, spec, attn_mask=pad, bias=b), (q, k, v, bias))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, spec, attn_mask=pad, causal=True), (q, k, v))


@settings(max_examples=25, deadline=None)
@given(
    spec=st.sampled_from(ALL_SPECS),
    valid=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
    causal=st.booleans(),
)
def test_padding_never_leaks(spec, valid, seed, causal):
    """Changing q/k/v at padded positions never changes outputs at valid positions."""
    n = 6
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 3, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.arange(n) >= valid  # True = padding
    mask = (~pad).view(1, 1, 1, n)
    out = attention(q, k, v, spec, attn_mask=mask, causal=causal)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[..., pad, :] = torch.randn(int(pad.sum()), 3, generator=g, dtype=torch.float64) * 50
    out2 = attention(q2, k2, v2, spec, attn_mask=mask, causal=causal)
    torch.testing.assert_close(out[..., :valid, :], out2[..., :valid, :], rtol=0, atol=0)


# --- dtypes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores_near_40(dtype):
    g = torch.Generator().manual_seed(10)
    d = 16
    # q and k along one axis with |q_0| = |k_0| = sqrt(40 sqrt(d)), so that scale * q.k = +-40
    a = math.sqrt(40.0 * math.sqrt(d))
    q = torch.zeros(1, 2, 8, d)
    k = torch.zeros(1, 2, 8, d)
    q[..., 0] = a * torch.sign(torch.randn(1, 2, 8, generator=g))
    k[..., 0] = a * torch.sign(torch.randn(1, 2, 8, generator=g))
    # phi(S) reaches 64,000/sqrt(8); small values keep the *output* inside fp16's range
    v = 0.05 * torch.randn(1, 2, 8, d, generator=g)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    torch.testing.assert_close(scores.abs(), torch.full_like(scores, 40.0))
    ref = attention(q, k, v, "x^3/sqrt(N)")
    low = attention(q.to(dtype), k.to(dtype), v.to(dtype), "x^3/sqrt(N)")
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    # fp32 inside: the only error left is rounding of the inputs and of the output
    expected = attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), "x^3/sqrt(N)")
    torch.testing.assert_close(low.float(), expected.to(dtype).float(), rtol=0, atol=0)
    rel = (low.float() - ref).abs().max() / ref.abs().max()
    # a cubed score amplifies the inputs' rounding (bf16: 8 mantissa bits) about threefold
    assert rel < (3e-2 if dtype == torch.bfloat16 else 3e-3)


def test_naive_fp16_would_overflow():
    # Why polyattn computes in fp32: the same cube in fp16 overflows past 65,504.
    s = torch.tensor([41.0], dtype=torch.float16)
    assert torch.isinf(s.pow(3))


def test_float64_stays_float64():
    q, k, v = _qkv()
    assert attention(q, k, v, "x^3/sqrt(N)").dtype == torch.float64


# --- dropout --------------------------------------------------------------------------------------
def test_dropout_after_masking_keeps_masked_zero():
    torch.manual_seed(0)
    q, k, v = _qkv(b=1, h=1, nq=4, nk=5)
    mask = torch.tensor([True, True, True, False, False])
    v2 = v.clone()
    v2[..., 3:, :] = 1e6
    out = attention(q, k, v2, "x^3/sqrt(N)", attn_mask=mask, dropout_p=0.5)
    assert out.abs().max() < 1e3
    assert not torch.allclose(out, attention(q, k, v2, "x^3/sqrt(N)", attn_mask=mask))


# --- input errors -----------------------------------------------------------------------------------
def test_errors_name_argument_and_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q and k must have the same head dimension.*\(2, 2, 5, 4\)"):
        attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="k and v must have the same number of keys"):
        attention(q, k, v[..., :6, :])
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        attention(q, k, v, attn_mask=torch.ones(5, 7))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 7\) does not broadcast"):
        attention(q, k, v, attn_mask=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias of shape"):
        attention(q, k, v, bias=torch.ones(5, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        attention(q.long(), k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        attention(q.float(), k, v)
    with pytest.raises(ValueError, match=r"must have shape \(\.\.\., N, d\)"):
        attention(torch.ones(4, dtype=torch.float64), k, v)
    with pytest.raises(ValueError, match="do not broadcast"):
        attention(q, k[:1].expand(3, 2, 7, 4), v)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.5)


# --- the layer -------------------------------------------------------------------------------------
def _manual_mha(layer, x, context=None, allowed=None, causal=False):
    b, n, dim = x.shape
    h, hd = layer.num_heads, layer.head_dim
    w, bias = layer.qkv.weight, layer.qkv.bias
    ctx = x if context is None else context
    q = (x @ w[:dim].T + bias[:dim]).view(b, n, h, hd).transpose(1, 2)
    kv = ctx @ w[dim:].T + bias[dim:]
    m = ctx.shape[1]
    k = kv[..., :dim].reshape(b, m, h, hd).transpose(1, 2)
    v = kv[..., dim:].reshape(b, m, h, hd).transpose(1, 2)
    out = torch.zeros(b, h, n, hd, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            a = torch.ones(n, m, dtype=torch.bool) if allowed is None else allowed[bi].expand(n, m).clone()
            if causal:
                a &= torch.ones(n, m, dtype=torch.bool).tril()
            out[bi, hi] = loop_reference(q[bi, hi], k[bi, hi], v[bi, hi], layer.activation.spec, a)
    return layer.proj(out.transpose(1, 2).reshape(b, n, dim))


@pytest.mark.parametrize("spec", ["softmax", "x^3/sqrt(N)", "relu/N"])
def test_polyattention_matches_manual(spec):
    torch.manual_seed(0)
    layer = PolyAttention(8, 2, spec).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    torch.testing.assert_close(
        layer(x, key_padding_mask=pad, causal=True), _manual_mha(layer, x, allowed=~pad[:, None, :], causal=True)
    )
    ctx = torch.randn(2, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x, context=ctx), _manual_mha(layer, x, context=ctx))


def test_polyattention_state_dict_independent_of_activation():
    a = PolyAttention(16, 4, "softmax")
    b = PolyAttention(16, 4, "x^3/sqrt(N)")
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16)
    b.activation = "softmax"
    torch.testing.assert_close(a(x), b(x))
    b.activation = "x/14"
    assert b.activation.spec == "x/14"
    assert "x/14" in repr(b)


def test_polyattention_dropout_only_in_training():
    layer = PolyAttention(8, 2, "x^3/sqrt(N)", attn_drop=0.5).eval()
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(layer(x), layer(x))


def test_polyattention_bad_inputs():
    layer = PolyAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 8\)"):
        layer(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(torch.randn(2, 4, 8), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        layer(torch.randn(2, 4, 8), key_padding_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="divisible"):
        PolyAttention(10, 3)
    with pytest.raises(ValueError, match="unknown activation"):
        PolyAttention(8, 2, "swish")
