"""attention_norms against autograd's full Jacobian, and NormRecorder on real layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import polyattn
from polyattn.core import diagnostics
from polyattn.core.backends.reference import attention_weights
from polyattn.core.masking import combine_masks

SPECS = [
    "softmax",
    "sigmoid-log(N)",
    "x",
    "x^2",
    "x^3",
    "x^3/sqrt(N)",
    "x/N",
    "x^3/14",
    "relu",
    "relu/N",
    "elu",
    "gelu/sqrt(N)",
    "tanh",
    "exp",
    "sigmoid/2",
]


def _reference_norms(scores, spec, attn_mask, causal):
    """||A||_F and ||dA/dS||_F from autograd's full Jacobian, one (Nq, Nk) matrix at a time."""
    act = polyattn.get_activation(spec)
    nq, nk = scores.shape[-2:]
    mask = combine_masks(attn_mask, causal, nq, nk)
    if mask is not None:
        mask = mask.expand(scores.shape)
    flat_s = scores.reshape(-1, nq, nk)
    flat_m = None if mask is None else mask.reshape(-1, nq, nk)
    fro, jac = [], []
    for i in range(flat_s.shape[0]):
        m = None if flat_m is None else flat_m[i]

        def f(s, m=m):
            return attention_weights(s, act, m)

        fro.append(f(flat_s[i]).norm())
        jac.append(torch.autograd.functional.jacobian(f, flat_s[i]).norm())
    shape = scores.shape[:-2]
    return torch.stack(fro).reshape(shape), torch.stack(jac).reshape(shape)


def _mask_cases(b, nq, nk):
    g = torch.Generator().manual_seed(3)
    random = torch.rand(b, 1, nq, nk, generator=g) > 0.4
    random[0, 0, 1] = False  # an empty row
    padding = polyattn.padding_to_attn_mask(torch.tensor([[False] * (nk - 2) + [True] * 2] * b))
    return [(None, False), (random, False), (padding, False), (None, True), (random, True)]


@pytest.mark.parametrize("spec", SPECS)
def test_attention_norms_match_autograd(spec):
    b, h, nq, nk = 2, 2, 5, 6
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(b, h, nq, nk, generator=g, dtype=torch.float64) * 1.5
    for attn_mask, causal in _mask_cases(b, nq, nk):
        fro, jac = polyattn.attention_norms(scores, spec, attn_mask=attn_mask, causal=causal)
        assert fro.shape == jac.shape == (b, h)
        ref_fro, ref_jac = _reference_norms(scores, spec, attn_mask, causal)
        torch.testing.assert_close(fro, ref_fro, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(jac, ref_jac, rtol=1e-10, atol=1e-12)


def test_fro_is_the_matrix_attention_uses():
    # attention(q, k, I) returns A itself, so ||A||_F must match whatever the backend built.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64)
    mask = polyattn.padding_to_attn_mask(torch.tensor([[False] * 9, [False] * 6 + [True] * 3]))
    scores = q @ k.transpose(-2, -1) / 2.0
    for spec in ("softmax", "x^3/sqrt(N)", "relu/N"):
        a = polyattn.attention(q, k, torch.eye(9, dtype=torch.float64), spec, attn_mask=mask, causal=True)
        fro, _ = polyattn.attention_norms(scores, spec, attn_mask=mask, causal=True)
        torch.testing.assert_close(fro, a.square().sum((-2, -1)).sqrt())


def test_softmax_jacobian_accurate_for_nearly_one_hot_rows_in_fp32():
    # The plain closed form s2 - 2 s3 + s2^2 is off by about 3% here (cancellation).
    scores = torch.zeros(1, 64, 256)
    scores[..., 0] = torch.linspace(14.0, 24.0, 64)
    _, jac32 = polyattn.attention_norms(scores, "softmax")
    _, jac64 = polyattn.attention_norms(scores.double(), "softmax")
    assert jac64.item() < 1e-3  # small, so a cancellation error would dominate it
    assert abs(jac32.item() - jac64.item()) / jac64.item() < 1e-4


def test_large_scores_do_not_overflow_the_norm_in_fp32():
    scores = torch.full((1, 32, 32), 1e7)  # x^3 entries 1e21: their squares overflow fp32
    fro, jac = polyattn.attention_norms(scores, "x^3")
    assert torch.isfinite(fro).all() and torch.isfinite(jac).all()
    assert math.isclose(fro.item(), 32 * 1e21, rel_tol=1e-5)
    assert math.isclose(jac.item(), 32 * 3e14, rel_tol=1e-5)


def test_bounds_of_theorem_4_1_and_large_n():
    n = 2048
    scores = torch.randn(1, n, n) * 4
    fro, jac = polyattn.attention_norms(scores, "softmax", causal=True)
    assert fro.item() <= math.sqrt(n) and jac.item() <= 2 * math.sqrt(n)
    # x/sqrt(N) with a causal mask: diagonal Jacobian 1/sqrt(i+1) on row i.
    _, jac_x = polyattn.attention_norms(scores, "x/sqrt(N)", causal=True)
    assert math.isclose(jac_x.item(), math.sqrt(n), rel_tol=1e-5)


def test_low_precision_inputs_are_computed_in_fp32():
    scores = torch.randn(2, 8, 8).half()
    fro, jac = polyattn.attention_norms(scores, "x^3/sqrt(N)")
    assert fro.dtype == jac.dtype == torch.float32
    ref, _ = polyattn.attention_norms(scores.float(), "x^3/sqrt(N)")
    torch.testing.assert_close(fro, ref)


def test_bad_inputs_raise_clear_errors():
    s = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="bad activation spec"):
        polyattn.attention_norms(s, "x^0.5")
    with pytest.raises(TypeError, match="bool"):
        polyattn.attention_norms(s, "x", attn_mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        polyattn.attention_norms(s, "x", attn_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="Nq, Nk"):
        polyattn.attention_norms(torch.randn(4), "x")
    with pytest.raises(TypeError, match="floating"):
        polyattn.attention_norms(torch.ones(4, 4, dtype=torch.long), "x")


# --------------------------------------------------------------------------- #
# NormRecorder
# --------------------------------------------------------------------------- #
class Block(nn.Module):
    def __init__(self, dim, heads, activation):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = polyattn.PolyAttention(dim, heads, activation)

    def forward(self, x, key_padding_mask=None):
        return x + self.attn(self.norm(x), key_padding_mask=key_padding_mask)


class Net(nn.Module):
    def __init__(self, activation="softmax", dim=16, heads=2, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, activation) for _ in range(depth))

    def forward(self, x, key_padding_mask=None):
        for blk in self.blocks:
            x = blk(x, key_padding_mask)
        return x


