"""timm models patched by polyattn: softmax equivalence, a float64 reference, training, diagnostics, configs.

The reference forwards below are written from timm's definitions, independently
of polyattn.integrations.timm: einsums in float64, the activation written out,
masked entries zeroed after phi and N counted per query row.
"""

from __future__ import annotations

import copy
import functools
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm", reason="timm is not installed: pip install 'polyattn[timm]' to test it")

from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.models.cait import ClassAttn, TalkingHeadAttn  # noqa: E402
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention  # noqa: E402
from timm.models.xcit import XCA  # noqa: E402

import polyattn  # noqa: E402
from polyattn.integrations.timm import (  # noqa: E402
    PolyClassAttn,
    PolyTimmAttention,
    PolyWindowAttention,
    PolyXCA,
    create_timm_model,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "timm"

# Small images keep the four paper families fast. Swin: patch 4 on 32x32 gives an
# 8x8 grid; window 4 then has shifted (masked) windows in the first two stages.
MODELS = {
    "vit_tiny_patch16_224": {"img_size": 32},
    "deit_small_patch16_224": {"img_size": 32, "depth": 4},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4},
    "xcit_nano_12_p16_224": {"img_size": 32, "depth": 4},
}
POLY_CLASSES = (PolyTimmAttention, PolyWindowAttention, PolyXCA, PolyClassAttn)
ORIGINAL_CLASSES = (TimmAttention, WindowAttention, XCA, ClassAttn)


@functools.cache
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **MODELS[name]).eval()


def fresh(name: str) -> nn.Module:
    """An unpatched eval-mode copy of the small model (built once per session)."""
    return copy.deepcopy(_built(name))


