"""attention_varlen equals polyattn.attention run on each document alone, on every backend, values and gradients."""

from __future__ import annotations

import pytest
import torch

import polyattn
from polyattn.core.backends import BackendUnsupported, explain_backend
from polyattn.core.backends import chunked_varlen as chunked_varlen_module
from polyattn.core.varlen import packed_row_counts, select_backend_varlen

H, HK, D, DV = 4, 2, 8, 6
# Documents of length 0, 1 and longer than the (16, 16) test tile, one empty at the end.
LENS = [5, 0, 1, 37, 20, 0]
ACTIVATIONS = ["softmax", "x^3/sqrt(N)", "x^2/N", "x/14", "relu/N", "sigmoid-log(N)"]


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lens_q, lens_k=None, dtype=torch.float64, heads=H, kv_heads=HK, seed=0):
    lens_k = lens_q if lens_k is None else lens_k
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads, D, generator=g, dtype=dtype)
    k = torch.randn(sum(lens_k), kv_heads, D, generator=g, dtype=dtype)
    v = torch.randn(sum(lens_k), kv_heads, DV, generator=g, dtype=dtype)
    return q, k, v


def _per_document_oracle(q, k, v, lens_q, lens_k, activation, causal, scale=None):
    """polyattn.attention (reference) on each document alone, k/v heads repeated as repeat_kv does."""
    groups = q.shape[1] // k.shape[1]
    outs, qa, ka = [], 0, 0
    for n, m in zip(lens_q, lens_k, strict=True):
        qd = q[qa : qa + n].transpose(0, 1).unsqueeze(0)  # (1, H, n, d)
        kd = k[ka : ka + m].repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)
        vd = v[ka : ka + m].repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)
        if n and m:
            o = polyattn.attention(qd, kd, vd, activation, causal=causal, scale=scale, backend="reference")
        else:
            o = q.new_zeros(1, q.shape[1], n, v.shape[2]) + 0 * (qd.sum() + kd.sum() + vd.sum())
        outs.append(o[0].transpose(0, 1))
        qa, ka = qa + n, ka + m
    return torch.cat(outs, dim=0)


def _out_and_grads(fn, q, k, v):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves]


