"""The packed (varlen) Triton kernel equals polyattn.attention per document, run by Triton's CPU interpreter.

As in tests/test_triton.py the interpreter must be chosen before the kernels are defined, so the cases
run in one subprocess with TRITON_INTERPRET=1; the sizes are tiny (the interpreter runs every program
in Python) but hold an empty document, a one-token one, documents over several 16-token blocks,
grouped-query heads, causal and not, and queries packed differently from the keys.
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
    import polyattn
    from polyattn.core.backends import BackendUnsupported
    from polyattn.core.backends.triton_kernels import interpreter_active

    assert interpreter_active()
    H, HK, D, DV = 4, 2, 8, 6

    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    def oracle(q, k, v, lens_q, lens_k, spec, causal):
        outs, qa, ka = [], 0, 0
        for n, m in zip(lens_q, lens_k):
            qd = q[qa:qa + n].transpose(0, 1)[None]
            kd = k[ka:ka + m].repeat_interleave(H // HK, 1).transpose(0, 1)[None]
            vd = v[ka:ka + m].repeat_interleave(H // HK, 1).transpose(0, 1)[None]
            if n and m:
                outs.append(polyattn.attention(qd, kd, vd, spec, causal=causal, backend="reference")[0].transpose(0, 1))
            else:
                outs.append(torch.zeros(n, H, DV, dtype=q.dtype) + 0 * (qd.sum() + kd.sum() + vd.sum()))
            qa, ka = qa + n, ka + m
        return torch.cat(outs)

    def run(fn, q, k, v):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out.backward(g.to(out.dtype))
        return [out, q.grad, k.grad, v.grad]

    def rel_errors(got, want):
        return [((x.double() - y).abs().max() / (y.abs().max() + 1e-30)).item() for x, y in zip(got, want)]

    CASES = [
        # (activation, query lengths, key lengths, causal)
        ("x^3/sqrt(N)", [5, 0, 1, 37], None, True),
        ("x^2/N", [5, 0, 1, 37], None, False),
        ("relu/N", [3, 20, 0, 2], [19, 4, 3, 0], False),
        ("x/14", [20, 1], None, True),
    ]
    results = {}
    for i, (spec, lq, lk, causal) in enumerate(CASES):
        lk = lq if lk is None else lk
        g = torch.Generator().manual_seed(i)
        q = torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64)
        k = torch.randn(sum(lk), HK, D, generator=g, dtype=torch.float64)
        v = torch.randn(sum(lk), HK, DV, generator=g, dtype=torch.float64)
        want = run(lambda q, k, v: oracle(q, k, v, lq, lk, spec, causal), q, k, v)
        got = run(lambda q, k, v: polyattn.attention_varlen(
            q, k, v, cu(lq), cu(lk), activation=spec, causal=causal, backend="triton"), q.float(), k.float(), v.float())
        results[f"{spec} {lq}/{lk} causal={causal}"] = rel_errors(got, want)

    q = torch.randn(10, H, D)
    k = torch.randn(10, HK, D)
    errors = {}
    for spec in ("softmax", "sigmoid-log(N)"):
        try:
            polyattn.attention_varlen(q, k, k, cu([4, 6]), activation=spec, backend="triton")
            errors[spec] = None
        except BackendUnsupported as e:
            errors[spec] = str(e)
    results["unsupported"] = errors
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreter_results_of(_SCRIPT)


def test_varlen_kernel_equals_attention_per_document(interpreter_results):
    cases = {k: v for k, v in interpreter_results.items() if k != "unsupported"}
    assert len(cases) == 4
    bad = {k: v for k, v in cases.items() if max(v) > 1e-5}
    assert not bad, f"the fp32 varlen kernel differs from attention per document beyond 1e-5 (out, dq, dk, dv): {bad}"


def test_varlen_kernel_refuses_what_it_cannot_compute(interpreter_results):
    errors = interpreter_results["unsupported"]
    assert "softmax" in errors["softmax"]
    assert "bias" in errors["sigmoid-log(N)"]
