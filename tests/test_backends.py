"""Every fast backend equals the reference in values and gradients; unsupported calls fail clearly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import polyattn
from polyattn.core.activations import get_activation
from polyattn.core.backends import (
    BACKENDS,
    BackendUnsupported,
    explain_backend,
    reference_attention,
    select_backend,
)
from polyattn.core.backends import chunked as chunked_module
from polyattn.core.backends.chunked import chunked_attention
from polyattn.core.backends.linear import feature_count, linear_attention, symmetric_features

B, H, NQ, NK, D, DV = 2, 3, 37, 45, 8, 5


def _inputs(dtype=torch.float64, nq=NQ, nk=NK, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g, dtype=dtype)
    k = torch.randn(1, H, nk, D, generator=g, dtype=dtype)  # broadcast over the batch
    v = torch.randn(B, H, nk, DV, generator=g, dtype=dtype)
    return q, k, v


def _masks(nq=NQ, nk=NK):
    g = torch.Generator().manual_seed(1)
    pad = torch.rand(B, 1, 1, nk, generator=g) > 0.3
    pad[1, ..., :] = False  # a fully padded example: its rows attend nothing
    full = torch.rand(1, H, nq, nk, generator=g) > 0.4
    full[0, 0, 3] = False  # an empty row
    return {"none": None, "padding": pad, "full": full}


def _bias(dtype=torch.float64, nq=NQ, nk=NK):
    g = torch.Generator().manual_seed(2)
    return {
        "none": None,
        "shared": torch.randn(nq, nk, generator=g, dtype=dtype),
        "per_head": torch.randn(1, H, nq, nk, generator=g, dtype=dtype),
    }


def _run(fn, q, k, v, bias=None, **kw):
    """Output and gradients (q, k, v[, bias]) of fn under a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(*leaves, bias=b, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    out.backward(g)
    return [out] + [t.grad for t in leaves] + ([b.grad] if b is not None else [])


def _assert_close(got, want, rtol):
    assert len(got) == len(want)
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(x).all(), f"tensor {i} has non-finite entries"
        err = (x.double() - y.double()).abs().max().item()
        scale = y.double().abs().max().item() + 1e-30
        assert err <= rtol * scale, f"tensor {i} (out, dq, dk, dv, dbias): max error {err:.3g} vs scale {scale:.3g}"


def _ref(act, q, k, v, **kw):
    return _run(lambda *a, **k_: reference_attention(*a[:3], act, **k_), q, k, v, **kw)


ELEMENTWISE = [
    "x",
    "x^2",
    "x^3/sqrt(N)",
    "x^3/N",
    "x^4/7",
    "relu/N",
    "gelu",
    "exp/sqrt(N)",
    "tanh",
    "sigmoid/N",
    "elu",
]


def _chunked(act, blocks):
    return lambda *a, **kw: chunked_attention(*a[:3], act, block_sizes=blocks, **kw)


def _linear(act, chunk):
    return lambda *a, **kw: linear_attention(*a[:3], act, chunk=chunk, **kw)


# --------------------------------------------------------------------------
# chunked: every activation, mask, causal and bias, several tile shapes
# --------------------------------------------------------------------------
@pytest.fixture(params=["keep", "recompute"])
def score_policy(request, monkeypatch):
    """Short sequences keep the score tiles for backward; long ones recompute them: test both paths."""
    if request.param == "recompute":
        monkeypatch.setattr(chunked_module, "_KEEP_FACTOR", 0)
    return request.param


@pytest.mark.parametrize("spec", ELEMENTWISE + ["softmax"])
def test_chunked_equals_reference_fp64(spec, score_policy):
    act = get_activation(spec)
    q, k, v = _inputs()
    masks, biases = _masks(), _bias()
    combos = itertools.product(["none", "padding", "full"], [False, True], ["none", "per_head"])
    for (mname, causal, bname), blocks in zip(combos, itertools.cycle([(8, 16), (16, 5), (64, 64)])):
        kw = dict(attn_mask=masks[mname], causal=causal, bias=biases[bname])
        want = _ref(act, q, k, v, **kw)
        got = _run(_chunked(act, blocks), q, k, v, **kw)
        _assert_close(got, want, 1e-8)


def test_chunked_broadcast_bias_shapes_and_grads(score_policy):
    act = get_activation("x^3/sqrt(N)")
    q, k, v = _inputs()
    g = torch.Generator().manual_seed(5)
    for shape in [(NQ, NK), (B, 1, NQ, NK), (B, 1, 1, NK), (1, H, NQ, 1)]:
        bias = torch.randn(*shape, generator=g, dtype=torch.float64)
        want = _ref(act, q, k, v, bias=bias, causal=True)
        got = _run(_chunked(act, (16, 8)), q, k, v, bias=bias, causal=True)
        _assert_close(got, want, 1e-8)


@pytest.mark.parametrize("spec", ["x^3/sqrt(N)", "softmax", "gelu/N"])
def test_chunked_fp32(spec, score_policy):
    act = get_activation(spec)
    q, k, v = _inputs(torch.float32)
    kw = dict(attn_mask=_masks()["padding"], causal=True)
    want = _ref(act, q.double(), k.double(), v.double(), **kw)
    got = _run(_chunked(act, (16, 16)), q, k, v, **kw)
    _assert_close(got, want, 1e-5)


def test_chunked_nq_greater_than_nk_causal_and_3d_inputs():
    act = get_activation("x^2/N")
    g = torch.Generator().manual_seed(7)
    q = torch.randn(4, 50, 8, generator=g, dtype=torch.float64)
    k = torch.randn(4, 20, 8, generator=g, dtype=torch.float64)
    v = torch.randn(4, 20, 6, generator=g, dtype=torch.float64)
    want = _ref(act, q, k, v, causal=True)
    got = _run(_chunked(act, (16, 8)), q, k, v, causal=True)
    _assert_close(got, want, 1e-8)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("spec", ["x^3/sqrt(N)", "softmax"])
def test_chunked_never_materialises_the_score_matrix(spec):
    n = 2048
    q, k, v = (torch.randn(1, 1, n, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask[..., -100:] = False
    with _LargestTensor() as rec:
        out = chunked_attention(q, k, v, get_activation(spec), attn_mask=mask, causal=True)
        out.sum().backward()
    assert rec.largest <= n * 512, f"an op produced {rec.largest} elements; N^2 = {n * n}"


def test_chunked_rejects_dropout_and_double_backward():
    q, k, v = (t.requires_grad_() for t in _inputs())
    with pytest.raises(BackendUnsupported, match="dropout"):
        polyattn.attention(q, k, v, "x^3", backend="chunked", dropout_p=0.1)
    out = polyattn.attention(q, k, v, "x^3", backend="chunked")
    with pytest.raises(RuntimeError, match="not twice differentiable.*reference"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    out = polyattn.attention(q, k, v, "x^3", backend="reference")
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    gq.sum().backward()  # the reference path is twice differentiable


# --------------------------------------------------------------------------
# linear: x^p with padding masks, causal, dynamic N
# --------------------------------------------------------------------------
def test_symmetric_features_give_the_power_of_the_dot_product():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for p in (1, 2, 3, 4):
        fa, fb = symmetric_features(a, p), symmetric_features(b, p)
        assert fa.shape[-1] == feature_count(7, p) == math.comb(7 + p - 1, p)
        torch.testing.assert_close(fa @ fb.T, (a @ b.T) ** p, rtol=1e-12, atol=1e-12)
    assert (feature_count(32, 2), feature_count(64, 2), feature_count(32, 3), feature_count(64, 3)) == (
        528,
        2080,
        5984,
        45760,
    )


@pytest.mark.parametrize("spec", ["x", "x^2", "x^2/sqrt(N)", "x^3/sqrt(N)", "x^3/N", "x^4/7"])
def test_linear_equals_reference_fp64(spec):
    act = get_activation(spec)
    masks = _masks()
    for (nq, nk), mname, causal, chunk in itertools.product(
        [(NQ, NK), (NK, NQ)], ["none", "padding"], [False, True], [16]
    ):
        q, k, v = _inputs(nq=nq, nk=nk)
        mask = masks[mname][..., :nk] if masks[mname] is not None else None
        want = _ref(act, q, k, v, attn_mask=mask, causal=causal)
        got = _run(_linear(act, chunk), q, k, v, attn_mask=mask, causal=causal)
        _assert_close(got, want, 1e-8)


def test_linear_fp32():
    act = get_activation("x^2/sqrt(N)")
    q, k, v = _inputs(torch.float32)
    for causal in (False, True):
        kw = dict(attn_mask=_masks()["padding"], causal=causal)
        want = _ref(act, q.double(), k.double(), v.double(), **kw)
        got = _run(_linear(act, 16), q, k, v, **kw)
        _assert_close(got, want, 1e-5)


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("relu", {}, "x\\^p only"),
        ("softmax", {}, "x\\^p only"),
        ("x^3", {"bias": torch.zeros(NQ, NK, dtype=torch.float64)}, "bias"),
        ("x^3", {"attn_mask": torch.ones(NQ, NK, dtype=torch.bool)}, "key-padding"),
        ("x^3", {"dropout_p": 0.1}, "dropout"),
    ],
)
def test_linear_rejects_what_does_not_factorise(spec, kwargs, match):
    q, k, v = _inputs()
    with pytest.raises(BackendUnsupported, match=match):
        polyattn.attention(q, k, v, spec, backend="linear", **kwargs)


# --------------------------------------------------------------------------
# sdpa: softmax with polyattn's mask semantics
# --------------------------------------------------------------------------
@pytest.mark.parametrize("mname", ["none", "padding", "full"])
def test_sdpa_equals_reference(mname):
    act = get_activation("softmax")
    q, k, v = _inputs()
    mask = _masks()[mname]
    for causal, bname in itertools.product([False, True], ["none", "shared"]):
        kw = dict(attn_mask=mask, causal=causal, bias=_bias()[bname])
        want = _ref(act, q, k, v, **kw)
        got = _run(lambda *a, **k_: polyattn.attention(*a[:3], act, backend="sdpa", **k_), q, k, v, **kw)
        _assert_close(got, want, 1e-8)


def test_sdpa_rejects_polynomials():
    q, k, v = _inputs()
    with pytest.raises(BackendUnsupported, match="softmax only"):
        polyattn.attention(q, k, v, "x^3", backend="sdpa")


# --------------------------------------------------------------------------
# dispatch and auto
# --------------------------------------------------------------------------
def test_every_backend_is_registered_with_a_summary():
    assert set(BACKENDS) == {"reference", "sdpa", "chunked", "linear", "triton"}
    assert all(b.summary for b in BACKENDS.values())


def test_unknown_backend_is_a_clear_error():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown backend 'fast'.*chunked"):
        polyattn.attention(q, k, v, "x^3", backend="fast")


def test_triton_without_gpu_or_interpreter_is_a_clear_error():
    reason = BACKENDS["triton"].unsupported(
        polyattn.core.backends.call_info(torch.empty(1, 1, 8, 8), torch.empty(1, 1, 8, 8), "x^3")
    )
    if reason is None:
        pytest.skip("a CUDA device or the Triton interpreter is active")
    q, k, v = _inputs(torch.float32)
    with pytest.raises(BackendUnsupported, match="triton"):
        polyattn.attention(q, k, v, "x^3", backend="triton")


@pytest.mark.parametrize("spec", ["x^3/sqrt(N)", "softmax", "x^2/N", "relu"])
def test_auto_equals_reference_on_every_combination(spec):
    """auto never runs a backend that cannot compute the call (bias, full masks, causal, dropout)."""
    act = get_activation(spec)
    q, k, v = _inputs(nq=160, nk=160)
    masks, biases = _masks(160, 160), _bias(nq=160, nk=160)
    combos = itertools.product(["none", "padding", "full"], [False, True], ["none", "shared"])
    for mname, causal, bname in combos:
        kw = dict(attn_mask=masks[mname], causal=causal, bias=biases[bname])
        choice = select_backend(q, k, act, v=v, **kw)
        assert BACKENDS[choice.name].unsupported(polyattn.core.backends.call_info(q, k, act, v=v, **kw)) is None
        want = _ref(act, q, k, v, **kw)
        got = _run(lambda *a, **k_: polyattn.attention(*a[:3], act, **k_), q, k, v, **kw)
        _assert_close(got, want, 1e-8)


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def test_auto_choices_follow_the_cost_model():
    big = _meta(1, 4, 16384, 64)
    assert select_backend(big, big, "x^3/sqrt(N)").name == "chunked"  # 45,760 features: linear loses
    small_d = _meta(1, 4, 16384, 32)
    assert select_backend(small_d, small_d, "x^2/sqrt(N)").name == "linear"
    assert select_backend(big, big, "x/sqrt(N)").name == "linear"  # d features
    assert select_backend(small_d, small_d, "x^2/sqrt(N)", has_bias=True).name == "chunked"
    assert select_backend(big, big, "softmax").name == "sdpa"
    tiny = _meta(1, 2, 16, 8)
    assert select_backend(tiny, tiny, "x^3").name == "reference"
    # dropout: only reference (and sdpa for softmax) implement it
    mid = _meta(2, 4, 512, 64)
    assert select_backend(mid, mid, "x^3/sqrt(N)", dropout_p=0.1).name == "reference"
    assert select_backend(mid, mid, "softmax", dropout_p=0.1).name == "sdpa"


def test_select_backend_explains_itself():
    q = _meta(1, 4, 4096, 64)
    choice = select_backend(q, q, "x^3/sqrt(N)")
    assert choice.name in choice.reason or "estimated" in choice.reason
    names = {name for name, _, _ in choice.candidates}
    assert names == set(BACKENDS)
    table = explain_backend(q, q, "x^3/sqrt(N)")
    assert "auto -> chunked" in table and "45,760 features" in table and "unsupported" in table
    assert polyattn.explain_backend is explain_backend


def test_dropout_under_auto_runs_and_drops():
    q, k, v = _inputs(torch.float32, nq=64, nk=64)
    torch.manual_seed(0)
    out = polyattn.attention(q, k, v, "x^3/sqrt(N)", dropout_p=0.5)
    assert not torch.allclose(out, polyattn.attention(q, k, v, "x^3/sqrt(N)"))


def test_low_precision_inputs_are_computed_in_fp32_and_returned_as_given():
    q, k, v = _inputs(torch.float32, nq=300, nk=300)
    for backend in ("chunked", "linear"):
        out = polyattn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "x^3/sqrt(N)", backend=backend)
        want = polyattn.attention(
            q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), "x^3/sqrt(N)", backend="reference"
        )
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