def _expected_rows(model, x, step, key_padding_mask=None):
    """Norms recomputed independently from each layer's input."""
    rows, h = [], x
    for layer, blk in enumerate(model.blocks):
        attn = blk.attn
        q, k, _ = attn.project_qkv(blk.norm(h))
        mask = None if key_padding_mask is None else polyattn.padding_to_attn_mask(key_padding_mask)
        fro, jac = polyattn.attention_norms(q @ k.transpose(-2, -1) * attn.scale, attn.activation, mask)
        for head in range(attn.num_heads):
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "name": f"blocks.{layer}.attn",
                    "head": head,
                    "fro": fro[:, head].mean().item(),
                    "jac_fro": jac[:, head].mean().item(),
                }
            )
        h = blk(h, key_padding_mask)
    return rows


def _assert_rows_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in ("step", "layer", "name", "head")} == {
            k: w[k] for k in ("step", "layer", "name", "head")
        }
        assert math.isclose(g["fro"], w["fro"], rel_tol=1e-5)
        assert math.isclose(g["jac_fro"], w["jac_fro"], rel_tol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "x^3/sqrt(N)"])
def test_recorder_rows_match_direct_computation(activation):
    torch.manual_seed(0)
    model = Net(activation)
    x = torch.randn(3, 10, 16)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    with polyattn.NormRecorder(model, every=5) as rec:
        rec.set_step(10)
        model(x, pad)
        rows = rec.pop_rows()
    with torch.no_grad():
        _assert_rows_close(rows, _expected_rows(model, x, 10, pad))
    assert rec.rows == []


def test_recorder_leaves_outputs_and_gradients_unchanged():
    torch.manual_seed(0)
    model = Net("x^3/sqrt(N)")
    x = torch.randn(2, 12, 16)

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach().clone(), [p.grad.clone() for p in model.parameters()]

    out0, grads0 = run()
    rec = polyattn.NormRecorder(model, every=1).attach()
    rec.set_step(0)
    out1, grads1 = run()
    rec.detach()
    assert len(rec.rows) == 4  # 2 layers x 2 heads: it did record
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))


def test_recorder_measures_in_fp32_under_autocast():
    # Under bf16 autocast the recorder's own score product would otherwise run in bf16 (a 1e-2 error).
    torch.manual_seed(0)
    model = Net("x^3/sqrt(N)")
    seen = []
    for _, m in polyattn.attention_modules(model):
        m.attention_observers.append(lambda mod, q, k, *rest: seen.append((q.detach().float(), k.detach().float())))
    with polyattn.NormRecorder(model, every=1) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        rec.set_step(0)
        model(torch.randn(3, 10, 16))
        rows = rec.pop_rows()
    for layer, (q, k) in enumerate(seen):
        fro, jac = polyattn.attention_norms(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, "x^3/sqrt(N)")
        got = [r for r in rows if r["layer"] == layer]
        torch.testing.assert_close(torch.tensor([r["fro"] for r in got]), fro.mean(0), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor([r["jac_fro"] for r in got]), jac.mean(0), rtol=1e-5, atol=0)


