"""polyattn.patch: PolyAttention models, the patch registry on a third-party-style class, mask splitting, errors.

Nothing here needs timm: a small attention class written like timm's stands in
for a third-party library (tests/test_timm.py covers the real timm classes).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import polyattn
from polyattn.integrations import PatchedAttention, register_attention_patch
from polyattn.integrations.patch import additive_mask_to_bool


class ToyAttention(nn.Module):
    """A third-party softmax attention: fused qkv, additive float mask, its own forward."""

    def __init__(self, dim: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)

    def _qkv(self, x):
        b, n, c = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, mask=None):
        q, k, v = self._qkv(x)
        s = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        if mask is not None:
            s = s + mask
        out = s.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class PolyToyAttention(PatchedAttention, ToyAttention):
    def forward(self, x, mask=None):
        q, k, v = self._qkv(x)
        attn_mask, bias = additive_mask_to_bool(mask)
        out = self.attend(q, k, v, attn_mask=attn_mask, bias=bias, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


register_attention_patch(ToyAttention, PolyToyAttention)


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ToyAttention(), ToyAttention()])
        self.head = nn.Linear(16, 3)

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = x + b(x, mask)
        return self.head(x.mean(1))


def toy_reference(net: ToyNet, x: torch.Tensor, spec: str) -> torch.Tensor:
    """ToyNet with phi written out (no mask): x^3/sqrt(N) or x/14."""
    for b in net.blocks:
        q, k, v = b._qkv(x)
        s = q @ k.transpose(-2, -1) * b.head_dim**-0.5
        a = s**3 / s.shape[-1] ** 0.5 if spec == "x^3/sqrt(N)" else s / 14
        x = x + b.proj((a @ v).transpose(1, 2).reshape(x.shape))
    return net.head(x.mean(1))


@pytest.fixture
def net_and_x():
    torch.manual_seed(0)
    return ToyNet().eval(), torch.randn(2, 5, 16)


# --------------------------------------------------------------------------- #
# PolyAttention models
# --------------------------------------------------------------------------- #
def test_patch_sets_polyattention_activation_in_polyattn_models():
    torch.manual_seed(0)
    small = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3}
    model = polyattn.create_model("vit_micro", **small).eval()
    same = polyattn.create_model("vit_micro", activation="x^3/sqrt(N)", **small).eval()
    same.load_state_dict(model.state_dict())
    n = sum(isinstance(m, polyattn.PolyAttention) for m in model.modules())
    assert n > 0
    assert polyattn.patch(model, "x^3/sqrt(N)") == n
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x), rtol=0, atol=0)
    assert polyattn.patch(model, "softmax") == n
    assert {m.activation.spec for m in model.modules() if isinstance(m, polyattn.PolyAttention)} == {"softmax"}


def test_patch_does_not_import_timm_for_polyattn_models():
    code = (
        "import sys, polyattn; "
        "polyattn.patch(polyattn.create_model('vit_micro', img_size=8, patch_size=2), 'x/14'); "
        "assert 'timm' not in sys.modules, 'timm was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- #
# the patch registry (class swap)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("spec", ["x^3/sqrt(N)", "x/14"])
def test_registered_class_is_swapped_and_matches_reference(net_and_x, spec):
    net, x = net_and_x
    keys = list(net.state_dict())
    assert polyattn.patch(net, spec) == 2
    assert all(type(b) is PolyToyAttention and b.activation.spec == spec for b in net.blocks)
    assert list(net.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(net(x), toy_reference(net, x, spec))


def test_softmax_restores_the_original_class_and_output(net_and_x):
    net, x = net_and_x
    with torch.no_grad():
        expected = net(x)
        polyattn.patch(net, "softmax", native_softmax=False)
        assert all(type(b) is PolyToyAttention for b in net.blocks)
        torch.testing.assert_close(net(x), expected, atol=1e-6, rtol=0)
        polyattn.patch(net, "x^3")
        assert not torch.allclose(net(x), expected)
        assert polyattn.patch(net, "softmax") == 2
        assert all(type(b) is ToyAttention for b in net.blocks)
        assert not any(hasattr(b, name) for b in net.blocks for name in ("attention_observers", "backend"))
        assert torch.equal(net(x), expected)


def test_additive_masks_become_bool_masks(net_and_x):
    net, x = net_and_x
    mask = torch.zeros(5, 5)
    mask[:, 3:] = float("-inf")  # keys 3 and 4 are masked
    with torch.no_grad():
        expected = net(x, mask)
        polyattn.patch(net, "softmax", native_softmax=False)
        torch.testing.assert_close(net(x, mask), expected, atol=1e-6, rtol=0)
        polyattn.patch(net, "x^3/sqrt(N)")
        a = net(x, mask)
        # N counts the 3 allowed keys: the same as the model on the first 3 tokens alone for block 0
        b0 = net.blocks[0]
        q, k, v = b0._qkv(x)
        s = (q @ k.transpose(-2, -1) * b0.head_dim**-0.5)[..., :3]
        want = b0.proj(((s**3 / 3**0.5) @ v[:, :, :3]).transpose(1, 2).reshape(x.shape))
        torch.testing.assert_close(b0(x, mask), want)
        assert torch.isfinite(a).all()


def test_observers_see_each_call_and_norm_recorder_finds_patched_modules(net_and_x):
    net, x = net_and_x
    polyattn.patch(net, "x/14")
    calls = []
    net.blocks[1].attention_observers.append(lambda m, q, k, mask, bias, causal, scale: calls.append(q.shape))
    with torch.no_grad():
        net(x)
    assert calls == [(2, 2, 5, 8)]
    rec = polyattn.NormRecorder(net, every=1)
    assert [name for name, _ in rec.layers] == ["blocks.0", "blocks.1"]


def test_backend_and_dropout_follow_the_module(net_and_x):
    net, x = net_and_x
    polyattn.patch(net, "x^3/sqrt(N)")
    for b in net.blocks:
        b.backend = "reference"
    with torch.no_grad():
        ref = net(x)
    for b in net.blocks:
        b.backend = "chunked"
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref)
    net.blocks[0].attn_drop.p = 0.5
    assert net.blocks[0]._attn_dropout_p() == 0.0  # eval mode
    net.train()
    assert net.blocks[0]._attn_dropout_p() == 0.5


def test_patched_models_deepcopy(net_and_x):
    net, x = net_and_x
    polyattn.patch(net, "x/14")
    twin = copy.deepcopy(net)
    polyattn.patch(twin, "x^3")
    assert net.blocks[0].activation.spec == "x/14" and twin.blocks[0].activation.spec == "x^3"
    assert net.blocks[0].attention_observers is not twin.blocks[0].attention_observers


def test_subclasses_of_registered_classes_are_not_patched():
    class Changed(ToyAttention):
        def forward(self, x, mask=None):
            return 2 * super().forward(x, mask)

    with pytest.raises(ValueError, match=r"Changed \(x1\)"):
        polyattn.patch(nn.Sequential(Changed()), "x")


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
def test_model_without_supported_attention_names_what_it_found():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"Attention-like classes found: MultiheadAttention \(x2\)") as e:
        polyattn.patch(model, "x^3/14")
    assert "polyattn.PolyAttention" in str(e.value)
    with pytest.raises(ValueError, match="Attention-like classes found: none"):
        polyattn.patch(nn.Linear(4, 4), "x")


def test_partly_supported_models_warn_about_what_keeps_its_attention():
    model = nn.Sequential(ToyAttention(), nn.MultiheadAttention(16, 2))
    with pytest.warns(UserWarning, match=r"left these as they were.*MultiheadAttention \(x1\)"):
        assert polyattn.patch(model, "x/14") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # softmax everywhere: nothing to warn about
        polyattn.patch(model, "softmax")


def test_bad_arguments():
    with pytest.raises(ValueError, match="x\\^q"):
        polyattn.patch(ToyNet(), "x^q")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        polyattn.patch("model", "x")
    with pytest.raises(TypeError, match="PatchedAttention"):
        register_attention_patch(ToyAttention, ToyNet)

    class Other(PatchedAttention, ToyAttention):
        pass

    with pytest.raises(ValueError, match="already has a patch"):
        register_attention_patch(ToyAttention, Other)


def test_additive_mask_to_bool():
    b = torch.tensor([[True, False]])
    assert additive_mask_to_bool(b) == (b, None)
    assert additive_mask_to_bool(None) == (None, None)
    assert additive_mask_to_bool(torch.zeros(2, 2)) == (None, None)
    bias = torch.tensor([[0.5, -1.0]])
    m, out = additive_mask_to_bool(bias)
    assert m is None and out is bias
    m, out = additive_mask_to_bool(torch.tensor([[0.5, float("-inf")]]))
    assert torch.equal(m, torch.tensor([[True, False]])) and torch.equal(out, torch.tensor([[0.5, 0.0]]))
    for masked in (float("-inf"), -1e9, torch.finfo(torch.float32).min, -1e4):
        m, out = additive_mask_to_bool(torch.tensor([[0.0, masked]]))
        assert torch.equal(m, torch.tensor([[True, False]])) and out is None
    m, out = additive_mask_to_bool(torch.tensor([[-100.0, 0.0]]))  # a (large) bias, not a mask
    assert m is None and out[0, 0] == -100.0
    with pytest.raises(TypeError, match="additive float mask"):
        additive_mask_to_bool(torch.zeros(2, 2, dtype=torch.long))
