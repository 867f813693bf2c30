"""On a CUDA GPU, the GPU backends equal the reference: values and gradients, fp32 and bf16, masks, causal.

Run with ``pytest -m gpu`` (scripts/gpu_check.sh does). Without a CUDA device
every test here is skipped. The reference runs in fp64 on the same GPU from
the same (rounded) inputs, so the tolerance measures the backend alone: fp32
backends to 1e-4 of each tensor's largest entry (triton's dots are IEEE fp32;
linear sums N terms in fp32), bf16 to 3e-2 (bf16 tiles into fp32 sums;
outputs rounded to bf16).
"""

from __future__ import annotations

import os

import pytest
import torch

import polyattn
from polyattn.core.activations import get_activation
from polyattn.core.backends import reference_attention

# POLYATTN_GPU_TEST_DEVICE=cpu runs the non-triton tests on CPU: the dry run of scripts/gpu_check.sh.
DEVICE = os.environ.get("POLYATTN_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m gpu on a GPU)"
    ),
]

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
# (backend, activations): each backend with the activations it computes; the first of each list
# runs every (mask, causal, head dim) combination, the others one (each triton specialisation
# compiles its launch configurations on first use, about a second each).
CASES = [
    ("triton", ["x^3/sqrt(N)", "x^2/N", "x", "gelu", "sigmoid/N"]),
    ("linear", ["x^2/sqrt(N)", "x/sqrt(N)", "x^3/N"]),
    ("sdpa", ["softmax"]),
]
COMBOS = [(mask, causal, d) for mask in ("none", "padding") for causal in (False, True) for d in (64, 128)]


def _inputs(dtype, b=2, h=3, nq=300, nk=300, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, nq, d), (b, h, nk, d), (b, h, nk, d)]
    return [torch.randn(*s, generator=g).to(DEVICE, dtype) for s in shapes]


def _run(fn, q, k, v, grad_dtype=None, **kw):
    """Output and input gradients under one upstream gradient, rounded to ``grad_dtype`` (the backend's
    dtype, so that the fp64 reference sees the very values the backend does)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, grad_dtype or out.dtype)
    out.backward(g.to(out.dtype))
    return [out, *(t.grad for t in leaves)]


def _reference(act, q, k, v, **kw):
    return _run(lambda *a, **k_: reference_attention(*a, act, **k_), q.double(), k.double(), v.double(), q.dtype, **kw)


def _assert_close(got, want, tol, what):
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert x.dtype == got[0].dtype and torch.isfinite(x).all(), f"{what}: {name} has non-finite entries"
        err = (x.double() - y).abs().max().item()
        scale = y.abs().max().item() + 1e-30
        assert err <= tol * scale, f"{what}: {name} max error {err:.3g} vs largest entry {scale:.3g}"


def _padding_mask(b, nk):
    mask = torch.rand(b, 1, 1, nk, generator=torch.Generator().manual_seed(1)) > 0.3
    return mask.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend,specs", CASES, ids=[c[0] for c in CASES])
def test_gpu_backend_equals_reference(backend, specs, dtype):
    for i, spec in enumerate(specs):
        act = get_activation(spec)
        for mask_kind, causal, d in COMBOS if i == 0 else [("padding", True, 64)]:
            nq, nk = (300, 300) if causal or d == 64 else (257, 190)
            q, k, v = _inputs(dtype, nq=nq, nk=nk, d=d, seed=i)
            kw = {"attn_mask": _padding_mask(2, nk) if mask_kind == "padding" else None, "causal": causal}
            want = _reference(act, q, k, v, **kw)
            got = _run(lambda *a, s=spec, **k_: polyattn.attention(*a, s, backend=backend, **k_), q, k, v, **kw)
            _assert_close(got, want, TOL[dtype], f"{backend} {spec} {dtype} d={d} {mask_kind} causal={causal}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_triton_long_sequence_and_large_head_dim(dtype):
    """Many blocks per program at N = 4096 and head dim 128: the autotuned launch configurations."""
    q, k, v = _inputs(dtype, b=1, h=2, nq=4096, nk=4096, d=128)
    act = get_activation("x^3/sqrt(N)")
    for causal in (False, True):
        want = _reference(act, q, k, v, causal=causal)
        got = _run(lambda *a, **k_: polyattn.attention(*a, act, backend="triton", **k_), q, k, v, causal=causal)
        _assert_close(got, want, TOL[dtype], f"triton N=4096 d=128 {dtype} causal={causal}")


def test_gpu_auto_picks_a_gpu_backend_for_long_sequences():
    q, k, v = _inputs(torch.bfloat16, b=1, h=2, nq=4096, nk=4096, d=64)
    choice = polyattn.core.backends.select_backend(q, k, "x^3/sqrt(N)")
    assert choice.name in ("triton", "linear"), choice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_varlen_equals_attention_per_document(dtype):
    varlen = getattr(polyattn, "attention_varlen", None)
    if varlen is None:
        pytest.skip("polyattn.attention_varlen is not in this version")
    lengths = [0, 37, 300, 5, 129]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total, h, d = sum(lengths), 4, 64
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(total, h, d, generator=g).to(DEVICE, dtype) for _ in range(3))
    for spec, causal in (("x^3/sqrt(N)", False), ("x^3/sqrt(N)", True), ("x^2/N", True)):
        for backend in ("auto", "triton"):
            kw = {"activation": spec, "causal": causal, "backend": backend}
            got = _run(lambda *a, kw=kw: varlen(*a, cu, **kw), q, k, v)
            # The reference: each document on its own, (1, H, n, d), in fp64.
            leaves = [t.double().detach().requires_grad_() for t in (q, k, v)]
            outs = []
            for i in range(len(lengths)):
                s, e = cu[i].item(), cu[i + 1].item()
                doc = [t[s:e].transpose(0, 1).unsqueeze(0) for t in leaves]
                o = reference_attention(*doc, get_activation(spec), causal=causal)
                outs.append(o.squeeze(0).transpose(0, 1))
            out = torch.cat(outs)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype).double())
            want = [out.detach(), *(t.grad for t in leaves)]
            _assert_close(got, want, TOL[dtype], f"varlen {backend} {spec} {dtype} causal={causal}")
