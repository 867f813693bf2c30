"""The theory checks: closed forms against autograd, fits, determinism, the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from polyattn.cli import main
from polyattn.experiments import theory
from polyattn.experiments.theory import (
    TheoryConfig,
    check_softmax_bounds,
    fit_loglog,
    q_jacobian_fro,
    q_jacobian_fro_autograd,
    run_theory,
    sample_inputs,
)

TINY = dict(bound_n=[2, 4, 16], bound_samples=1, n_grid=[8, 16, 32], samples=4)


@pytest.mark.parametrize("spec", ["softmax", "x", "x^3", "x/sqrt(N)", "x^3/sqrt(N)", "relu/N", "gelu", "x^2/7"])
def test_q_jacobian_closed_form_matches_autograd(spec):
    for n, scale in ((3, 1.0), (6, 0.5), (6, 2.0)):  # 2.0: peaky softmax rows
        g = torch.Generator().manual_seed(n)
        x, q, k = sample_inputs(n, 5, 3, 1.0, scale, g)
        exact = q_jacobian_fro(x, q, k, spec)
        ref = q_jacobian_fro_autograd(x, q, k, spec)
        torch.testing.assert_close(exact, ref, rtol=1e-9, atol=1e-12)


def test_fit_loglog_recovers_power_laws():
    n = [8, 16, 32, 64, 128]
    fit = fit_loglog(n, [3 * v**0.5 for v in n], [0.0] * 5)
    assert math.isclose(fit["slope"], 0.5, abs_tol=1e-12)
    assert math.isclose(fit["tail_slope"], 0.5, abs_tol=1e-12)
    assert fit["ci_high"] - fit["ci_low"] < 1e-9
    # Monte Carlo noise in the means widens the interval; curvature does too.
    noisy = fit_loglog(n, [3 * v**0.5 for v in n], [0.3 * v**0.5 for v in n])
    assert noisy["ci_low"] < 0.5 - 0.01 and noisy["ci_high"] > 0.5 + 0.01
    bent = fit_loglog(n, [math.log(v) ** 3 for v in n], [0.0] * 5)
    assert bent["ci_high"] - bent["ci_low"] > 0.05
    assert fit_loglog(n, [1.0, 0.0, 1.0, 1.0, 1.0], [0.1] * 5)["slope"] is None


def test_softmax_bounds_hold_and_adversaries_reach_them():
    cfg = TheoryConfig(**TINY).resolved()
    res = check_softmax_bounds(cfg, progress=False)
    assert res["holds"]
    assert res["max_fro_ratio"] == pytest.approx(1.0, abs=1e-12)  # one-hot rows are tight
    assert res["max_jac_ratio"] == pytest.approx(0.25, abs=1e-12)  # two-hot rows: sqrt(N)/2
    by_family = {r["family"]: r for r in res["rows"] if r["n"] == 16}
    assert by_family["ascent"]["max_jac_ratio"] > 0.24  # the ascent finds the maximiser
    assert res["autograd_check"]["max_abs_diff"] < 1e-12


def _strip_timing(results):
    return {k: v for k, v in results.items() if k != "timing"}


def test_run_is_deterministic_and_writes_its_outputs(tmp_path):
    cfg = TheoryConfig(**TINY, seed=7, activations=["softmax", "x", "x^3/sqrt(N)"])
    run_theory(cfg, tmp_path / "a", progress=False, plots=True)
    run_theory(cfg, tmp_path / "b", progress=False, plots=False)
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    a.pop("plots")
    assert _strip_timing(a) == _strip_timing(b)
    for name in ("theorem_4_1.png", "growth_fro.png", "growth_jac_q.png", "growth_jac_s.png"):
        assert (tmp_path / "a" / name).stat().st_size > 5000
    assert (tmp_path / "a" / "config.yaml").exists() and (tmp_path / "a" / "report.txt").exists()

    other = run_theory(TheoryConfig(**TINY, seed=8, activations=["x"]), None, progress=False)
    assert other["monte_carlo"]["stats"]["x"]["fro"] != a["monte_carlo"]["stats"]["x"]["fro"]

    mc = a["monte_carlo"]
    # ||d(S/sqrt(N))/dS||_F = N / sqrt(N) exactly: every draw, so zero spread.
    jac_s = [c["mean"] for c in mc["stats"]["x^3/sqrt(N)"]["jac_s"]]
    assert all(c > 0 for c in jac_s)
    exact = [c["mean"] for c in mc["stats"]["x"]["jac_s"]]
    assert exact == pytest.approx([8.0, 16.0, 32.0])
    slopes = {(r["activation"], r["quantity"]): r for r in mc["slopes"]}
    assert slopes[("x", "jac_s")]["slope"] == pytest.approx(1.0)
    assert slopes[("x", "fro")]["claim"].startswith("Thm 4.2")
    assert slopes[("x^3/sqrt(N)", "jac_q")]["claim"].startswith("Cor 4.5")
    assert slopes[("softmax", "fro")]["kind"] == "bound"
    assert a["findings"] and "Theorem 4.1 holds" in a["findings"][0]


def test_monte_carlo_means_match_a_direct_computation():
    cfg = TheoryConfig(**TINY, seed=3, activations=["x^3/sqrt(N)"]).resolved()
    mc = theory.monte_carlo_norms(cfg, progress=False)
    n = cfg.n_grid[0]
    vals = []
    for i in range(cfg.samples):
        x, q, k = sample_inputs(n, cfg.D, cfg.d, cfg.sigma_x, cfg.sigma_t, theory._generator(cfg.seed, 42, n, i))
        s = x @ q @ (x @ k).T / math.sqrt(cfg.d)
        vals.append(float((s**3 / math.sqrt(n)).norm()))
    assert mc["stats"]["x^3/sqrt(N)"]["fro"][0]["mean"] == pytest.approx(np.mean(vals), rel=1e-12)


def test_claims_and_verdicts():
    fit = {"slope": 0.95, "ci_low": 0.9, "ci_high": 1.0}
    act = theory.get_activation
    assert theory._claim(act("x^3"), "fro", fit)["verdict"] == "agrees"
    assert "SLOWER" in theory._claim(act("x^3"), "fro", {"slope": 0.6, "ci_low": 0.55, "ci_high": 0.65})["verdict"]
    assert "FASTER" in theory._claim(act("x/sqrt(N)"), "fro", fit)["verdict"]
    assert "EXCEEDS" in theory._claim(act("softmax"), "fro", fit)["verdict"]
    assert "within" in theory._claim(act("softmax"), "fro", {"slope": 0.1, "ci_low": 0.05, "ci_high": 0.15})["verdict"]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown key"):
        TheoryConfig.from_dict({"sample": 3})
    with pytest.raises(ValueError, match="bad activation spec"):
        TheoryConfig(activations=["x^-1"]).resolved()
    with pytest.raises(ValueError, match="n_grid"):
        TheoryConfig(n_grid=[8]).resolved()
    with pytest.raises(ValueError, match="samples"):
        TheoryConfig(samples=1).resolved()
    with pytest.raises(ValueError, match="sigma_t"):
        TheoryConfig(sigma_t=-1.0).resolved()
    assert TheoryConfig(D=16).resolved().sigma_t == 0.25


def test_command_line(tmp_path, capsys):
    args = [
        "theory",
        "--out",
        str(tmp_path / "run"),
        "--bound-n",
        "2,8",
        "--bound-samples",
        "1",
        "--n-grid",
        "8,16",
        "--samples",
        "3",
        "--activations",
        "softmax,x^3/sqrt(N)",
        "--no-progress",
        "--no-plots",
        "--seed",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bounds hold on every sample: yes" in out and "x^3/sqrt(N)" in out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["config"]["n_grid"] == [8, 16] and res["config"]["seed"] == 1

    cfg_file = tmp_path / "theory.yaml"
    cfg_file.write_text("samples: 3\nn_grid: [8, 16]\nbound_n: [2]\nsampels: 2\n")
    assert main(["theory", "--config", str(cfg_file), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["theory", "--activations", "x^-1", "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "bad activation spec" in capsys.readouterr().err
