"""Physics-informed transformers: PDEs, model, loss, training loop, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from polyattn import attention
from polyattn.cli import main as cli_main
from polyattn.core.layers import PolyAttention
from polyattn.experiments.pdes import PDES, get_pde, grads
from polyattn.experiments.pinn import (
    build_batch,
    build_model_from_config,
    load_pinn_run,
    parse_set,
    pinn_loss,
    predict,
    relative_errors,
    resolve_pinn_config,
    run_pinn,
)
from polyattn.models.pinnsformer import (
    MLPPINN,
    PINNsFormer,
    Wavelet,
    build_pinn_model,
    pseudo_sequence,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "pinn"

# A run small enough for a test: 7 x 7 grid, tiny widths, 2 L-BFGS steps of up to 3 iterations.
TINY = {
    "data.train_grid": [7, 7],
    "data.test_grid": [11, 11],
    "model.d_ff": 8,
    "model.d_hidden": 8,
    "model.mlp_hidden": 8,
    "train.max_steps": 2,
    "train.lbfgs_max_iter": 3,
    "train.checkpoint_every": 1,
    "train.num_threads": 1,
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: a second intra-op thread only adds contention on shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**over):
    return resolve_pinn_config(None, {**TINY, **over})


# ---------------------------------------------------------------- PDEs


def _points(pde, n=64, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = pde.x_range[0] + (pde.x_range[1] - pde.x_range[0]) * torch.rand(n, generator=g, dtype=dtype)
    t = pde.t_range[0] + (pde.t_range[1] - pde.t_range[0]) * torch.rand(n, generator=g, dtype=dtype)
    return x.requires_grad_(True), t.requires_grad_(True)


@pytest.mark.parametrize("name", sorted(PDES))
def test_residual_vanishes_on_exact_solution(name):
    pde = get_pde(name)
    x, t = _points(pde)
    u = pde.exact(x, t)
    r = pde.residual(u, x, t)
    # Derivative sizes reach ~50 (convection) and ~(6 pi)^2 (wave): compare with them.
    assert r.abs().max().item() < 1e-9 * 400


@pytest.mark.parametrize(
    "name, wrong",
    [("convection", {"beta": 30.0}), ("reaction", {"rho": 3.0}), ("wave", {"c": 1.0})],
)
def test_residual_detects_a_wrong_solution(name, wrong):
    # The exact solution of one coefficient is not a solution for another.
    pde, other = get_pde(name), get_pde(name, wrong)
    x, t = _points(pde)
    r = other.residual(pde.exact(x, t), x, t)
    assert r.abs().max().item() > 0.1


@pytest.mark.parametrize("name", sorted(PDES))
def test_initial_and_boundary_conditions_of_exact_solution(name):
    pde = get_pde(name)
    x = torch.linspace(*pde.x_range, 33, dtype=torch.float64)
    t = torch.linspace(*pde.t_range, 33, dtype=torch.float64)
    torch.testing.assert_close(pde.exact(x, torch.zeros_like(x)), pde.initial(x))
    lo = pde.exact(torch.full_like(t, pde.x_range[0]), t)
    hi = pde.exact(torch.full_like(t, pde.x_range[1]), t)
    if pde.boundary == "periodic":
        torch.testing.assert_close(lo, hi)
    else:
        assert lo.abs().max() < 1e-12 and hi.abs().max() < 1e-12


def test_pde_published_coefficients_and_errors():
    assert get_pde("convection").params == {"beta": 50.0}
    assert get_pde("reaction").params == {"rho": 5.0}
    assert get_pde("wave").params == {"c": 2.0, "beta": 3.0}
    with pytest.raises(ValueError, match="unknown PDE 'heat'.*convection"):
        get_pde("heat")
    with pytest.raises(ValueError, match="unknown parameter.*'rho'.*beta"):
        get_pde("convection", {"rho": 1})


# ---------------------------------------------------------------- model


def test_pseudo_sequence_shifts_time_only():
    x = torch.tensor([0.5, 1.0])
    t = torch.tensor([0.0, 0.25])
    xs, ts = pseudo_sequence(x, t, 5, 1e-4)
    assert xs.shape == ts.shape == (2, 5, 1)
    torch.testing.assert_close(xs[:, :, 0], x[:, None].expand(2, 5))
    torch.testing.assert_close(ts[1, :, 0], 0.25 + 1e-4 * torch.arange(5.0))


def test_published_size_and_shapes():
    torch.manual_seed(0)
    model = build_pinn_model("pinnsformer")
    assert sum(p.numel() for p in model.parameters()) == 453561  # the published model's count
    attn = model.attention_layers()
    assert len(attn) == 2 and all(isinstance(m, PolyAttention) for m in attn)
    assert len([m for m in model.modules() if isinstance(m, Wavelet)]) == 12
    xs, ts = pseudo_sequence(torch.rand(3), torch.rand(3), model.seq_len, model.seq_step)
    assert model(xs, ts).shape == (3, 5, 1)
    mlp = build_pinn_model("mlp")
    assert sum(p.numel() for p in mlp.parameters()) == 527361
    assert mlp(xs[:, :1], ts[:, :1]).shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"\(P, k, 1\)"):
        model(xs[:, :, 0], ts[:, :, 0])
    with pytest.raises(ValueError, match="unknown PINN model"):
        build_pinn_model("kan")


def test_attention_sees_the_pseudo_sequence_and_activation_switches():
    torch.manual_seed(0)
    model = PINNsFormer(d_ff=8, d_hidden=8)
    seen = []
    for m in model.attention_layers():
        m.attention_observers.append(lambda mod, q, k, *rest: seen.append((k.shape, mod.activation.spec)))
    xs, ts = pseudo_sequence(torch.rand(4), torch.rand(4), 5, 1e-4)
    ref = model(xs, ts)
    assert [s for s, _ in seen] == [torch.Size([4, 2, 5, 16])] * 2  # N = k = 5 keys, self and cross
    model.activation = "x^3/sqrt(N)"
    assert model.activation == "x^3/sqrt(N)"
    assert all(m.activation.spec == "x^3/sqrt(N)" for m in model.attention_layers())
    assert not torch.allclose(model(xs, ts), ref)
    model.activation = "softmax"
    torch.testing.assert_close(model(xs, ts), ref)


def test_attention_on_a_pseudo_sequence_is_nearly_pointwise():
    """k = 5 tokens 1e-4 apart are almost equal, so every score in a row is almost the same s:
    softmax gives weights 1/5 (output = the value), x^p/sqrt(N) gives output sqrt(5) s^p v."""
    torch.manual_seed(0)
    model = PINNsFormer(d_ff=8, d_hidden=8).double()
    attn = model.encoder[0].attn
    xs, ts = pseudo_sequence(torch.rand(6, dtype=torch.float64) * 6, torch.rand(6, dtype=torch.float64), 5, 1e-4)
    h = model.encoder[0].act1(model.mixer(torch.cat((xs, ts), dim=-1)))
    q, k, v = attn.project_qkv(h)
    s = (q * k).sum(-1, keepdim=True) * attn.scale  # the diagonal score of each token
    for spec, expected in (
        ("softmax", v),
        ("x^3/sqrt(N)", math.sqrt(5) * s**3 * v),
        ("x/sqrt(N)", math.sqrt(5) * s * v),
    ):
        out = attention(q, k, v, spec, scale=attn.scale)
        rel = ((out - expected).norm() / expected.norm()).item()
        assert rel < 2e-3, (spec, rel)
        far = attention(q, k.flip(0), v.flip(0), spec, scale=attn.scale)  # keys of other points
        assert ((far - expected).norm() / expected.norm()).item() > 100 * rel


def test_wavelet_is_learnable_sin_cos():
    w = Wavelet()
    with torch.no_grad():
        w.w1.fill_(2.0)
        w.w2.fill_(-0.5)
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(w(x), 2 * torch.sin(x) - 0.5 * torch.cos(x))
    assert {n for n, _ in w.named_parameters()} == {"w1", "w2"}


@pytest.mark.parametrize("activation", ["softmax", "x^3/sqrt(N)", "x/sqrt(N)"])
def test_sequence_derivative_matches_uniform_shift_derivative(activation):
    """The residual's derivative (gradient of the sequence sum w.r.t. each token, as published) vs
    the derivative of each token's output when the whole pseudo-sequence moves in time (exact).

    They differ only through the asymmetry of the cross-token Jacobian, which vanishes as dt -> 0.
    """

    def rel_diff(dt):
        torch.manual_seed(1)
        model = PINNsFormer(activation=activation, d_ff=16, d_hidden=16).double()
        x, t = torch.rand(16, dtype=torch.float64) * 6, torch.rand(16, dtype=torch.float64)
        xs, ts = pseudo_sequence(x, t, 5, dt)
        ts.requires_grad_(True)
        (u_t,) = grads(model(xs, ts), ts)
        _, exact = torch.autograd.functional.jvp(
            lambda s: model(xs, ts.detach() + s),
            torch.zeros(1, dtype=torch.float64),
            torch.ones(1, dtype=torch.float64),
        )
        return ((u_t - exact).abs().max() / exact.abs().max()).item()

    assert rel_diff(1e-4) < 5e-3
    assert rel_diff(0.2) > 10 * rel_diff(1e-4)


# ---------------------------------------------------------------- loss and metrics


class _Exact(torch.nn.Module):
    """A 'model' that returns the exact solution: the loss must vanish."""

    def __init__(self, pde, seq_len=5, seq_step=1e-4):
        super().__init__()
        self.pde, self.seq_len, self.seq_step = pde, seq_len, seq_step
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.pde.exact(x, t) + self.dummy


@pytest.mark.parametrize("name", sorted(PDES))
def test_loss_vanishes_for_exact_solution_and_not_for_zero(name):
    pde = get_pde(name)
    batch = build_batch(pde, 9, 9, 5, 1e-4)
    loss, parts = pinn_loss(_Exact(pde), pde, batch)
    assert loss.item() < 1e-7, parts
    zero = build_pinn_model("mlp", hidden=4, num_layers=2)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    loss0, parts0 = pinn_loss(zero, pde, batch)
    assert parts0["initial"] > 0.05  # u = 0 misses the initial condition
    assert set(parts0) == {"residual", "initial", "boundary"}


def test_predict_uses_token_zero_and_relative_errors():
    pde = get_pde("wave")
    x = torch.linspace(0, 1, 11).expand(3, 11)
    t = torch.full((3, 11), 0.3)
    torch.testing.assert_close(predict(_Exact(pde), x, t, chunk=7), pde.exact(x, t))
    u = torch.tensor([1.0, -2.0, 2.0])
    e = relative_errors(u, u + torch.tensor([0.5, 0.0, -0.5]))
    assert e["rMAE"] == pytest.approx(1.0 / 5.0)
    assert e["rRMSE"] == pytest.approx(math.sqrt(0.5 / 9.0))


# ---------------------------------------------------------------- config


def test_config_layers_and_errors(tmp_path):
    quick = resolve_pinn_config(None, quick=True)
    assert quick["preset"] == "quick" and quick["data"]["train_grid"] == [17, 17]
    assert quick["data"]["test_grid"] == [101, 101]
    f = tmp_path / "c.yaml"
    f.write_text("pde: {name: wave}\nmodel: {activation: 'x^3/sqrt(N)'}\ntrain: {max_steps: 7}\n")
    cfg = resolve_pinn_config(f, {"train.max_steps": 3, "pde.params.beta": 4})
    assert (cfg["pde"]["name"], cfg["model"]["activation"], cfg["train"]["max_steps"]) == (
        "wave",
        "x^3/sqrt(N)",
        3,
    )
    assert cfg["pde"]["params"] == {"beta": 4}
    assert parse_set(["a.b=[1, 2]", "c=x^3"]) == {"a.b": [1, 2], "c": "x^3"}
    with pytest.raises(ValueError, match="unknown config key train.epochs.*steps"):
        resolve_pinn_config(None, {"train.epochs": 3})
    with pytest.raises(ValueError, match="x\\^"):
        resolve_pinn_config(None, {"model.activation": "cubic"})
    with pytest.raises(ValueError, match="train_grid"):
        resolve_pinn_config(None, {"data.train_grid": [1, 5]})
    with pytest.raises(ValueError, match="train.optimizer"):
        resolve_pinn_config(None, {"train.optimizer": "sgd"})
    with pytest.raises(ValueError, match="does not exist"):
        resolve_pinn_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pde: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        resolve_pinn_config(bad)


def test_shipped_configs_resolve():
    from polyattn.training.config import grid_points

    runs = [(f, name) for f in sorted(CONFIG_DIR.glob("*.yaml")) for name in grid_points(f)]
    assert len(runs) >= 12
    for f, name in runs:
        cfg = resolve_pinn_config(f, point=name)
        assert name.startswith(cfg["pde"]["name"])
        assert (cfg["preset"] == "quick") == (f.stem == "quick")


# ---------------------------------------------------------------- training


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_training_is_seeded_and_resume_is_exact(tmp_path):
    cfg = tiny_cfg(**{"pde.name": "convection", "model.activation": "x^3/sqrt(N)", "train.max_steps": 3})
    a = run_pinn(cfg, tmp_path / "a", progress=False, plots=False)
    b = run_pinn(cfg, tmp_path / "b", progress=False, plots=False)
    assert a["rMAE"] == b["rMAE"] and a["final_loss"] == b["final_loss"]
    assert a["history"][0]["loss"] > a["final_loss"]  # training did something
    ma, _ = load_pinn_run(tmp_path / "a")
    mb, _ = load_pinn_run(tmp_path / "b")
    assert torch.equal(_params(ma), _params(mb))

    other = run_pinn(
        tiny_cfg(
            **{"pde.name": "convection", "model.activation": "x^3/sqrt(N)", "train.max_steps": 3, "train.seed": 1}
        ),
        tmp_path / "c",
        progress=False,
        plots=False,
    )
    assert other["rMAE"] != a["rMAE"]

    # 1 step, then resume to 3: the same weights as 3 steps in one go.
    short = dict(cfg, train={**cfg["train"], "max_steps": 1})
    run_pinn(short, tmp_path / "r", progress=False, plots=False)
    resumed = run_pinn(cfg, tmp_path / "r", resume=True, progress=False, plots=False)
    assert resumed["steps"] == 3 and resumed["final_loss"] == a["final_loss"]
    mr, _ = load_pinn_run(tmp_path / "r")
    assert torch.equal(_params(mr), _params(ma))

    changed = dict(cfg, model={**cfg["model"], "activation": "softmax"})
    with pytest.raises(ValueError, match="differs"):
        run_pinn(changed, tmp_path / "r", resume=True, progress=False, plots=False)
    with pytest.raises(ValueError, match="cannot resume"):
        run_pinn(cfg, tmp_path / "nothing", resume=True, progress=False, plots=False)


def test_adam_option_and_model_from_config():
    cfg = tiny_cfg(**{"pde.name": "reaction", "train.optimizer": "adam", "train.lr": 1e-2})
    model = build_model_from_config(cfg)
    assert isinstance(model, PINNsFormer) and model.seq_len == 5
    mlp = build_model_from_config(tiny_cfg(**{"model.name": "mlp"}))
    assert isinstance(mlp, MLPPINN) and mlp.seq_len == 1


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "nan"
    rc = cli_main(
        [
            "pinn",
            "--model",
            "mlp",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "pde.params.beta=1e30",
            *[f"--set={k}={json.dumps(v)}" for k, v in TINY.items()],
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diverged"] is True and "non-finite loss" in metrics["stop_reason"]
    assert metrics["rMAE"] is None


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(
        [
            "pinn",
            "--pde",
            "wave",
            "--activation",
            "x/sqrt(N)",
            "--out",
            str(out),
            "--no-progress",
            "--steps",
            "1",
            *[f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k != "train.max_steps"],
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wave" in printed and "rMAE" in printed
    for name in (
        "config.yaml",
        "metrics.json",
        "checkpoints/last.pt",
        "fields.png",
        "loss.png",
        "prediction.npz",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pde"] == "wave" and metrics["activation"] == "x/sqrt(N)" and metrics["steps"] == 1
    assert 0 < metrics["rMAE"] < 10 and 0 < metrics["rRMSE"] < 10
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["activation"] == "x/sqrt(N)"
    assert (out / "fields.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli_main(["pinn", "--out", str(tmp_path / "x"), "--activation", "nope"]) == 2
    assert "error:" in capsys.readouterr().err

    assert cli_main(["pinn", "--compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| wave | pinnsformer | x/sqrt(N) |" in table
    assert (tmp_path / "cmp" / "wave.png").is_file()
    assert cli_main(["pinn", "--compare", str(tmp_path), "--out", str(tmp_path / "cmp2")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
