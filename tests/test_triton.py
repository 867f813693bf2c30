"""The Triton kernels equal the reference, run on CPU by Triton's interpreter (TRITON_INTERPRET=1).

The interpreter is chosen when the kernels are defined, i.e. when
polyattn.core.backends.triton_kernels is first imported; other test modules
import polyattn without it, so the cases run in one subprocess with the
variable set before anything is imported. Sizes are small (the interpreter
runs every program instance in Python) but cover several blocks per axis,
ragged edges, a head dimension padded to the block, Nq != Nk, masks, causal
and dynamic divisors.
"""

from __future__ import annotations

import textwrap

import pytest
from triton_interpreter import interpreter_results_of

pytest.importorskip("triton", reason="triton is not installed: the fused-kernel backend cannot be tested")

_SCRIPT = textwrap.dedent(
    r"""
    import json, torch
    torch.set_num_threads(1)
    from polyattn.core.activations import get_activation
    from polyattn.core.backends import BACKENDS, BackendUnsupported, reference_attention, select_backend
    from polyattn.core.backends.triton_kernels import interpreter_active, triton_attention

    assert interpreter_active()
    B, H, D, DV = 1, 2, 8, 12
    CASES = [
        # (activation, Nq, Nk, mask, causal)
        ("x^3/sqrt(N)", 40, 40, None, False),
        ("x^3/sqrt(N)", 40, 40, "padding", True),
        ("x^3/N", 40, 33, "padding", False),
        ("x", 45, 40, None, True),
        ("x^2/7", 50, 21, None, True),
        ("relu/N", 40, 40, "padding", True),
        ("gelu", 33, 40, None, True),
        ("exp/sqrt(N)", 40, 40, None, False),
        ("tanh", 40, 40, "padding", False),
        ("sigmoid/N", 21, 40, None, False),
        ("elu", 40, 40, None, True),
    ]

    def run(fn, q, k, v, **kw):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v, **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out.backward(g.to(out.dtype))
        return [out, q.grad, k.grad, v.grad]

    def rel_errors(got, want):
        return [((x.double() - y).abs().max() / (y.abs().max() + 1e-30)).item() for x, y in zip(got, want)]

    results = {}
    for i, (spec, nq, nk, mask_kind, causal) in enumerate(CASES):
        act = get_activation(spec)
        g = torch.Generator().manual_seed(i)
        q = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, H, nk, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, H, nk, DV, generator=g, dtype=torch.float64)
        mask = None
        if mask_kind == "padding":
            mask = torch.rand(B, 1, 1, nk, generator=g) > 0.3
        kw = dict(attn_mask=mask, causal=causal)
        want = run(lambda *a, **kw: reference_attention(*a, act, **kw), q, k, v, **kw)
        got = run(lambda *a, **kw: triton_attention(*a, act, block_sizes=(32, 16), **kw),
                  q.float(), k.float(), v.float(), **kw)
        results[f"{spec} {nq}x{nk} mask={mask_kind} causal={causal}"] = rel_errors(got, want)

    # bf16 inputs: bf16 output, fp32 inside (the interpreter upcasts before each dot).
    g = torch.Generator().manual_seed(99)
    q, k, v = (torch.randn(B, H, 40, D, generator=g, dtype=torch.float64) for _ in range(3))
    act = get_activation("x^3/sqrt(N)")
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    want = run(lambda *a, **kw: reference_attention(*a, act, **kw), qb.double(), kb.double(), vb.double(),
               causal=True)
    got = run(lambda *a, **kw: triton_attention(*a, act, block_sizes=(32, 16), **kw), qb, kb, vb, causal=True)
    results["bf16"] = {"dtype": str(got[0].dtype), "errors": rel_errors(got, want)}

    # What the kernel does not do raises a clear error; auto never sends CPU tensors to it.
    errors = {}
    q32 = torch.randn(1, 2, 16, 8)
    for name, kw, spec in [
        ("bias", {"bias": torch.zeros(16, 16)}, "x^3"),
        ("full_mask", {"attn_mask": torch.ones(16, 16, dtype=torch.bool)}, "x^3"),
        ("softmax", {}, "softmax"),
        ("dropout", {"dropout_p": 0.1}, "x^3"),
    ]:
        try:
            triton_attention(q32, q32, q32, get_activation(spec), **kw)
            errors[name] = None
        except BackendUnsupported as e:
            errors[name] = str(e)
    results["unsupported"] = errors
    big = torch.empty(1, 4, 4096, 64, device="meta")
    results["auto_on_cpu"] = select_backend(big, big, "x^3/sqrt(N)").name

    q, k, v = (torch.randn(1, 1, 20, 8, requires_grad=True) for _ in range(3))
    out = triton_attention(q, k, v, get_activation("x^3"))
    try:
        torch.autograd.grad(out.sum(), q, create_graph=True)
        results["double_backward"] = None
    except RuntimeError as e:
        results["double_backward"] = str(e)

    # torch.compile(fullgraph=True) traces through the custom ops (fake implementations give the
    # shapes), then runs the kernels in the interpreter: one graph, no break, the reference's values
    # and gradients. aot_eager runs AOTAutograd's forward and backward graphs without inductor's
    # C++ compile, which the CPU interpreter gains nothing from.
    import polyattn

    def fn(q, k, v, attn_mask=None, causal=False):
        return polyattn.attention(q, k, v, "x^3/sqrt(N)", backend="triton", attn_mask=attn_mask, causal=causal)

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 24, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(1, 1, 1, 24, generator=g) > 0.3
    explained = torch._dynamo.explain(fn)(q.float(), k.float(), v.float(), attn_mask=mask, causal=True)
    act = get_activation("x^3/sqrt(N)")
    want = run(lambda *a, **kw: reference_attention(*a, act, **kw), q, k, v, attn_mask=mask, causal=True)
    got = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), q.float(), k.float(), v.float(),
              attn_mask=mask, causal=True)
    results["compile"] = {
        "graph_breaks": explained.graph_break_count,
        "graphs": explained.graph_count,
        "op_in_graph": "polyattn.triton_attention" in explained.graphs[0].code,
        "errors": rel_errors(got, want),
    }
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreter_results_of(_SCRIPT)


def test_kernels_equal_reference_in_values_and_gradients(interpreter_results):
    cases = {
        k: v
        for k, v in interpreter_results.items()
        if k not in ("bf16", "unsupported", "auto_on_cpu", "double_backward", "compile")
    }
    assert len(cases) == 11
    bad = {k: v for k, v in cases.items() if max(v) > 1e-5}
    assert not bad, f"fp32 kernels differ from the reference beyond 1e-5 (out, dq, dk, dv): {bad}"


def test_bf16_inputs_compute_in_fp32_and_return_bf16(interpreter_results):
    r = interpreter_results["bf16"]
    assert r["dtype"] == "torch.bfloat16"
    assert max(r["errors"]) < 2e-2, r["errors"]  # bf16 output rounding (2^-8) dominates


def test_unsupported_calls_raise_clear_errors(interpreter_results):
    errors = interpreter_results["unsupported"]
    assert "bias" in errors["bias"]
    assert "key-padding" in errors["full_mask"]
    assert "softmax" in errors["softmax"]
    assert "dropout" in errors["dropout"]


def test_auto_does_not_run_the_interpreter(interpreter_results):
    assert interpreter_results["auto_on_cpu"] != "triton"


def test_not_twice_differentiable_is_a_clear_error(interpreter_results):
    assert "not twice differentiable" in interpreter_results["double_backward"]


def test_torch_compile_fullgraph_traces_through_the_custom_ops(interpreter_results):
    """Run for real under TRITON_INTERPRET=1 (not only a fake-tensor trace): dynamo sees the backend
    as the polyattn::triton_attention op (no graph break), AOTAutograd traces its backward op, and
    the compiled forward and backward equal the reference."""
    r = interpreter_results["compile"]
    assert r["graph_breaks"] == 0 and r["graphs"] == 1, r
    assert r["op_in_graph"]
    assert max(r["errors"]) < 1e-5, r["errors"]