def images(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = MODELS[name]["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ORIGINAL_CLASSES)]


# --------------------------------------------------------------------------- #
# float64 reference
# --------------------------------------------------------------------------- #
def phi(s: torch.Tensor, spec: str, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """A = phi(S) row by row; masked entries are 0 and N counts the allowed keys of each row."""
    if allowed is None:
        allowed = torch.ones_like(s, dtype=torch.bool)
    n = allowed.sum(-1, keepdim=True).to(s.dtype)
    s = torch.where(allowed, s, torch.zeros_like(s))
    if spec == "softmax":
        e = torch.where(allowed, torch.exp(s - s.amax(-1, keepdim=True)), torch.zeros_like(s))
        a = e / e.sum(-1, keepdim=True)
    elif spec == "x^3/sqrt(N)":
        a = s**3 / n.sqrt()
    elif spec == "x/14":
        a = s / 14.0
    else:
        raise AssertionError(spec)
    return torch.where(allowed, a, torch.zeros_like(a))


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    y = torch.einsum("...i,oi->...o", x, layer.weight)
    return y if layer.bias is None else y + layer.bias


def ref_vit_attention(m, spec, x, attn_mask=None, is_causal=False):
    assert attn_mask is None and not is_causal
    b, n, _ = x.shape
    h, hd = m.num_heads, m.head_dim
    q, k, v = linear(x, m.qkv).view(b, n, 3, h, hd).unbind(2)  # (B, N, H, hd)
    q, k = m.q_norm(q.transpose(1, 2)), m.k_norm(k.transpose(1, 2))
    s = torch.einsum("bhid,bhjd->bhij", q, k) / hd**0.5
    out = torch.einsum("bhij,bjhd->bihd", phi(s, spec), v).reshape(b, n, h * hd)
    return linear(m.norm(out), m.proj)


def ref_window_attention(m, spec, x, mask=None):
    b_, n, _ = x.shape
    h = m.num_heads
    hd = m.qkv.out_features // 3 // h
    q, k, v = linear(x, m.qkv).view(b_, n, 3, h, hd).unbind(2)
    bias = m.relative_position_bias_table[m.relative_position_index].permute(2, 0, 1)  # (H, N, N)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / hd**0.5 + bias
    allowed = None
    if mask is not None:  # Swin's 0 / -100 mask per window; image-major order of windows
        windows = torch.arange(b_) % mask.shape[0]
        allowed = (mask == 0)[windows].unsqueeze(1).expand(b_, h, n, n)
    out = torch.einsum("bhij,bjhd->bihd", phi(s, spec, allowed), v).reshape(b_, n, h * hd)
    return linear(out, m.proj)


def ref_xca(m, spec, x):
    b, n, c = x.shape
    h = m.num_heads
    q, k, v = linear(x, m.qkv).view(b, n, 3, h, c // h).unbind(2)  # (B, N, H, d_h)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)  # L2 over the tokens
    k = k / k.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = torch.einsum("bnhc,bnhe->bhce", q, k) * m.temperature  # (B, H, d_h, d_h): N = d_h keys
    out = torch.einsum("bhce,bnhe->bnhc", phi(s, spec), v).reshape(b, n, c)
    return linear(out, m.proj)


def ref_class_attn(m, spec, x):
    b, n, c = x.shape
    h = m.num_heads
    hd = c // h
    q = linear(x[:, :1], m.q).view(b, 1, h, hd)
    k, v = linear(x, m.k).view(b, n, h, hd), linear(x, m.v).view(b, n, h, hd)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / hd**0.5
    out = torch.einsum("bhij,bjhd->bihd", phi(s, spec), v).reshape(b, 1, c)
    return linear(out, m.proj)


REFERENCE = {
    PolyTimmAttention: ref_vit_attention,
    PolyWindowAttention: ref_window_attention,
    PolyXCA: ref_xca,
    PolyClassAttn: ref_class_attn,
}


def reference_model(patched: nn.Module, spec: str) -> nn.Module:
    """A float64 copy of a patched model whose attention modules run the reference above."""
    ref = copy.deepcopy(patched).double()
    n = 0
    for m in ref.modules():
        fn = REFERENCE.get(type(m))
        if fn is not None:
            m.forward = functools.partial(fn, m, spec)
            n += 1
    assert n > 0
    return ref


# --------------------------------------------------------------------------- #
# softmax equivalence, restore, state dict
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", MODELS)
def test_softmax_through_polyattn_reproduces_timm_and_softmax_restores_it(name):
    model = fresh(name)
    x = images(name)
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    n_attn = len(attention_modules(model))

    assert polyattn.patch(model, "softmax", native_softmax=False) == n_attn
    assert all(isinstance(m, POLY_CLASSES) for m in attention_modules(model))
    with torch.no_grad():
        got = model(x)
    assert (got - expected).abs().max().item() <= 1e-5

    assert polyattn.patch(model, "x^3/sqrt(N)") == n_attn
    with torch.no_grad():
        assert not torch.allclose(model(x), expected, atol=1e-3)

    assert polyattn.patch(model, "softmax") == n_attn
    assert all(type(m) in ORIGINAL_CLASSES for m in attention_modules(model))
    assert not any(hasattr(m, "attention_observers") for m in attention_modules(model))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spec", ["x^3/sqrt(N)", "x/14"])
def test_patched_model_matches_float64_reference(name, spec):
    model = fresh(name)
    polyattn.patch(model, spec)
    ref = reference_model(model, spec)
    x = images(name)
    with torch.no_grad():
        want = ref(x.double())
        got32 = model(x)
        got64 = copy.deepcopy(model).double()(x.double())
    scale = want.abs().max().item()
    assert scale > 0 and torch.isfinite(want).all()
    assert (got64 - want).abs().max().item() <= 1e-10 * scale
    assert (got32.double() - want).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("name", MODELS)
def test_patched_models_train(name):
    model = fresh(name).train()
    polyattn.patch(model, "x^3/sqrt(N)")
    out = model(images(name, batch=3))
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the attention's own parameters learn: qkv, and Swin's bias table / XCA's temperature
    for n, g in grads.items():
        if n.endswith(("qkv.weight", "relative_position_bias_table", "temperature")):
            assert g.abs().sum() > 0, n


@pytest.mark.parametrize(
    ("name", "extra"),
    [("xcit_nano_12_p16_224", {"depth": 1}), ("vit_tiny_patch16_224", {"depth": 1, "qk_norm": True})],
)
def test_bf16_autocast_with_fp32_normalised_queries(name, extra):
    # Under autocast the L2 / layer norms of q, k return fp32 while v is bf16.
    model = create_timm_model(name, "x^3/sqrt(N)", num_classes=3, img_size=32, **extra)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(name))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_state_dict_loads_across_activations_and_patched_models_pickle():
    name = "swin_tiny_patch4_window7_224"
    a, b = fresh(name), fresh(name)
    polyattn.patch(a, "x^3/14")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01)
    b.load_state_dict(a.state_dict())  # patched -> unpatched: same keys, strict
    polyattn.patch(b, "x^3/14")
    x = images(name)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False)
    assert all(type(m) is PolyWindowAttention and m.activation.spec == "x^3/14" for m in attention_modules(c))
    with torch.no_grad():
        assert torch.equal(a(x), c(x))


def test_repatching_switches_activation_and_counts():
    model = fresh("xcit_nano_12_p16_224")
    n = len(attention_modules(model))
    assert n == 4 + 2  # 4 XCA blocks (depth override) + 2 class-attention blocks
    for spec in ("x^3", "x/14", "relu/sqrt(N)"):
        assert polyattn.patch(model, spec) == n
        assert {m.activation.spec for m in attention_modules(model)} == {polyattn.get_activation(spec).spec}
    assert "activation='relu/sqrt(N)'" in repr(model)


# --------------------------------------------------------------------------- #
# per-class semantics
# --------------------------------------------------------------------------- #
def test_swin_shifted_window_mask_zeroes_cross_region_entries_exactly():
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=16, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2)
    mask = block.attn_mask  # (nW, N, N), 0 / -100
    assert mask is not None and (mask != 0).any()
    attn = block.attn
    polyattn.patch(attn, "x^3/sqrt(N)")
    seen = []
    attn.attention_observers.append(lambda mod, q, k, m, bias, causal, scale: seen.append((m, bias)))

    nw, n = mask.shape[0], mask.shape[1]
    x = torch.randn(2 * nw, n, 16, requires_grad=True)
    out = attn(x, mask=mask)
    m, bias = seen[0]
    assert m.dtype == torch.bool and m.shape == (2 * nw, 1, n, n)
    assert torch.equal(m[nw:, 0], mask == 0) and bias.shape == (1, 2, n, n)

    # Output of query i in window w does not depend at all on a key j of another region.
    w = int((mask != 0).flatten(1).any(1).nonzero()[0])
    i, j = [int(t) for t in (mask[w] != 0).nonzero()[0]]
    (g,) = torch.autograd.grad(out[w, i].sum(), x)
    assert torch.all(g[w, j] == 0)
    allowed_j = int((mask[w, i] == 0).nonzero()[0])
    assert g[w, allowed_j].abs().sum() > 0