class _ProductDtypes(TorchDispatchMode):
    """Records the dtype of every matrix product (mm, bmm, addmm, baddbmm, SDPA) that runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm", "addmm", "baddbmm") or "scaled_dot_product" in name:
            self.dtypes.add((out[0] if isinstance(out, tuple) else out).dtype)
        return out


@pytest.mark.parametrize(
    ("spec", "backend"),
    [("x^3/sqrt(N)", "reference"), ("x^3/sqrt(N)", "chunked"), ("x^2/N", "linear"), ("softmax", "sdpa")],
)
def test_autocast_does_not_lower_the_attention_to_bf16(spec, backend):
    # Under autocast every matmul would run in bf16, so x^3 of an fp16/bf16 score would be rounded (or,
    # in fp16, overflow): polyattn.attention turns autocast off inside, forward and backward.
    q, k, v = (t.bfloat16().requires_grad_() for t in _inputs(torch.float32, nq=40, nk=40))
    with _ProductDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = polyattn.attention(q, k, v, spec, backend=backend)
    with _ProductDtypes() as seen_backward:
        out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert seen.dtypes == {torch.float32} and torch.bfloat16 not in seen_backward.dtypes
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = polyattn.attention(q32, k32, v32, spec, backend="reference")
    # Equal to fp32 attention of the same (bf16) inputs up to the final rounding of the output to bf16.
    torch.testing.assert_close(out.float(), want.bfloat16().float(), rtol=8e-3, atol=1e-5)  # one bf16 step
    want.bfloat16().float().square().sum().backward()
    torch.testing.assert_close(q.grad.float(), q32.grad.bfloat16().float(), rtol=2e-2, atol=1e-3)


def test_polyattention_layer_matches_across_backends():
    torch.manual_seed(0)
    layer = polyattn.PolyAttention(32, 4, "x^3/sqrt(N)").double()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[1, 50:] = True
    results = {}
    for backend in ("reference", "chunked", "linear"):
        layer.zero_grad()
        layer.backend = backend
        out = layer(x, key_padding_mask=pad, causal=True)
        out.pow(2).sum().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
    for backend in ("chunked", "linear"):
        _assert_close(results[backend], results["reference"], 1e-8)


# --------------------------------------------------------------------------
# the backend protocol and the cost model
# --------------------------------------------------------------------------
def test_every_backend_module_follows_the_protocol():
    from polyattn.core.backends.auto import MODULES
    from polyattn.core.backends.common import CallInfo, Estimate

    assert [m.NAME for m in MODULES] == list(BACKENDS)
    q, k, v = _inputs()
    info = CallInfo.of(q, k, "x^3/sqrt(N)", v=v, dropout_p=0.1)
    for m in MODULES:
        assert BACKENDS[m.NAME].fn is m.run and BACKENDS[m.NAME].unsupported is m.unsupported
        assert isinstance(m.cost(info, polyattn.core.backends.auto.rates_for(info.device)), Estimate)
        why_not = m.unsupported(info)
        if why_not is None:
            continue
        # run() checks the same rule and says the same thing
        with pytest.raises(BackendUnsupported, match=f"backend '{m.NAME}' cannot compute this call"):
            m.run(q, k, v, get_activation("x^3/sqrt(N)"), dropout_p=0.1)


def test_cost_model_reads_the_backends_own_tile_and_chunk_sizes(monkeypatch):
    from polyattn.core.backends import auto, linear
    from polyattn.core.backends.chunked import default_block_sizes

    q = _meta(1, 4, 4096, 32)
    info = polyattn.core.backends.call_info(q, q, "x^2/sqrt(N)")
    bq, bk = default_block_sizes(info.layout, info.device)
    assert f"of {bq}x{bk}" in auto.estimate("chunked", info).note
    before = auto.estimate("linear", info).seconds
    monkeypatch.setattr(linear, "_CHUNK", 4 * linear._CHUNK)  # fewer, larger steps: less per-op overhead
    assert auto.estimate("linear", info).seconds < before


def test_rates_calibrated_from_bench_results():
    from polyattn.core.backends import auto

    q = _meta(1, 4, 1024, 32)
    info = polyattn.core.backends.call_info(q, q, "x^3/sqrt(N)")
    chunked_s = auto.estimate("chunked", info).seconds
    results = {
        "config": {"device": "cpu", "dtype": "float32", "batch": 1, "heads": 4},
        "cases": [
            {"n": 1024, "d": 32, "p": 3, "backend": "chunked", "spec": "x^3/sqrt(N)", "time_s": 2 * chunked_s},
            {"n": 1024, "d": 32, "p": 3, "backend": "auto", "spec": "x^3/sqrt(N)", "time_s": 1.0},  # ignored
            {"n": 1024, "d": 32, "p": 3, "backend": "linear", "spec": "x^3/sqrt(N)", "skipped": "slow"},
        ],
    }
    rates = auto.calibrated(results)
    assert rates.scale == pytest.approx({"chunked": 2.0})
    auto.set_rates("cpu", rates)
    try:
        assert auto.estimate("chunked", info).seconds == pytest.approx(2 * chunked_s)
    finally:
        auto.set_rates("cpu", None)
    assert auto.estimate("chunked", info).seconds == pytest.approx(chunked_s)
