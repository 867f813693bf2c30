"""Reliability of the core: devices, degenerate sizes, activation limits, double backward, meta/fake
tensors and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import polyattn
from polyattn import PolyAttention, attention, get_activation
from polyattn.core.activations import MAX_DIVISOR, MAX_POWER, MIN_DIVISOR, Activation
from polyattn.core.backends import select_backend
from polyattn.integrations.patch import additive_mask_to_bool


def _qkv(b=2, h=2, n=16, d=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).to(device) for _ in range(3)]


# --- 1. devices ---------------------------------------------------------------------------------
def test_meta_query_with_cpu_keys_raises_naming_devices():
    q = torch.empty(1, 2, 8, 4, device="meta")
    k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"one device.*q\.device: meta, k\.device: cpu, v\.device: cpu"):
        attention(q, k, v, "x^3/sqrt(N)")


@pytest.mark.parametrize("which", ["attn_mask", "bias"])
def test_mask_or_bias_on_another_device_raises(which):
    q, k, v = _qkv(1, 1, 8, 4)
    other = {
        "attn_mask": torch.ones(8, 8, dtype=torch.bool, device="meta"),
        "bias": torch.zeros(8, 8, dtype=torch.float64, device="meta"),
    }[which]
    with pytest.raises(ValueError, match=rf"q\.device: cpu.*{which}\.device: meta"):
        attention(q, k, v, **{which: other})


@pytest.mark.parametrize(
    ("spec", "backend"),
    [
        ("softmax", "reference"),
        ("softmax", "sdpa"),
        ("softmax", "chunked"),
        ("softmax", "auto"),
        ("x^3/sqrt(N)", "reference"),
        ("x^3/sqrt(N)", "chunked"),
        ("x^3/sqrt(N)", "linear"),
        ("x^3/sqrt(N)", "auto"),
    ],
)
def test_all_meta_inputs_propagate_shapes(spec, backend):
    # N = 300 keeps auto off the tiny-problem reference path; the padding mask takes chunked's mask summary.
    q = torch.empty(2, 3, 300, 8, device="meta")
    v = torch.empty(2, 3, 300, 5, device="meta")
    mask = torch.empty(2, 1, 1, 300, dtype=torch.bool, device="meta")
    out = attention(q, q, v, spec, attn_mask=mask, causal=True, backend=backend)
    assert out.device.type == "meta" and out.shape == (2, 3, 300, 5)


# --- 2. degenerate sizes ----------------------------------------------------------------------------
def test_zero_head_dim_is_a_clear_value_error():
    q = torch.randn(1, 1, 4, 0)
    with pytest.raises(ValueError, match=r"head dimension d must be >= 1, got q \(1, 1, 4, 0\)"):
        attention(q, q, torch.randn(1, 1, 4, 3))


@pytest.mark.parametrize(
    ("dim", "heads", "message"),
    [
        (0, 1, "dim must be >= 1, got 0"),
        (-8, 2, "dim must be >= 1, got -8"),
        (8, 0, "num_heads must be >= 1, got 0"),
        (8, -2, "num_heads must be >= 1, got -2"),
    ],
)
def test_polyattention_rejects_nonpositive_sizes(dim, heads, message):
    with pytest.raises(ValueError, match=message):
        PolyAttention(dim, heads)


def test_polyattention_rejects_non_integer_sizes():
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        PolyAttention(8.0, 2)
    with pytest.raises(TypeError, match="num_heads must be an int, got bool"):
        PolyAttention(8, True)


@pytest.mark.parametrize("backend", ["reference", "chunked", "linear"])
@pytest.mark.parametrize("shapes", [((0, 2, 4, 3), (0, 2, 5, 3)), ((1, 1, 4, 3), (1, 1, 5, 0))])
def test_empty_batch_and_empty_values(backend, shapes):
    qk_shape, v_shape = shapes
    q = torch.randn(qk_shape, requires_grad=True)
    k = torch.randn(*qk_shape[:2], 5, qk_shape[-1], requires_grad=True)
    v = torch.randn(v_shape, requires_grad=True)
    out = attention(q, k, v, "x^3/sqrt(N)", backend=backend)
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


# --- 3. activation limits ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["x^17", "x^1000", "x^1000/sqrt(N)"])
def test_powers_above_the_maximum_are_rejected(spec):
    with pytest.raises(ValueError, match=rf"above the maximum {MAX_POWER}.*overflows fp32.*Use a power in 1\.\.16"):
        get_activation(spec)


@pytest.mark.parametrize(
    ("spec", "effect"),
    [
        ("x^3/1e-300", "overflow"),
        ("x^3/1e-7", "overflow"),
        ("relu/1e300", "underflow"),
        ("x/2e6", "underflow"),
    ],
)
def test_divisors_outside_the_range_are_rejected(spec, effect):
    with pytest.raises(ValueError, match=rf"outside \[1e-06, 1e\+06\].*{effect}.*Use a divisor in that range"):
        get_activation(spec)


def test_limits_themselves_are_accepted_and_stay_finite():
    assert get_activation(f"x^{MAX_POWER}").power == MAX_POWER
    assert get_activation(f"x^3/{MIN_DIVISOR:g}").constant == MIN_DIVISOR
    assert get_activation(f"x^3/{MAX_DIVISOR:g}").constant == MAX_DIVISOR
    # Scores of 40 (q.k / sqrt(16) = 4 * 10; the large end of what models show) under both limits, in fp32.
    q = torch.full((1, 1, 4, 16), 10.0**0.5)
    out = attention(q, q, torch.ones(1, 1, 4, 2), f"x^{MAX_POWER}/{MIN_DIVISOR:g}", backend="chunked")
    assert torch.isfinite(out).all()


def test_activation_built_directly_gets_the_same_limits():
    with pytest.raises(ValueError, match="power must be in 1..16"):
        Activation("power", 1000)
    with pytest.raises(ValueError, match="constant divisor must be in"):
        Activation("power", 3, "const", 1e-300)


@pytest.mark.parametrize(
    "spec",
    [
        "x^3/14",
        "x/16",
        "x^2/14",
        "relu/N",
        "x^3/sqrt(N)",
        "x/0.5",
        "x/14",
        "x^3/64",
        "x^3/2",
        "x^4/N",
        "gelu/4",
        "sigmoid/sqrt(N)",
        "x^3/14.0",
        "x^2/0.5",
    ],
)
def test_specs_used_in_the_repo_still_parse(spec):
    assert get_activation(get_activation(spec).spec) == get_activation(spec)


# --- 4. softmax double backward ----------------------------------------------------------------------
def test_softmax_double_backward_through_auto_gives_the_reference_hint():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 256, 8))
    assert select_backend(q, k, "softmax").name == "sdpa"
    out = attention(q, k, v, "softmax")
    with pytest.raises(RuntimeError, match=r"'sdpa'.*not twice differentiable.*backend='reference'"):
        (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        g.square().sum().backward()


def test_softmax_double_backward_works_where_sdpa_takes_its_math_kernel():
    # A bias that requires grad sends SDPA to its (twice differentiable) math kernel: no refusal there.
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 256, 8))
    bias = torch.randn(256, 256, dtype=torch.float64, requires_grad=True)
    second = []
    for backend in ("sdpa", "reference"):
        out = attention(q, k, v, "softmax", bias=bias, backend=backend)
        (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        second.append(torch.autograd.grad(g.square().sum(), (q, k, v, bias)))
    for a, b in zip(*second, strict=True):
        torch.testing.assert_close(a, b)


def test_sdpa_guard_leaves_first_order_results_unchanged():
    x = _qkv(1, 2, 256, 8)[0].requires_grad_()
    out = attention(x, x, x, "softmax", backend="sdpa")  # q is k is v
    (g,) = torch.autograd.grad(out.square().sum(), x)
    ref = F.scaled_dot_product_attention(x, x, x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.equal(out, ref) and torch.equal(g, g_ref)
    out.mul_(2)  # no custom-Function view reaches the caller


# --- 5. meta and fake tensors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "how"),
    [
        ("swin_tiny_patch4_window7_224", {"img_size": 56, "window_size": 7}, "device"),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, "to"),
    ],
)
def test_patched_timm_model_forward_on_meta(name, kwargs, how):
    timm = pytest.importorskip("timm")
    if how == "device":
        model = timm.create_model(name, pretrained=False, num_classes=10, device="meta", **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).to("meta")
    assert polyattn.patch(model, "x^3/sqrt(N)") == 12
    # Batch 4: Swin's 4 x 4 windows x 3 heads of 49 x 49 scores are past auto's tiny-problem size,
    # so its shifted-window mask goes through chunked's (data-dependent) mask summary.
    out = model(torch.empty(4, 3, kwargs["img_size"], kwargs["img_size"], device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 10)


def test_additive_mask_on_meta_keeps_mask_and_bias():
    mask = torch.empty(4, 4, device="meta")
    allowed, bias = additive_mask_to_bool(mask)
    assert allowed.dtype == torch.bool and allowed.device.type == "meta" and bias.shape == (4, 4)


def test_fake_tensors_take_the_general_path():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 2, 300, 8)
        mask = torch.empty(2, 1, 1, 300, dtype=torch.bool)
        float_mask = torch.empty(300, 300)
        out = attention(q, q, q, "x^3/sqrt(N)", attn_mask=mask, backend="chunked")
        allowed, bias = additive_mask_to_bool(float_mask)
    assert out.shape == (2, 2, 300, 8) and allowed.shape == bias.shape == (300, 300)


# --- 6. torch.compile ----------------------------------------------------------------------------------
def _compile_cases():
    g = torch.Generator().manual_seed(1)
    pad = torch.rand(2, 1, 1, 16, generator=g) > 0.3
    full = torch.rand(1, 2, 16, 16, generator=g) > 0.3
    bias = torch.randn(16, 16, generator=g, dtype=torch.float64)
    return [
        ("softmax", "reference", {"attn_mask": full}),
        ("softmax", "sdpa", {"attn_mask": full, "causal": True}),
        ("softmax", "chunked", {"attn_mask": full, "bias": bias}),
        ("x^3/sqrt(N)", "chunked", {"attn_mask": pad, "causal": True}),
        ("x^3/sqrt(N)", "linear", {"attn_mask": pad}),
        ("x^3/sqrt(N)", "auto", {}),
    ]


def _fwd_bwd(fn, q, k, v):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.square().sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _check_compiled(spec, backend, kwargs, compiler, **compile_kwargs):
    def fn(q, k, v):
        return attention(q, k, v, spec, backend=backend, **kwargs)

    torch._dynamo.reset()
    q, k, v = _qkv()
    compiled = torch.compile(fn, fullgraph=True, backend=compiler, **compile_kwargs)
    for got, want in zip(_fwd_bwd(compiled, q, k, v), _fwd_bwd(fn, q, k, v), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _case_id(x: object) -> str:
    return "-".join(x) or "plain" if isinstance(x, dict) else str(x)


@pytest.mark.parametrize(("spec", "backend", "kwargs"), _compile_cases(), ids=_case_id)
def test_fullgraph_compile_forward_and_backward(spec, backend, kwargs):
    _check_compiled(spec, backend, kwargs, "aot_eager")


@pytest.mark.parametrize(("spec", "backend"), [("x^2", "linear"), ("x^3/sqrt(N)", "auto")])
def test_fullgraph_compile_with_dynamic_shapes(spec, backend):
    # Symbolic N and d reach the cost model and linear's feature tables.
    def fn(q):
        return attention(q, q, q, spec, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for n, d in [(16, 8), (24, 4)]:
        q = torch.randn(1, 2, n, d)
        torch.testing.assert_close(compiled(q), fn(q))


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "backend", "kwargs"), _compile_cases(), ids=_case_id)
def test_inductor_compile_forward_and_backward(spec, backend, kwargs):
    _check_compiled(spec, backend, kwargs, "inductor")


def _graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    return explained.graph_break_count


def test_polyattn_vit_compiles_without_graph_breaks():
    model = polyattn.create_model("vit_micro", "x^3/sqrt(N)", img_size=32, patch_size=8, num_classes=10, depth=2).eval()
    assert _graph_breaks(model, torch.randn(2, 3, 32, 32)) == 0


def test_patched_timm_vit_compiles_without_graph_breaks():
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2
    ).eval()
    polyattn.patch(model, "x^3/sqrt(N)")
    assert _graph_breaks(model, torch.randn(2, 3, 32, 32)) == 0
    # The attention module alone, fullgraph, with an additive float mask (skipped checks of its values).
    attn = model.blocks[0].attn
    x, mask = torch.randn(2, 17, 192), torch.zeros(17, 17)
    mask[:, -3:] = float("-inf")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: attn(x, attn_mask=mask), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), attn(x, attn_mask=mask))
