"""LinearState: exact recurrent decoding of causal x^p attention, against polyattn.attention in float64."""

from __future__ import annotations

import pytest
import torch

import polyattn
from polyattn import LinearState
from polyattn.core import decode


def _qkv(b=2, h=3, t=40, d=6, dv=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, t, n, generator=g, dtype=dtype) for n in (d, d, dv))


@pytest.mark.parametrize("spec", ["x", "x/sqrt(N)", "x^2/sqrt(N)", "x^2", "x^2/N", "x^2/14", "x^3/sqrt(N)"])
def test_prefill_then_steps_equal_causal_attention(spec, monkeypatch):
    monkeypatch.setattr(decode, "_CHUNK", 7)  # prefill crosses chunk boundaries
    q, k, v = _qkv()
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, :5] = False  # left padding: N counts the real keys of each row
    ref = polyattn.attention(q, k, v, spec, causal=True, attn_mask=pad[:, None, None, :], backend="reference")
    state, out = LinearState.prefill(q[..., :30, :], k[..., :30, :], v[..., :30, :], spec, key_mask=pad[:, None, :30])
    outs = [out] + [state.step(q[..., t : t + 1, :], k[..., t : t + 1, :], v[..., t : t + 1, :]) for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(outs, dim=-2), ref, rtol=1e-12, atol=1e-12)
    assert state.count.tolist() == [[40.0] * 3, [35.0] * 3]


def test_step_from_empty_and_token_layout():
    q, k, v = _qkv(t=6)
    ref = polyattn.attention(q, k, v, "x^2/sqrt(N)", causal=True, backend="reference")
    state = LinearState.empty("x^2/sqrt(N)", (2, 3), d=6, dv=5, dtype=torch.float64)
    outs = [state.step(q[..., t, :], k[..., t, :], v[..., t, :]) for t in range(6)]  # (..., d) per token
    torch.testing.assert_close(torch.stack(outs, dim=-2), ref, rtol=1e-12, atol=1e-12)
    more = state.extend(*(x[..., :3, :] for x in _qkv(t=3, seed=1)))
    assert more.shape == (2, 3, 3, 5) and state.count.eq(9).all()


def test_scale_and_low_precision():
    q, k, v = _qkv(t=20, dtype=torch.float32)
    state, out = LinearState.prefill(q.bfloat16(), k.bfloat16(), v.bfloat16(), "x^2/sqrt(N)", scale=0.3)
    assert out.dtype == torch.bfloat16 and state.state.dtype == torch.float32  # the sum runs in fp32
    exact = polyattn.attention(*(x.bfloat16().double() for x in (q, k, v)), "x^2/sqrt(N)", causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)  # bf16 output rounding only


def test_state_size_is_constant_in_the_context():
    state = LinearState.empty("x^2/sqrt(N)", (1, 8), d=64)
    before = state.nbytes
    for _ in range(3):
        state.step(*(torch.randn(1, 8, 1, 64) for _ in range(3)))
    assert state.nbytes == before == 8 * (2080 * 64 + 1) * 4  # F = C(65, 2) = 2,080 features at d = 64


def test_bad_inputs_are_named():
    q, k, v = _qkv(t=4)
    with pytest.raises(ValueError, match="needs an x\\^p activation.*KV cache"):
        LinearState.prefill(q, k, v, "softmax")
    with pytest.raises(ValueError, match="bad activation spec"):
        LinearState.prefill(q, k, v, "x^two")
    state, _ = LinearState.prefill(q, k, v, "x")
    with pytest.raises(ValueError, match="does not fit this LinearState"):
        state.step(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1])
    with pytest.raises(ValueError, match="step takes one token"):
        state.step(q, k, v)
    with pytest.raises(TypeError, match="key_mask must be a bool tensor"):
        LinearState.prefill(q, k, v, "x", key_mask=torch.ones(2, 1, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        LinearState.prefill(q, k, v, "x", key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="one T and batch shape"):
        LinearState.prefill(q, k[..., :3, :], v, "x")


def test_absorb_builds_the_state_prefill_builds(monkeypatch):
    monkeypatch.setattr(decode, "_CHUNK", 7)
    q, k, v = _qkv(t=20)
    pad = torch.ones(2, 1, 20, dtype=torch.bool)
    pad[0, :, :4] = False
    built, _ = LinearState.prefill(q, k, v, "x^2/sqrt(N)", key_mask=pad)
    absorbed = LinearState.empty("x^2/sqrt(N)", (2, 3), d=6, dv=5, dtype=torch.float64)
    absorbed.absorb(k, v, key_mask=pad)
    torch.testing.assert_close(absorbed.state, built.state, rtol=1e-12, atol=1e-12)
    assert torch.equal(absorbed.count, built.count) and absorbed.count[:, 0].tolist() == [16.0, 20.0]
    t = (x[..., :1, :] for x in _qkv(t=1, seed=2))
    torch.testing.assert_close(absorbed.step(*t), built.step(*(x[..., :1, :] for x in _qkv(t=1, seed=2))))
