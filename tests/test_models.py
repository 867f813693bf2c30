"""The model registry and the PolyAttention ViT."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import polyattn
from polyattn.core.backends.reference import attention_weights
from polyattn.models import VIT_SHAPES, ViT, create_model, list_models, register_model, resize_pos_embed


def small_vit(activation: str = "softmax", **kw) -> ViT:
    args = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10)
    args.update(kw)
    return create_model("vit_micro", activation=activation, **args)


def test_registry_lists_every_vit_and_exports_at_top_level():
    assert set(VIT_SHAPES) <= set(list_models())
    assert {"vit_micro", "vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base"} <= set(
        polyattn.list_models()
    )
    assert polyattn.create_model is create_model


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'.*vit_micro"):
        create_model("vit_huge")


def test_bad_activation_is_rejected_before_building():
    with pytest.raises(ValueError, match="accepted forms"):
        create_model("vit_micro", activation="x^^3")


def test_register_model_and_duplicate_name():
    @register_model("_test_linear_probe")
    def build(activation="softmax", num_classes=3, **kw):
        return torch.nn.Linear(4, num_classes)

    assert "_test_linear_probe" in list_models()
    assert create_model("_test_linear_probe", num_classes=5).out_features == 5
    with pytest.raises(ValueError, match="already registered"):
        register_model("_test_linear_probe")(lambda activation="softmax": None)


def test_timm_prefix_dispatches_to_the_integration(monkeypatch):
    calls = []
    fake = types.ModuleType("polyattn.integrations.timm")
    fake.create_timm_model = lambda name, activation, **kw: calls.append((name, activation, kw)) or "model"
    monkeypatch.setitem(sys.modules, "polyattn.integrations.timm", fake)
    out = create_model("timm:vit_tiny_patch16_224", activation="X^3 / 16", num_classes=7, img_size=32)
    assert out == "model"
    assert calls == [("vit_tiny_patch16_224", "x^3/16", {"num_classes": 7, "img_size": 32})]


@pytest.mark.parametrize(
    "name, expected",
    # Parameter counts of the standard 224x224, patch-16, 1000-class models (as in timm).
    [
        ("vit_tiny", 5_717_416),
        ("vit_small", 22_050_664),
        ("vit_base", 86_567_656),
        ("deit_small", 22_050_664),
    ],
)
def test_standard_shapes_have_the_standard_parameter_counts(name, expected):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected
    dim, depth, heads = VIT_SHAPES[name]
    assert len(model.blocks) == depth and model.dim == dim
    assert model.blocks[0].attn.num_heads == heads


def test_micro_shape_and_forward():
    model = small_vit("x^3/sqrt(N)")
    assert (model.dim, len(model.blocks), model.blocks[0].attn.num_heads) == (64, 4, 4)
    assert model.patch_embed.num_patches == 16
    logits = model(torch.randn(5, 1, 8, 8))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    assert model.activation == "x^3/sqrt(N)"
    assert all(isinstance(b.attn, polyattn.PolyAttention) for b in model.blocks)


def test_set_activation_switches_every_block_and_keeps_weights():
    model = small_vit()
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    model.set_activation("x/16")
    assert {b.attn.activation.spec for b in model.blocks} == {"x/16"}
    assert not torch.allclose(before, model(x))
    model.set_activation("softmax")
    torch.testing.assert_close(model(x), before)


def test_rectangular_patches_and_images():
    model = create_model("vit_micro", img_size=[16, 8], patch_size=[4, 2], in_chans=3, num_classes=4)
    assert model.patch_embed.grid_size == (4, 4)
    assert model(torch.randn(2, 3, 16, 8)).shape == (2, 4)


def test_bad_shapes_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_model("vit_micro", img_size=10, patch_size=4)
    model = small_vit()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="vit_micro"):
        create_model("vit_micro", no_such_option=1)


@pytest.mark.parametrize("activation", ["softmax", "x^3/16", "relu/N"])
def test_attention_maps_are_the_matrices_the_layers_apply(activation):
    torch.manual_seed(0)
    model = small_vit(activation).eval()
    x = torch.randn(3, 1, 8, 8)
    maps = model.attention_maps(x)
    assert len(maps) == 4 and maps[0].shape == (3, 4, 17, 17)
    # Rebuild each attention output from A: proj(A @ v) must equal the layer's forward.
    h = model.embed(x)
    for block, a in zip(model.blocks, maps, strict=True):
        attn = block.attn
        _, _, v = attn.project_qkv(block.norm1(h))
        out = (a @ v).transpose(1, 2).reshape(h.shape)
        torch.testing.assert_close(attn.proj(out), attn(block.norm1(h)), rtol=1e-4, atol=1e-5)
        h = block(h)
    if activation == "softmax":
        torch.testing.assert_close(maps[2].sum(-1), torch.ones(3, 4, 17))


def test_attention_maps_select_layers_and_cls_attention():
    model = small_vit().eval()
    x = torch.randn(2, 1, 8, 8)
    full = model.attention_maps(x)
    some = model.attention_maps(x, layers=[1, 3])
    torch.testing.assert_close(some[0], full[1])
    torch.testing.assert_close(some[1], full[3])
    cls = model.cls_attention(x, layers=[0])[0]
    assert cls.shape == (2, 4, 4, 4)
    torch.testing.assert_close(cls.flatten(2), full[0][:, :, 0, 1:])
    with pytest.raises(ValueError, match="out of range"):
        model.attention_maps(x, layers=[4])


def test_attention_weights_match_the_reference_definition():
    model = small_vit("x^3/sqrt(N)").eval()
    x = torch.randn(2, 1, 8, 8)
    block = model.blocks[0]
    h = model.embed(x)
    q, k, _ = block.attn.project_qkv(block.norm1(h))
    scores = q @ k.transpose(-2, -1) * block.attn.scale
    expected = attention_weights(scores, block.attn.activation, None)
    torch.testing.assert_close(model.attention_maps(x, layers=[0])[0], expected)


def test_resize_pos_embed_keeps_prefix_and_constants():
    pe = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pe, (4, 4)) is pe
    const = torch.cat([torch.randn(1, 1, 8), torch.ones(1, 16, 8) * 3.0], dim=1)
    out = resize_pos_embed(const, (8, 6))
    assert out.shape == (1, 1 + 48, 8)
    torch.testing.assert_close(out[:, 0], const[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 48, 8), 3.0))
    # A ramp along the columns stays increasing along the columns.
    ramp = torch.arange(4.0).repeat(4).view(1, 16, 1).expand(1, 16, 2)
    up = resize_pos_embed(torch.cat([torch.zeros(1, 1, 2), ramp], 1), (8, 8))[0, 1:, 0].view(8, 8)
    assert (up[:, 1:] > up[:, :-1]).all()
    with pytest.raises(ValueError, match="old_grid"):
        resize_pos_embed(torch.randn(1, 1 + 8, 4), (4, 4))
    torch.testing.assert_close(
        resize_pos_embed(torch.randn(1, 1 + 8, 4), (2, 4), old_grid=(2, 4)).shape, torch.Size([1, 9, 4])
    )


def test_loading_a_checkpoint_trained_at_another_image_size_interpolates_positions():
    small = small_vit()
    big = small_vit(img_size=16)
    big.load_state_dict(small.state_dict())
    expected = resize_pos_embed(small.pos_embed.detach(), (8, 8))
    torch.testing.assert_close(big.pos_embed.detach(), expected)
    torch.testing.assert_close(big.blocks[2].attn.qkv.weight, small.blocks[2].attn.qkv.weight)
    assert torch.isfinite(big(torch.randn(2, 1, 16, 16))).all()


def test_drop_path_is_identity_in_eval_and_weight_decay_exemptions():
    model = small_vit(drop_path_rate=0.5, drop_rate=0.1)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert model.blocks[-1].drop_path.p == pytest.approx(0.5) and model.blocks[0].drop_path.p == 0.0


def test_pos_embed_std_sets_the_initial_scale_and_is_checked():
    torch.manual_seed(0)
    default = ViT(img_size=8, patch_size=1, in_chans=1, num_classes=10, dim=64, depth=1, num_heads=4)
    torch.manual_seed(0)
    unit = ViT(img_size=8, patch_size=1, in_chans=1, num_classes=10, dim=64, depth=1, num_heads=4, pos_embed_std=1.0)
    assert 0.018 < default.pos_embed.std().item() < 0.022  # ViT's 0.02
    # A normal truncated at +-2 std has std 0.88; 65 x 64 draws put the estimate well inside +-0.05.
    assert 0.83 < unit.pos_embed.std().item() < 0.93 and unit.pos_embed.abs().max().item() <= 2.0
    with pytest.raises(ValueError, match="pos_embed_std"):
        ViT(img_size=8, patch_size=1, in_chans=1, dim=64, depth=1, num_heads=4, pos_embed_std=0)


@pytest.mark.parametrize("amp", [False, True])
def test_cpu_qkv_layout_equals_the_plain_split(amp):
    # On CPU PolyAttention hands the backends contiguous fp32 q, k, v in one copy; values must equal the
    # plain split of the projection (cast to fp32 under autocast), and gradients must flow the same.
    torch.manual_seed(0)
    layer = polyattn.PolyAttention(32, 4, "x^3/sqrt(N)")
    x = torch.randn(3, 11, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        q, k, v = layer.project_qkv(x)
        plain = [t.view(3, 11, 4, 8).transpose(1, 2).float() for t in layer.qkv(x).chunk(3, dim=-1)]
    assert all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == (3, 4, 11, 8) for t in (q, k, v))
    for got, want in zip((q, k, v), plain, strict=True):
        assert torch.equal(got, want)
    (g1,) = torch.autograd.grad(sum(t.square().sum() for t in (q, k, v)), x)
    (g2,) = torch.autograd.grad(sum(t.square().sum() for t in plain), x)
    torch.testing.assert_close(g1, g2)