def _assert_close(got, want, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles, so a 37-token document spans several tiles and causal diagonals inside them."""
    monkeypatch.setattr(chunked_varlen_module, "default_block_sizes", lambda layout, device: (16, 16))


def _backends(activation):
    names = ["reference", "chunked"]
    if polyattn.get_activation(activation).is_polynomial:
        names.append("linear")
    if activation == "softmax":
        names.append("sdpa")
    return names


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_backend_equals_attention_per_document(activation, causal, small_tiles):
    q, k, v = _packed(LENS)
    cu = _cu(LENS)
    want = _out_and_grads(lambda q, k, v: _per_document_oracle(q, k, v, LENS, LENS, activation, causal), q, k, v)
    for backend in _backends(activation):
        got = _out_and_grads(
            lambda q, k, v, b=backend: polyattn.attention_varlen(
                q, k, v, cu, activation=activation, causal=causal, backend=b
            ),
            q,
            k,
            v,
        )
        _assert_close(got, want, 1e-8)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_and_separate_key_offsets(causal, small_tiles):
    # Queries and keys packed differently (cross-attention-like), one query document without keys, a given scale.
    lens_q, lens_k = [3, 17, 2, 0], [20, 9, 0, 4]
    q, k, v = _packed(lens_q, lens_k, dtype=torch.float32, heads=2, kv_heads=1)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    for activation in ("x^3/sqrt(N)", "softmax"):
        want = _out_and_grads(
            lambda q, k, v, a=activation: _per_document_oracle(
                q.double(), k.double(), v.double(), lens_q, lens_k, a, causal, 0.3
            ).float(),
            q,
            k,
            v,
        )
        backends = ["reference", "chunked"] + (["linear"] if activation != "softmax" else [])
        for backend in backends:
            got = _out_and_grads(
                lambda q, k, v, a=activation, b=backend: polyattn.attention_varlen(
                    q, k, v, cu_q, cu_k, activation=a, causal=causal, scale=0.3, backend=b
                ),
                q,
                k,
                v,
            )
            _assert_close(got, want, 1e-5)


def test_counts_are_per_document():
    # x/N with v = 1: every row of the output is 1 only if N is the row's own document count.
    lens = [3, 0, 7, 1]
    cu = _cu(lens)
    q = torch.zeros(sum(lens), 1, 2, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.ones(sum(lens), 1, 1, dtype=torch.float64)
    # S = 0 everywhere; exp/N then weighs every attendable key 1/N: the output is exactly 1.
    for causal in (False, True):
        for backend in ("reference", "chunked"):
            out = polyattn.attention_varlen(q, k, v, cu, activation="exp/N", causal=causal, backend=backend)
            torch.testing.assert_close(out, torch.ones_like(out))
    counts = packed_row_counts(cu, cu, causal=True)
    assert counts.tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 6, 7, 1]
    assert packed_row_counts(cu, cu, causal=False).tolist() == [3] * 3 + [7] * 7 + [1]


def test_bf16_autocast_and_auto():
    lens = [40, 300, 100]
    q, k, v = _packed(lens, dtype=torch.bfloat16, heads=2, kv_heads=2)
    cu = _cu(lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = polyattn.attention_varlen(q, k, v, cu, activation="x^3/sqrt(N)", causal=True)
    assert out.dtype == torch.bfloat16
    want = _per_document_oracle(q.double(), k.double(), v.double(), lens, lens, "x^3/sqrt(N)", True)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    choice = select_backend_varlen(q, k, "x^3/sqrt(N)", cu, v=v, causal=True)
    assert choice.name in ("chunked", "linear", "reference")
    text = explain_backend(q, k, "x^3/sqrt(N)", cu_seqlens_q=cu, v=v, causal=True)
    assert "3 documents of 40..300 tokens" in text and "<- auto" in text


def test_chunked_tiles_never_cross_documents(small_tiles):
    from polyattn.core.backends.chunked_varlen import varlen_plan
    from polyattn.core.backends.common import Layout

    docs = [(0, 5, 0, 5), (5, 5, 5, 5), (5, 42, 5, 42), (42, 62, 42, 62)]
    lay = Layout(HK, 2 * 62, 62, D, DV)
    plan = varlen_plan(polyattn.get_activation("x^3"), docs, lay, 2, 62, 1.0, True, 1.0, None, torch.device("cpu"), 8)
    for t in plan.tiles:
        row_doc = next(i for i, (a, b, _, _) in enumerate(docs) if a <= t.i0 % 62 < b)
        a, b, c, d = docs[row_doc]
        assert a <= t.i0 % 62 and (t.i1 - 1) % 62 < b and c <= t.j0 and t.j1 <= d
        assert t.j0 <= t.i1 - 1 - (t.shift)  # causal: no tile wholly above a document's diagonal
    assert sum((t.i1 - t.i0) * (t.j1 - t.j0) for t in plan.tiles) < 2 * 62 * 62 // 2


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        (torch.tensor([1, 5, 10], dtype=torch.int32), "must start at 0"),
        (torch.tensor([0, 6, 5, 10], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 5, 9], dtype=torch.int32), "must equal the number of packed tokens, 10"),
        (torch.tensor([0, 5, 10]), "must be int32"),
        (torch.tensor([[0, 5, 10]], dtype=torch.int32), "shape"),
        (torch.tensor([0], dtype=torch.int32), "at least one document"),
        ([0, 5, 10], "int32 tensor"),
    ],
)
def test_bad_cu_seqlens_are_clear_errors(cu, match):
    q, k, v = _packed([5, 5])
    with pytest.raises((ValueError, TypeError), match=match):
        polyattn.attention_varlen(q, k, v, cu, activation="x^3/sqrt(N)")


def test_bad_inputs_are_clear_errors():
    q, k, v = _packed([5, 5])
    cu = _cu([5, 5])
    with pytest.raises(ValueError, match="total_tokens, heads, head_dim"):
        polyattn.attention_varlen(q[None], k, v, cu)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        polyattn.attention_varlen(q[:, :3], k, v, cu)
    with pytest.raises(ValueError, match="max_seqlen_q=4 is shorter"):
        polyattn.attention_varlen(q, k, v, cu, max_seqlen_q=4)
    with pytest.raises(ValueError, match="pass cu_seqlens_k"):
        polyattn.attention_varlen(q, k[:7], v[:7], cu)
    with pytest.raises(ValueError, match="same documents"):
        polyattn.attention_varlen(q, k, v, cu, _cu([10]))
    with pytest.raises(BackendUnsupported, match="linear"):
        polyattn.attention_varlen(q, k, v, cu, activation="softmax", backend="linear")
    with pytest.raises(ValueError, match="unknown backend"):
        polyattn.attention_varlen(q, k, v, cu, backend="flash")
    if torch.device("meta") != q.device:
        with pytest.raises(ValueError, match="move it with"):
            polyattn.attention_varlen(q, k, v, cu.to("meta"))


def test_linear_state_prefill_varlen_continues_every_document():
    lens = [6, 0, 1, 11]
    cu = _cu(lens)
    q, k, v = _packed(lens)
    state, out = polyattn.LinearState.prefill_varlen(q, k, v, cu, "x^2/sqrt(N)")
    assert tuple(state.state.shape[:2]) == (len(lens), H) and state.count[:, 0].tolist() == lens
    want = polyattn.attention_varlen(q, k, v, cu, activation="x^2/sqrt(N)", causal=True, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # One more token per document: each row of the state continues its own document only.
    g = torch.Generator().manual_seed(9)
    qt = torch.randn(len(lens), H, 1, D, generator=g, dtype=torch.float64)
    kt = torch.randn(len(lens), HK, 1, D, generator=g, dtype=torch.float64)
    vt = torch.randn(len(lens), HK, 1, DV, generator=g, dtype=torch.float64)
    got = state.step(qt, kt.repeat_interleave(H // HK, 1), vt.repeat_interleave(H // HK, 1))
    longer = [n + 1 for n in lens]
    q2, k2, v2, starts = [], [], [], _cu(lens).tolist()
    for i, n in enumerate(lens):
        a = starts[i]
        q2 += [q[a : a + n], qt[i].transpose(0, 1)]
        k2 += [k[a : a + n], kt[i].transpose(0, 1)]
        v2 += [v[a : a + n], vt[i].transpose(0, 1)]
    full = polyattn.attention_varlen(
        torch.cat(q2), torch.cat(k2), torch.cat(v2), _cu(longer), activation="x^2/sqrt(N)", causal=True
    )
    last = _cu(longer)[1:].long() - 1
    torch.testing.assert_close(got[:, :, 0], full[last], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="x\\^p activation"):
        polyattn.LinearState.prefill_varlen(q, k, v, cu, "softmax")
    with pytest.raises(TypeError, match="int32"):
        polyattn.LinearState.prefill_varlen(q, k, v, cu.long(), "x^2")