def test_xca_counts_channels_per_head_as_n():
    torch.manual_seed(0)
    xca = XCA(dim=32, num_heads=4)  # d_h = 8 channels per head
    x = torch.randn(2, 10, 32)  # 10 tokens
    polyattn.patch(xca, "x/N")
    seen = []
    xca.attention_observers.append(lambda mod, q, k, *rest: seen.append(q.shape))
    out = xca(x)
    assert seen[0] == (2, 4, 8, 10)  # (B, heads, d_h, tokens): rows are channels
    polyattn.patch(xca, "x")
    # x/N with N = d_h = 8 (not the 10 tokens) is x divided by 8: linear in phi, so the output follows
    torch.testing.assert_close(out, (xca(x) - xca.proj.bias) / 8 + xca.proj.bias)


def test_timm_attention_masks_bool_and_additive():
    torch.manual_seed(0)
    attn = TimmAttention(dim=16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 6, 16)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[..., 4:] = False  # the last two tokens are padding
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~keep, float("-inf"))
    with torch.no_grad():
        expected = attn(x, attn_mask=keep)
        polyattn.patch(attn, "softmax", native_softmax=False)
        torch.testing.assert_close(attn(x, attn_mask=keep), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(attn(x, attn_mask=additive), expected, atol=1e-6, rtol=0)
        polyattn.patch(attn, "x^3/sqrt(N)")
        a, b = attn(x, attn_mask=keep), attn(x, attn_mask=additive)
        torch.testing.assert_close(a, b)
        # padding tokens have no influence: change them, the other outputs stay
        x2 = x.clone()
        x2[:, 4:] = 100.0
        torch.testing.assert_close(attn(x2, attn_mask=keep)[:, :4], a[:, :4])
        causal = attn(x, is_causal=True)
        x3 = x.clone()
        x3[:, 3:] = 5.0
        torch.testing.assert_close(attn(x3, is_causal=True)[:, :3], causal[:, :3])


def test_unsupported_attention_is_named_and_subclasses_are_left_alone():
    model = nn.Sequential(TalkingHeadAttn(dim=16, num_heads=2), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"TalkingHeadAttn \(x1\).*Supported:.*timm\.layers\.attention\.Attention"):
        polyattn.patch(model, "x^3/14")

    # CaiT: class attention is supported, talking-heads attention is not: a partial switch warns
    cait_like = nn.Sequential(TalkingHeadAttn(dim=16, num_heads=2), ClassAttn(dim=16, num_heads=2))
    with pytest.warns(UserWarning, match=r"set 1 attention modules to 'x\^3/14'.*TalkingHeadAttn \(x1\)"):
        assert polyattn.patch(cait_like, "x^3/14") == 1

    class MyAttention(TimmAttention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="MyAttention"):
        polyattn.patch(nn.Sequential(MyAttention(dim=16, num_heads=2)), "x")


# --------------------------------------------------------------------------- #
# diagnostics, create_model, trainer, CLI
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "xcit_nano_12_p16_224"])
def test_norm_recorder_records_patched_timm_models(name):
    model = fresh(name)
    polyattn.patch(model, "softmax", native_softmax=False)
    heads = sum(m.num_heads for m in attention_modules(model))
    with polyattn.NormRecorder(model, every=1) as rec:
        rec.set_step(0)
        with torch.no_grad():
            model(images(name))
        rows = rec.pop_rows()
    assert len(rows) == heads
    assert all(r["fro"] > 0 and torch.isfinite(torch.tensor([r["fro"], r["jac_fro"]])).all() for r in rows)
    polyattn.patch(model, "softmax")  # timm's own forward again: nothing left to observe
    with pytest.raises(ValueError, match="no attention module"):
        polyattn.NormRecorder(model)


