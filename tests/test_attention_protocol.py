"""The attention-module protocol: one implementation, set_activation on every model type, the attention-map recorder.

Covers polyattn's ViT, a timm ViT after polyattn.patch, the LRA encoder and
PINNsFormer, each at a small size on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import polyattn
from polyattn.core import (
    AttentionMapRecorder,
    AttentionModule,
    PolyAttention,
    attention_modules,
    get_activations,
    set_activation,
)
from polyattn.core.backends.reference import attention_weights
from polyattn.core.diagnostics import observed_attention_weights
from polyattn.core.masking import causal_mask
from polyattn.experiments.report import write_attention_figures
from polyattn.integrations import PatchedAttention
from polyattn.models import create_model
from polyattn.models.lra import lra_encoder
from polyattn.models.pinnsformer import PINNsFormer, pseudo_sequence

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_vit(activation: str = "softmax") -> nn.Module:
    torch.manual_seed(0)
    return create_model(
        "vit_micro", activation=activation, img_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, depth=3
    ).eval()


def timm_vit(activation: str = "x^3/sqrt(N)") -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm is not installed: pip install 'polyattn[timm]'")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=3,
        num_heads=2,
    ).eval()
    polyattn.patch(model, activation, native_softmax=False)
    return model


def lra_model() -> nn.Module:
    torch.manual_seed(0)
    return lra_encoder(vocab_size=16, max_len=32, num_classes=3, dim=16, depth=2, num_heads=2, mlp_dim=16).eval()


def pinn_model() -> nn.Module:
    torch.manual_seed(0)
    return PINNsFormer(d_ff=8, d_hidden=8, num_layers=2)


def images() -> tuple[torch.Tensor]:
    torch.manual_seed(1)
    return (torch.randn(3, 1, 8, 8),)


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 9:] = True
    return torch.randint(0, 16, (2, 12)), padding


def points() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return pseudo_sequence(torch.rand(4), torch.rand(4), 5, 1e-4)


# name -> (build, inputs, number of attention modules)
MODELS = {
    "polyattn_vit": (small_vit, images, 3),
    "timm_vit": (timm_vit, images, 3),
    "lra_encoder": (lra_model, tokens, 2),
    "pinnsformer": (pinn_model, points, 4),
}


# --- one implementation ------------------------------------------------------------------------
def test_polyattention_and_patched_modules_share_one_implementation():
    pytest.importorskip("timm")
    from polyattn.integrations.timm import PolyClassAttn, PolyTimmAttention, PolyWindowAttention, PolyXCA

    for cls in (PolyAttention, PatchedAttention, PolyTimmAttention, PolyWindowAttention, PolyXCA, PolyClassAttn):
        assert issubclass(cls, AttentionModule)
        # Nothing of the protocol is redefined below the mixin.
        for klass in cls.__mro__[: cls.__mro__.index(AttentionModule)]:
            assert not {"activation", "attend", "_attn_dropout_p"} & set(vars(klass)), klass
    attn = timm_vit().blocks[0].attn
    assert type(attn).__mro__[1:3] == (PatchedAttention, AttentionModule)


def test_a_third_party_module_on_the_mixin_gets_the_whole_protocol():
    class MyAttention(AttentionModule, nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self._init_attention("softmax")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
            return self.attend(q, k, v, causal=True).transpose(1, 2).flatten(2)

    model = nn.Sequential(MyAttention(), nn.Linear(8, 8))
    assert polyattn.patch(model, "x/14") == 1 and get_activations(model) == {"0": "x/14"}
    assert set_activation(model, "x^3/sqrt(N)") == 1
    assert "activation='x^3/sqrt(N)'" in repr(model)
    x = torch.randn(2, 5, 8)
    with AttentionMapRecorder(model) as rec:
        model(x)
    a = rec.get(0)
    assert a.shape == (2, 2, 5, 5) and torch.all(a[..., ~causal_mask(5, 5)] == 0)
    with polyattn.NormRecorder(model) as norms:
        model(x)
    assert len(norms.pop_rows()) == 2


# --- set_activation ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_set_activation_switches_every_attention_module(name):
    build, inputs, n = MODELS[name]
    # The timm model is patched with softmax on polyattn's forward (native_softmax=False).
    model, x = build("softmax") if name in ("polyattn_vit", "timm_vit") else build(), inputs()
    with torch.no_grad():
        before = model(*x)
    assert len(attention_modules(model)) == n
    assert set(get_activations(model).values()) == {"softmax"}

    assert set_activation(model, "X^3 / sqrt(n)") == n
    assert list(get_activations(model).values()) == ["x^3/sqrt(N)"] * n
    with torch.no_grad():
        assert not torch.allclose(model(*x), before, atol=1e-4)
    assert set_activation(model, "softmax") == n
    with torch.no_grad():
        torch.testing.assert_close(model(*x), before)


def test_model_level_activation_accessors_agree_with_set_activation():
    vit = small_vit()
    vit.set_activation("x/16")
    assert vit.activation == "x/16" and set(get_activations(vit).values()) == {"x/16"}
    pinn = pinn_model()
    set_activation(pinn, "relu/N")
    assert pinn.activation == "relu/N"
    pinn.activation = "x"
    assert set(get_activations(pinn).values()) == {"x"}


def test_set_activation_errors_change_nothing():
    model = small_vit("x/14")
    with pytest.raises(ValueError, match="bad activation spec"):
        set_activation(model, "x^q")
    assert set(get_activations(model).values()) == {"x/14"}
    with pytest.raises(ValueError, match=r"polyattn\.patch"):
        set_activation(nn.Sequential(nn.Linear(2, 2)), "x")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        set_activation("model", "x")  # type: ignore[arg-type]
    assert get_activations(nn.Linear(2, 2)) == {}


def test_unpatched_timm_models_ask_for_polyattn_patch():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, depth=1)
    with pytest.raises(ValueError, match=r"polyattn\.patch"):
        set_activation(model, "x")
    polyattn.patch(model, "x")
    assert set_activation(model, "x/14") == 1


# --- attention maps ------------------------------------------------------------------------------------
def _reference_map(q, k, scale, mask=None, bias=None, act="softmax"):
    scores = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias
    return attention_weights(scores, polyattn.get_activation(act), mask)


@pytest.mark.parametrize("act", ["softmax", "x^3/sqrt(N)", "relu/N"])
def test_recorded_maps_are_the_reference_attention_weights(act):
    torch.manual_seed(0)
    layer = PolyAttention(16, 4, act).eval()
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[2, 4:] = True
    with AttentionMapRecorder(layer) as rec:
        out = layer(x, key_padding_mask=padding, causal=True)
    q, k, v = layer.project_qkv(x)
    mask = (~padding)[:, None, None, :] & causal_mask(6, 6)
    expected = _reference_map(q, k, layer.scale, mask, act=act).detach()
    torch.testing.assert_close(rec.get(0), expected)
    # A is the matrix the layer applies: proj(A v) is its output.
    torch.testing.assert_close(layer.proj((rec.get(0) @ v).transpose(1, 2).flatten(2)), out, rtol=1e-4, atol=1e-5)
    assert torch.all(rec.get(0)[2, :, :, 4:] == 0)


def test_heads_batch_and_bias_selection():
    torch.manual_seed(0)
    q, k = torch.randn(4, 3, 5, 8), torch.randn(4, 3, 7, 8)
    bias = torch.randn(1, 3, 5, 7)  # broadcast over the batch, as Swin's relative-position bias
    mask = torch.rand(4, 1, 5, 7) > 0.3
    module = PolyAttention(8, 1, "x^3/sqrt(N)")
    full = _reference_map(q, k, 0.5, mask, bias, "x^3/sqrt(N)")
    got = observed_attention_weights(module, q, k, mask, bias, False, 0.5, heads=[2, 0], batch=[3, 1])
    torch.testing.assert_close(got, full[[3, 1]][:, [2, 0]])
    with pytest.raises(ValueError, match="no head dimension"):
        observed_attention_weights(module, q[0, 0], k[0, 0], None, None, False, None, heads=[0])


def test_recorder_layers_lifecycle_and_errors():
    model = small_vit("x^3/16")
    x = images()[0]
    with torch.no_grad():
        before = model(x)
    rec = AttentionMapRecorder(model, layers=[-1, 0], heads=[1], batch=[0, 2])
    with rec, torch.no_grad():
        torch.testing.assert_close(model(x), before)
        model(x)
    assert not rec.attached and all(m.attention_observers == [] for _, m in attention_modules(model))
    assert sorted(rec.maps) == [0, 2] and len(rec.maps[2]) == 2
    assert rec.get(-1).shape == (4, 1, 17, 17)  # two forwards of two selected images
    torch.testing.assert_close(rec.get(2)[:2], model.attention_maps(x, [2])[0][[0, 2]][:, [1]])
    with pytest.raises(ValueError, match="not recorded"):
        rec.get(1)
    rec.clear()
    with pytest.raises(ValueError, match="no forward"):
        rec.get(0)
    with pytest.raises(ValueError, match="out of range"):
        AttentionMapRecorder(model, layers=[3])
    with pytest.raises(ValueError, match="non-negative"):
        AttentionMapRecorder(model, heads=[-1])
    with pytest.raises(ValueError, match="AttentionMapRecorder found no attention module"):
        AttentionMapRecorder(nn.Linear(2, 2))


def test_recorder_on_a_patched_timm_vit_gives_the_applied_matrices():
    model = timm_vit("x^3/sqrt(N)")
    x = images()[0]
    seen = {}
    model.blocks[2].attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with AttentionMapRecorder(model, layers=[1, 2]) as rec, torch.no_grad():
        model(x)
    assert rec.get(1).shape == rec.get(2).shape == (3, 2, 17, 17)
    attn = model.blocks[2].attn
    with torch.no_grad():
        _, _, v = attn.qkv(seen["x"]).reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        out = attn.proj((rec.get(2) @ v).transpose(1, 2).reshape(3, 17, 32))
    torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)


def test_recorder_on_swin_windows_keeps_the_shift_mask():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        window_size=4,
        depths=(2, 2),
        num_heads=(1, 2),
        embed_dim=16,
        num_classes=3,
    ).eval()
    polyattn.patch(model, "x/N")
    with AttentionMapRecorder(model, layers=[1]) as rec, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    a = rec.get(1)  # shifted windows: 2 images x 4 windows, 16 tokens each
    assert a.shape == (8, 1, 16, 16)
    assert (a == 0).any()  # cross-region pairs of the shifted windows are masked


# --- the compare report's attention figures --------------------------------------------------------
@pytest.mark.parametrize("build", [small_vit, timm_vit], ids=["polyattn_vit", "timm_vit"])
def test_attention_figures_for_polyattn_and_timm_vits(tmp_path, build):
    x = images()[0].repeat(3, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    models = {"softmax": build("softmax"), "x^3/sqrt(N)": build("x^3/sqrt(N)")}
    figures, n_tokens, notes = write_attention_figures(models, x, y, tmp_path)
    assert figures == {
        "attention_layer2": "attention_layer2.png",
        "attention_layer3": "attention_layer3.png",
        "cls_attention": "cls_attention.png",
    }
    assert n_tokens == 17 and notes == []
    for name in figures.values():
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
