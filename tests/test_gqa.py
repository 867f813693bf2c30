"""enable_gqa as F.scaled_dot_product_attention has it: fewer key/value heads, no copy of k and v."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import polyattn

# (backend, activation): every backend that computes the activation.
CASES = [
    ("reference", "x^3/sqrt(N)"),
    ("chunked", "x^3/sqrt(N)"),
    ("linear", "x^2/N"),
    ("chunked", "x/14"),
    ("reference", "softmax"),
    ("sdpa", "softmax"),
    ("chunked", "sigmoid-log(N)"),
    ("auto", "relu/N"),
]


def _inputs(b=2, hq=6, hkv=2, nq=7, nk=9, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def _masks(b, hq, nq, nk):
    key_pad = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    key_pad[0, ..., -3:] = False
    per_head = torch.rand(b, hq, nq, nk, generator=torch.Generator().manual_seed(1)) > 0.3
    per_head[..., 0] = True
    return {"none": None, "key padding": key_pad, "per query head": per_head}


@pytest.mark.parametrize("backend, spec", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key padding", "per query head"])
def test_grouped_heads_equal_repeated_kv(backend, spec, causal, mask_kind):
    q, k, v = _inputs()
    mask = _masks(2, 6, 7, 9)[mask_kind]
    if backend == "linear" and mask_kind == "per query head":
        pytest.skip("the linear form takes key masks only")
    if backend == "sdpa" and causal and mask is not None:
        pytest.skip("SDPA takes a mask or causal, not both")
    out = polyattn.attention(q, k, v, spec, attn_mask=mask, causal=causal, backend=backend, enable_gqa=True)
    # The definition: every key/value head repeated for its group of query heads.
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    ref = polyattn.attention(q, kr, vr, spec, attn_mask=mask, causal=causal, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_softmax_equals_sdpa_with_enable_gqa_and_k_v_are_not_copied(monkeypatch):
    q, k, v = _inputs(dtype=torch.float32)
    ours = polyattn.attention(q, k, v, "softmax", causal=True, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Every attention call made for the groups receives k and v themselves, never a larger copy.
    seen = []
    real = polyattn.core.functional.resolve_backend

    def spy(backend, q_, k_, v_, *args, **kwargs):
        seen.append((k_.data_ptr(), v_.data_ptr(), k_.shape[-3]))
        return real(backend, q_, k_, v_, *args, **kwargs)

    monkeypatch.setattr(polyattn.core.functional, "resolve_backend", spy)
    polyattn.attention(q, k, v, "x^3/sqrt(N)", enable_gqa=True)
    assert seen == [(k.data_ptr(), v.data_ptr(), 2)] * 3


def test_gqa_errors_name_the_fix():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        polyattn.attention(q, k, v, "x^3/sqrt(N)")
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        polyattn.attention(q[:, :5], k, v, "x^3/sqrt(N)", enable_gqa=True)
    with pytest.raises(ValueError, match="cannot broadcast to 6 query heads"):
        polyattn.attention(q, k, v, "x", attn_mask=torch.ones(2, 4, 7, 9, dtype=torch.bool), enable_gqa=True)
    # Equal heads: enable_gqa changes nothing.
    same = polyattn.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), "x", enable_gqa=True)
    torch.testing.assert_close(same, polyattn.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), "x"))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_a_non_finite_scale_is_refused(scale):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        polyattn.attention(q, k[:, :1].expand(2, 6, 9, 8), v[:, :1].expand(2, 6, 9, 8), "x", scale=scale)


def test_overflow_of_finite_inputs_warns_once_per_line():
    import warnings

    q = torch.full((1, 1, 4, 8), 30.0)

    def call():
        return polyattn.attention(q, q, q, "x^16")  # 240^16 is past fp32's range

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            assert not torch.isfinite(call()).all()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "'x^16'" in messages[0] and "overflowed" in messages[0]
    # fp16 inputs: computed in fp32, overflowing only when cast back
    h = torch.full((1, 1, 64, 8), 12.0, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match=r"x\^3/sqrt\(N\)' \(float16 output\)"):
        polyattn.attention(h, h, h, "x^3/sqrt(N)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        polyattn.attention(h.float(), h.float(), h.float(), "x^3/sqrt(N)")  # fp32 holds it: no warning
        bad = q.clone()
        bad[0, 0, 0, 0] = float("nan")
        polyattn.attention(bad, q, q, "x")  # non-finite in: nothing overflowed