def test_recorder_records_once_per_recording_step_and_skips_others(monkeypatch):
    calls = []
    real = diagnostics.head_norms

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(diagnostics, "head_norms", counting)
    model = Net()
    x = torch.randn(2, 6, 16)
    with polyattn.NormRecorder(model, every=3) as rec:
        for step in range(7):
            rec.set_step(step)
            model(x)
            model(x)  # a second forward in the same step (e.g. evaluation) is not recorded
        rows = rec.pop_rows()
    assert sorted({r["step"] for r in rows}) == [0, 3, 6]
    assert len(rows) == 3 * 2 * 2
    assert len(calls) == 3 * 2  # the norms were computed only on recording steps


def test_detach_removes_observers_and_recording_stops():
    model = Net()
    rec = polyattn.NormRecorder(model)
    other = lambda *a: None  # noqa: E731  (another tool's observer must survive detach)
    model.blocks[0].attn.attention_observers.append(other)
    rec.attach()
    rec.attach()  # idempotent
    assert len(model.blocks[1].attn.attention_observers) == 1
    rec.detach()
    assert model.blocks[0].attn.attention_observers == [other]
    assert model.blocks[1].attn.attention_observers == []
    rec.set_step(0)
    model(torch.randn(1, 4, 16))
    assert rec.rows == []


def test_recorder_finds_protocol_modules_and_follows_activation_changes():
    class Custom(nn.Module):  # a patched third-party attention: observers list + activation attr
        def __init__(self):
            super().__init__()
            self.attention_observers = []
            self.activation = "relu/N"

        def forward(self, x):
            q = k = x[:, None]  # (B, 1, N, d)
            for fn in self.attention_observers:
                fn(self, q, k, None, None, False, None)
            return x

    model = nn.Sequential(Custom(), polyattn.PolyAttention(8, 2))
    rec = polyattn.NormRecorder(model).attach()
    assert [name for name, _ in rec.layers] == ["0", "1"]
    x = torch.randn(2, 5, 8)
    rec.set_step(0)
    model(x)
    rows = rec.pop_rows()
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (1, 0), (1, 1)]
    fro, _ = polyattn.attention_norms(x @ x.transpose(1, 2) / math.sqrt(8), "relu/N")
    assert math.isclose(rows[0]["fro"], fro.mean().item(), rel_tol=1e-5)

    model[1].activation = "x"  # switched in place: the next recording uses it
    rec.set_step(1)
    model(x)
    q, k, _ = model[1].project_qkv(x)
    fro_x, _ = polyattn.attention_norms(q @ k.transpose(-2, -1) * model[1].scale, "x")
    assert math.isclose(rec.rows[1]["fro"], fro_x[:, 0].mean().item(), rel_tol=1e-5)


def test_recorder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no attention module"):
        polyattn.NormRecorder(nn.Linear(3, 3))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            polyattn.NormRecorder(Net(), every=bad)


def test_plot_norm_curves_draws_runs(tmp_path):
    from polyattn.experiments.plots import norm_curves, plot_norm_curves

    runs = {}
    for spec in ("softmax", "x^3/sqrt(N)"):
        torch.manual_seed(0)
        model = Net(spec, depth=3)
        with polyattn.NormRecorder(model, every=2) as rec:
            for step in range(6):
                rec.set_step(step)
                model(torch.randn(2, 6, 16))
        runs[spec] = [{"kind": "epoch", "step": 5, "val_acc": 0.5}] + [{"kind": "norms", **r} for r in rec.rows]
    curves = norm_curves(runs["softmax"])
    assert sorted(curves) == [0, 1, 2] and [s for s, _ in curves[1]["fro"]] == [0, 2, 4]
    out = plot_norm_curves(runs, tmp_path / "norms.png", layers=[0, 2], title="test")
    assert out.exists() and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no norm rows"):
        plot_norm_curves([{"kind": "epoch"}], tmp_path / "none.png")
    with pytest.raises(ValueError, match="layers"):
        plot_norm_curves(runs, tmp_path / "bad.png", layers=[7])


def test_norm_curves_draw_the_softmax_bounds_at_the_sequence_length(tmp_path, monkeypatch):
    from polyattn.experiments import plots

    rows = [{"kind": "norms", "step": s, "layer": 0, "head": 0, "fro": 1.0, "jac_fro": 1.0} for s in range(3)]
    drawn = {}

    def keep(fig, out_png, dpi=100):
        drawn["fig"] = fig
        return tmp_path / "norms.png"

    monkeypatch.setattr(plots, "save_figure", keep)
    plots.plot_norm_curves(rows, tmp_path / "norms.png", tokens=17)
    top, bottom = drawn["fig"].axes[0], drawn["fig"].axes[1]

    def dashed(ax):
        return [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]

    assert dashed(top) == pytest.approx([math.sqrt(17)]) and dashed(bottom) == pytest.approx([2 * math.sqrt(17)])
    plots.plot_norm_curves(rows, tmp_path / "norms.png")  # without N: no bound lines
    assert dashed(drawn["fig"].axes[0]) == []