def test_create_model_dispatches_timm_names():
    model = polyattn.create_model(
        "timm:vit_tiny_patch16_224", activation="x/14", img_size=32, num_classes=3, in_chans=1, depth=2
    )
    mods = attention_modules(model)
    assert len(mods) == 2 and all(type(m) is PolyTimmAttention and m.activation.spec == "x/14" for m in mods)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    soft = create_timm_model("vit_tiny_patch16_224", img_size=32, depth=1)
    assert type(attention_modules(soft)[0]) is PolyTimmAttention  # softmax too, observable

    with pytest.raises(ValueError, match="unknown timm model 'vit_tinyy'.*vit_tiny_patch16_224"):
        create_timm_model("vit_tinyy")
    with pytest.raises(ValueError, match="pretrained"):
        create_timm_model("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="timm could not build 'vit_tiny_patch16_224'"):
        create_timm_model("vit_tiny_patch16_224", img_size=32, depth=1, no_such_option=3)
    with pytest.raises(ValueError, match="has no attention module polyattn can patch"):
        create_timm_model("resnet10t", num_classes=3)


def test_polyattn_train_cli_trains_a_timm_model_with_norms(tmp_path):
    from polyattn.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--no-progress",
            "--out",
            str(out),
            "--set",
            "model.name=timm:swin_tiny_patch4_window7_224",
            "model.activation=x^3/sqrt(N)",
            "model.overrides={window_size: 4, depths: [2, 2], num_heads: [2, 4], embed_dim: 32}",
            "data={name: synthetic, num_train: 8, num_val: 4, num_classes: 3, image_size: 32, channels: 3}",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.log_every=1",
            "diagnostics.every=1",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and not summary["diverged"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    norms = [r for r in rows if r["kind"] == "norms"]
    assert {r["name"] for r in norms} == {f"layers.{s}.blocks.{b}.attn" for s in (0, 1) for b in (0, 1)}
    assert (out / "checkpoints" / "last.pt").is_file()


# --------------------------------------------------------------------------- #
# the Table 2 configs
# --------------------------------------------------------------------------- #
TABLE2 = CONFIG_DIR / "table2.yaml"
PAPER_MODELS = {
    "swin_small": ("timm:swin_small_patch4_window7_224", 24),
    "swin_base": ("timm:swin_base_patch4_window7_224", 24),
    "xcit_small": ("timm:xcit_small_12_p16_224", 12 + 2),
    "xcit_medium": ("timm:xcit_medium_24_p16_224", 24 + 2),
}
ACTIVATIONS = {"softmax": "softmax", "x3_div14": "x^3/14", "x3": "x^3", "x_div14": "x/14", "x": "x"}


def test_table2_timm_configs_are_all_there_and_mean_their_names():
    from polyattn.training import load_config
    from polyattn.training.config import grid_points

    points = list(grid_points(TABLE2))
    assert len(points) == len(PAPER_MODELS) * len(ACTIVATIONS)
    for point in points:
        stem, act = next((m, a) for m in PAPER_MODELS for a in ACTIVATIONS if point == f"{m}_{a}")
        cfg = load_config(TABLE2, ["data.root=/data/imagenet"], point=point)
        assert cfg["description"] and cfg["data"]["name"] == "imagenet"
        assert cfg["model"]["name"] == PAPER_MODELS[stem][0]
        assert cfg["model"]["activation"] == ACTIVATIONS[act]
    for base in sorted((CONFIG_DIR / "base").glob("*.yaml")):
        assert load_config(base, [])["model"]["name"].startswith("timm:")


@pytest.mark.filterwarnings("error")  # every attention of these models is switched
@pytest.mark.parametrize("stem", PAPER_MODELS)
def test_paper_models_have_the_paper_attention(stem):
    name, expected = PAPER_MODELS[stem]
    with torch.device("meta"):  # full size, no memory, no init cost
        model = create_timm_model(name.removeprefix("timm:"), activation="x^3/14")
    mods = [m for m in model.modules() if isinstance(m, POLY_CLASSES)]
    assert len(mods) == expected
    if stem.startswith("swin"):
        assert {m.window_size for m in mods} == {(7, 7)}
        assert {m.qkv.out_features // 3 // m.num_heads for m in mods} == {32}  # head dim 32, as in the paper


@pytest.mark.parametrize("config", ["swin_small_x3_div14", "xcit_small_x_div14"])
def test_timm_config_trains_for_two_steps_on_generated_data(config, tmp_path):
    from polyattn.training import load_config, train

    narrow = (
        "{embed_dim: 32, depths: [2, 2], num_heads: [2, 4], window_size: 4, drop_path_rate: 0.3}"
        if config.startswith("swin")
        else "{embed_dim: 32, depth: 2, num_heads: 4, drop_path_rate: 0.05}"
    )
    cfg = load_config(
        TABLE2,
        point=config,
        overrides=[
            f"model.overrides={narrow}",
            "data={name: synthetic, num_train: 8, num_val: 4, num_classes: 3, image_size: 32, channels: 3}",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.log_every=1",
            "train.mixup=0.0",
            "train.cutmix=0.0",
        ],
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and not summary["diverged"]
