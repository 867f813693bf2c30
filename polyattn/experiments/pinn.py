"""Physics-informed transformers: train a PINNsFormer (any attention activation) or an MLP PINN on a PDE.

    >>> from polyattn.experiments.pinn import resolve_pinn_config, run_pinn
    >>> cfg = resolve_pinn_config(None, {"pde.name": "wave", "model.activation": "x^3/sqrt(N)"}, quick=True)
    >>> metrics = run_pinn(cfg, "runs/pinn/wave_x3")          # doctest: +SKIP
    >>> metrics["rMAE"], metrics["rRMSE"]                      # doctest: +SKIP

The loss is the sum, unweighted as published, of the mean squared PDE
residual on the training grid (every token of every pseudo-sequence), the
initial condition on the token at t = 0 (and u_t(x, 0) = 0 for the wave), and
the boundary condition on every token of the x = x_lo and x = x_hi columns.
Training is L-BFGS with strong Wolfe line search (torch defaults: lr 1, up to
20 iterations per step, history 100) or Adam. Errors are measured against the
exact solution on a test grid (101 x 101 as published):
rMAE = sum |u - u_hat| / sum |u|, rRMSE = sqrt(sum (u - u_hat)^2 / sum u^2).

A run directory holds ``config.yaml`` (resolved), ``metrics.json``,
``checkpoints/last.pt``, ``prediction.npz`` (grids of x, t, exact and
predicted u), ``fields.png`` (exact, predicted, |error|) and ``loss.png``.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..core.activations import get_activation
from ..models.pinnsformer import build_pinn_model, pseudo_sequence
from ..utils import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text, seed_everything
from ..utils.io import load_checkpoint, read_yaml_mapping
from ..utils.rundir import RunDirError, RunDirLock
from .pdes import PDE, get_pde, grads

__all__ = [
    "DEFAULTS",
    "PRESETS",
    "NonFiniteLossError",
    "PinnBatch",
    "build_batch",
    "build_model_from_config",
    "compare_runs",
    "evaluate",
    "load_pinn_run",
    "pinn_loss",
    "predict",
    "relative_errors",
    "resolve_pinn_config",
    "run_pinn",
]

# The published set-up (PINNsFormer demos): 51 x 51 training grid, 101 x 101 test
# grid, k = 5, dt = 1e-4, 453k-parameter transformer, L-BFGS. The published demos
# run 500 L-BFGS steps for convection and reaction and 1000 for the wave; their
# MLP baseline trains on a 101 x 101 grid (configs/pinn/*_mlp.yaml set these).
DEFAULTS: dict[str, Any] = {
    "preset": "paper",
    "pde": {"name": "convection", "params": {}},
    "model": {
        "name": "pinnsformer",
        "activation": "softmax",
        "d_model": 32,
        "d_ff": 256,
        "d_hidden": 512,
        "num_layers": 1,
        "num_heads": 2,
        "seq_len": 5,
        "seq_step": 1.0e-4,
        "mlp_hidden": 512,
        "mlp_layers": 4,
    },
    "data": {"train_grid": [51, 51], "test_grid": [101, 101]},
    "train": {
        "optimizer": "lbfgs",
        "steps": 500,
        "lr": None,  # None: 1.0 for L-BFGS, 1e-3 for Adam
        "lbfgs_max_iter": 20,
        "lbfgs_history": 100,
        "seed": 0,
        "log_every": 1,
        "checkpoint_every": 50,
        "threads": None,  # torch CPU threads; None leaves torch's default
    },
}

# Overrides applied on top of DEFAULTS. "quick" fits the CPU budget of a 2-core
# machine (each run under 5 minutes, measured: see docs/pinn.md): a 17 x 17
# training grid, the published architecture with narrower feed-forward and
# output widths, and 20 L-BFGS steps (of up to 20 iterations each).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "data": {"train_grid": [17, 17]},
        "model": {"d_ff": 64, "d_hidden": 128, "mlp_hidden": 128},
        "train": {"steps": 20, "checkpoint_every": 5, "threads": 1},
    },
}

_OPTIMIZERS = ("lbfgs", "adam")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------- configuration


def _deep_merge(base: dict, new: dict, where: str = "") -> dict:
    """base updated by new; a key absent from base is an error naming the allowed keys."""
    out = copy.deepcopy(base)
    for key, value in new.items():
        dotted = f"{where}{key}"
        if key not in out:
            raise ValueError(f"unknown config key {dotted!r}; allowed keys here: {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and dotted != "pde.params":
            if not isinstance(value, dict):
                raise ValueError(f"config key {dotted!r} must be a mapping of {sorted(out[key])}")
            out[key] = _deep_merge(out[key], value, dotted + ".")
        elif dotted == "pde.params":
            if not isinstance(value, dict):
                raise ValueError(
                    f"config key 'pde.params' must be a mapping such as {{beta: 50}}, got {value!r}"
                )
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _nest(dotted: dict[str, Any]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """["train.steps=10", "pde.params.beta=30"] -> {"train.steps": 10, ...} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. train.steps=10), got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _load_yaml(path: str | os.PathLike) -> dict:
    return read_yaml_mapping(path, "PINN config file (examples in configs/pinn/)")


def resolve_pinn_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    quick: bool = False,
) -> dict:
    """The full config: DEFAULTS, then the preset, then the file at ``path``, then ``overrides``.

    ``overrides`` maps dotted keys to values (``{"model.activation": "x^3/sqrt(N)"}``).
    The preset is ``"quick"`` when ``quick`` is True, else the ``preset`` key
    of the overrides or of the file (default ``"paper"``). Unknown keys and bad
    values raise ValueError naming the key and what is allowed.
    """
    file_cfg = _load_yaml(path) if path is not None else {}
    over = _nest(dict(overrides or {}))
    preset = "quick" if quick else over.get("preset", file_cfg.get("preset", DEFAULTS["preset"]))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = _deep_merge(DEFAULTS, PRESETS[preset])
    cfg = _deep_merge(cfg, file_cfg)
    cfg = _deep_merge(cfg, over)
    cfg["preset"] = preset
    validate_pinn_config(cfg)
    return cfg


def _check_int(cfg: dict, dotted: str, lo: int) -> None:
    section, key = dotted.split(".")
    v = cfg[section][key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"config key {dotted!r} must be an integer >= {lo}, got {v!r}")


def _check_grid(cfg: dict, dotted: str) -> None:
    section, key = dotted.split(".")
    v = cfg[section][key]
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in v)
    ):
        raise ValueError(f"config key {dotted!r} must be [n_x, n_t] with integers >= 2, got {v!r}")


def validate_pinn_config(cfg: dict) -> None:
    """Raise ValueError naming the first bad key and its allowed values."""
    get_pde(cfg["pde"]["name"], cfg["pde"]["params"])
    m = cfg["model"]
    build_names = ("pinnsformer", "mlp")
    if m["name"] not in build_names:
        raise ValueError(f"config key 'model.name' must be one of {list(build_names)}, got {m['name']!r}")
    if not isinstance(m["activation"], str):
        raise ValueError(
            "config key 'model.activation' must be a spec string such as 'x^3/sqrt(N)', "
            f"got {m['activation']!r}"
        )
    get_activation(m["activation"])
    for key in ("d_model", "d_ff", "d_hidden", "num_layers", "num_heads", "seq_len", "mlp_hidden"):
        _check_int(cfg, f"model.{key}", 1)
    _check_int(cfg, "model.mlp_layers", 2)
    if m["d_model"] % m["num_heads"]:
        raise ValueError(
            f"model.d_model ({m['d_model']}) must be divisible by model.num_heads ({m['num_heads']})"
        )
    if not isinstance(m["seq_step"], (int, float)) or not m["seq_step"] > 0:
        raise ValueError(f"config key 'model.seq_step' must be a number > 0, got {m['seq_step']!r}")
    _check_grid(cfg, "data.train_grid")
    _check_grid(cfg, "data.test_grid")
    t = cfg["train"]
    if t["optimizer"] not in _OPTIMIZERS:
        raise ValueError(
            f"config key 'train.optimizer' must be one of {list(_OPTIMIZERS)}, got {t['optimizer']!r}"
        )
    _check_int(cfg, "train.steps", 0)
    for key in ("lbfgs_max_iter", "lbfgs_history", "log_every", "checkpoint_every"):
        _check_int(cfg, f"train.{key}", 1)
    _check_int(cfg, "train.seed", 0)
    if t["threads"] is not None:
        _check_int(cfg, "train.threads", 1)
    if t["lr"] is not None and (not isinstance(t["lr"], (int, float)) or not t["lr"] > 0):
        raise ValueError(f"config key 'train.lr' must be a number > 0 or null, got {t['lr']!r}")


# ---------------------------------------------------------------- data and model


def build_model_from_config(cfg: dict) -> torch.nn.Module:
    """The (freshly initialised) model a config describes; seed first for reproducibility."""
    m = cfg["model"]
    if m["name"] == "mlp":
        return build_pinn_model("mlp", hidden=m["mlp_hidden"], num_layers=m["mlp_layers"])
    return build_pinn_model(
        "pinnsformer",
        activation=m["activation"],
        d_model=m["d_model"],
        d_ff=m["d_ff"],
        d_hidden=m["d_hidden"],
        num_layers=m["num_layers"],
        num_heads=m["num_heads"],
        seq_len=m["seq_len"],
        seq_step=m["seq_step"],
    )


def grid(
    pde: PDE, n_x: int, n_t: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, t of shape (n_t, n_x) on the PDE's domain, boundaries included (row i is time t_i)."""
    xs = torch.linspace(*pde.x_range, n_x, dtype=torch.float64)
    ts = torch.linspace(*pde.t_range, n_t, dtype=torch.float64)
    tt, xx = torch.meshgrid(ts, xs, indexing="ij")
    return xx.to(dtype), tt.to(dtype)


@dataclass
class PinnBatch:
    """All training inputs as pseudo-sequences (P, k, 1), in one tensor so one forward pass serves them.

    Rows are [residual points | x = x_lo column | x = x_hi column]; the initial
    row t = t_lo is kept apart (x0, t0) because the wave also needs u_t there.
    """

    x: torch.Tensor
    t: torch.Tensor
    n_res: int
    n_bnd: int
    x0: torch.Tensor
    t0: torch.Tensor


def build_batch(pde: PDE, n_x: int, n_t: int, seq_len: int, seq_step: float) -> PinnBatch:
    xx, tt = grid(pde, n_x, n_t)
    base_x = torch.cat([xx.reshape(-1), xx[:, 0], xx[:, -1]])
    base_t = torch.cat([tt.reshape(-1), tt[:, 0], tt[:, -1]])
    x, t = pseudo_sequence(base_x, base_t, seq_len, seq_step)
    x0, t0 = pseudo_sequence(xx[0].clone(), tt[0].clone(), seq_len, seq_step)
    return PinnBatch(
        x=x.requires_grad_(True),
        t=t.requires_grad_(True),
        n_res=n_x * n_t,
        n_bnd=n_t,
        x0=x0,
        t0=t0.requires_grad_(pde.initial_velocity),
    )


def pinn_loss(model: torch.nn.Module, pde: PDE, batch: PinnBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts {"residual", "initial", "boundary"} (floats)."""
    u = model(batch.x, batch.t)
    r = pde.residual(u, batch.x, batch.t)[: batch.n_res]
    loss_res = r.pow(2).mean()

    u0 = model(batch.x0, batch.t0)
    loss_ic = (u0[:, 0, 0] - pde.initial(batch.x0[:, 0, 0])).pow(2).mean()
    if pde.initial_velocity:
        (u0_t,) = grads(u0, batch.t0)
        loss_ic = loss_ic + u0_t[:, 0, 0].pow(2).mean()

    lo = u[batch.n_res : batch.n_res + batch.n_bnd]
    hi = u[batch.n_res + batch.n_bnd :]
    if pde.boundary == "periodic":
        loss_bc = (lo - hi).pow(2).mean()
    else:
        xs = batch.x.detach()
        ts = batch.t.detach()
        lo_x, hi_x = xs[batch.n_res : batch.n_res + batch.n_bnd], xs[batch.n_res + batch.n_bnd :]
        lo_t, hi_t = ts[batch.n_res : batch.n_res + batch.n_bnd], ts[batch.n_res + batch.n_bnd :]
        loss_bc = (lo - pde.exact(lo_x, lo_t)).pow(2).mean() + (hi - pde.exact(hi_x, hi_t)).pow(2).mean()

    loss = loss_res + loss_ic + loss_bc
    parts = {"residual": loss_res.item(), "initial": loss_ic.item(), "boundary": loss_bc.item()}
    return loss, parts


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """u(x, t) at points of any shape: token 0 of each point's pseudo-sequence."""
    k, dt = int(getattr(model, "seq_len", 1)), float(getattr(model, "seq_step", 0.0))
    flat_x, flat_t = x.reshape(-1), t.reshape(-1)
    out = []
    for i in range(0, flat_x.numel(), chunk):
        xs, ts = pseudo_sequence(flat_x[i : i + chunk], flat_t[i : i + chunk], k, dt)
        out.append(model(xs, ts)[:, 0, 0])
    return torch.cat(out).reshape(x.shape)


def relative_errors(exact: torch.Tensor, pred: torch.Tensor) -> dict[str, float]:
    """rMAE = sum|u - u_hat| / sum|u| and rRMSE = sqrt(sum (u - u_hat)^2 / sum u^2), computed in float64."""
    u, p = exact.double(), pred.double()
    return {
        "rMAE": ((u - p).abs().sum() / u.abs().sum()).item(),
        "rRMSE": math.sqrt(((u - p) ** 2).sum().item() / (u**2).sum().item()),
    }


def evaluate(model: torch.nn.Module, pde: PDE, n_x: int, n_t: int) -> dict[str, Any]:
    """rMAE, rRMSE on the test grid, plus the grids (numpy, shape (n_t, n_x))."""
    model.eval()
    xx, tt = grid(pde, n_x, n_t)
    pred = predict(model, xx, tt)
    exact = pde.exact(xx.double(), tt.double()).float()
    out: dict[str, Any] = relative_errors(exact, pred)
    out.update(x=xx.numpy(), t=tt.numpy(), exact=exact.numpy(), pred=pred.numpy())
    return out


# ---------------------------------------------------------------- files


def _save_figure(fig, path: Path, dpi: int = 100) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(buf.getvalue(), path)


def _label(cfg: dict) -> str:
    if cfg["model"]["name"] == "mlp":
        return "MLP PINN"
    return f"PINNsFormer, attention {cfg['model']['activation']}"


def plot_fields(ev: dict, pde: PDE, title: str, path: Path, dpi: int = 100) -> None:
    """Exact, predicted and |error| fields side by side (t vertical, x horizontal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extent = [pde.x_range[0], pde.x_range[1], pde.t_range[0], pde.t_range[1]]
    err = np.abs(ev["pred"] - ev["exact"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1))
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.16, top=0.84, wspace=0.3)
    vmin, vmax = float(ev["exact"].min()), float(ev["exact"].max())
    panels = (
        ("exact u(x, t)", ev["exact"], dict(vmin=vmin, vmax=vmax, cmap="RdBu_r")),
        ("predicted", ev["pred"], dict(vmin=vmin, vmax=vmax, cmap="RdBu_r")),
        (f"|error|  rMAE {ev['rMAE']:.3f}  rRMSE {ev['rRMSE']:.3f}", err, dict(cmap="magma")),
    )
    for ax, (name, field_, kw) in zip(axes, panels, strict=True):
        im = ax.imshow(field_, origin="lower", extent=extent, aspect="auto", **kw)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("t")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=10)
    _save_figure(fig, path, dpi)
    plt.close(fig)


def plot_loss(history: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    steps = [h["step"] for h in history]
    for key in ("loss", "residual", "initial", "boundary"):
        vals = [max(h[key], 1e-30) for h in history]
        ax.semilogy(steps, vals, label=key, lw=1.2 if key == "loss" else 0.9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (before the step)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)


def load_pinn_run(run_dir: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """(model with the checkpoint's weights, resolved config) of a run directory."""
    run = Path(run_dir)
    cfg_path, ckpt_path = run / "config.yaml", run / "checkpoints" / "last.pt"
    if not cfg_path.is_file() or not ckpt_path.is_file():
        raise ValueError(
            f"{str(run)!r} is not a finished PINN run directory: it needs config.yaml and "
            "checkpoints/last.pt (written by `polyattn pinn --out DIR`)"
        )
    cfg = resolve_pinn_config(cfg_path)
    model = build_model_from_config(cfg)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    return model, cfg


# ---------------------------------------------------------------- training


def _make_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    t = cfg["train"]
    if t["optimizer"] == "lbfgs":
        return torch.optim.LBFGS(
            params,
            lr=1.0 if t["lr"] is None else t["lr"],
            max_iter=t["lbfgs_max_iter"],
            history_size=t["lbfgs_history"],
            line_search_fn="strong_wolfe",
        )
    return torch.optim.Adam(params, lr=1e-3 if t["lr"] is None else t["lr"])


def _comparable(cfg: dict) -> dict:
    """The parts of a config that must match for a resume (everything but the step budget and logging)."""
    c = copy.deepcopy(cfg)
    for key in ("steps", "log_every", "checkpoint_every", "threads"):
        c["train"].pop(key)
    c.pop("preset")
    return c


def _checkpoint(path: Path, model, opt, state: dict, cfg: dict) -> None:
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": state["step"],
            "func_evals": state["func_evals"],
            "train_time_s": state["train_time_s"],
            "history": state["history"],
            "config": cfg,
        },
        path,
    )


def run_pinn(
    cfg: dict, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True, plots: bool = True
) -> dict:
    """Train and evaluate one PINN; returns the metrics also written to ``out_dir/metrics.json``.

    ``resume=True`` continues from ``out_dir/checkpoints/last.pt`` (same
    config but for ``train.steps`` and logging) and reproduces an
    uninterrupted run exactly. A NaN or infinite loss stops training: the
    metrics then have ``diverged: True`` and ``stop_reason``, and the
    checkpoint keeps the last finite state. ``plots=False`` skips the PNGs.
    """
    validate_pinn_config(cfg)
    threads = cfg["train"]["threads"]
    before = torch.get_num_threads()
    if threads is not None:
        # Tiny tensors gain nothing from intra-op threads, and on shared cores
        # a second spinning thread can slow each step several times.
        torch.set_num_threads(threads)
    try:
        with RunDirLock(out_dir, "polyattn pinn"):
            return _run_pinn(cfg, Path(out_dir), resume, progress, plots)
    finally:
        torch.set_num_threads(before)


def _run_pinn(cfg: dict, out: Path, resume: bool, progress: bool, plots: bool) -> dict:
    from tqdm.auto import tqdm

    ckpt_path = out / "checkpoints" / "last.pt"
    pde = get_pde(cfg["pde"]["name"], cfg["pde"]["params"])
    tcfg = cfg["train"]

    seed_everything(tcfg["seed"])
    model = build_model_from_config(cfg)
    opt = _make_optimizer(cfg, model.parameters())
    state = {"step": 0, "func_evals": 0, "train_time_s": 0.0, "history": []}
    if not resume and ckpt_path.exists():
        raise RunDirError(
            f"{out} already holds a PINN run ({ckpt_path.relative_to(out)}); continue it with --resume "
            "or choose another --out"
        )
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"cannot resume: {str(ckpt_path)!r} does not exist; run without --resume first")
        ckpt = load_checkpoint(
            ckpt_path,
            ("model", "optimizer", "config", "step", "func_evals", "train_time_s", "history"),
            f"cannot resume {str(out)!r}: delete {ckpt_path.parent} and run without --resume, or use a new --out",
        )
        if _comparable(ckpt["config"]) != _comparable(cfg):
            raise ValueError(
                f"cannot resume {str(out)!r}: its config differs from this one beyond train.steps "
                "(compare with config.yaml there, or use a new --out)"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state.update({k: ckpt[k] for k in ("step", "func_evals", "train_time_s", "history")})
    atomic_write_text(yaml.safe_dump(cfg, sort_keys=False), out / "config.yaml")

    batch = build_batch(pde, *cfg["data"]["train_grid"], model.seq_len, model.seq_step)
    n_params = sum(p.numel() for p in model.parameters())
    label = _label(cfg)
    stop_reason = None
    model.train()
    bar = tqdm(
        total=tcfg["steps"],
        initial=min(state["step"], tcfg["steps"]),
        disable=not progress,
        desc=f"pinn {pde.name} {cfg['model']['name']}"
        + ("" if cfg["model"]["name"] == "mlp" else f" {cfg['model']['activation']}"),
        dynamic_ncols=True,
    )
    try:
        while state["step"] < tcfg["steps"]:
            step = state["step"]
            first: dict[str, float] = {}

            def closure(step=step, first=first):
                opt.zero_grad(set_to_none=True)
                loss, parts = pinn_loss(model, pde, batch)
                state["func_evals"] += 1
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {step} "
                        f"(residual {parts['residual']:.3g}, initial {parts['initial']:.3g}, "
                        f"boundary {parts['boundary']:.3g})"
                    )
                loss.backward()
                if not first:
                    first.update(loss=loss.item(), **parts)
                return loss

            t0 = time.perf_counter()
            opt.step(closure)
            state["train_time_s"] += time.perf_counter() - t0
            state["step"] = step + 1
            if step % tcfg["log_every"] == 0:
                state["history"].append({"step": step, **first})
            bar.update(1)
            bar.set_postfix(loss=f"{first['loss']:.3g}")
            if state["step"] % tcfg["checkpoint_every"] == 0:
                _checkpoint(ckpt_path, model, opt, state, cfg)
    except NonFiniteLossError as e:
        stop_reason = str(e)
    finally:
        bar.close()

    if stop_reason is None:
        _checkpoint(ckpt_path, model, opt, state, cfg)
        final_loss, final_parts = pinn_loss(model, pde, batch)
        final = {"final_loss": final_loss.item(), "final_loss_parts": final_parts}
        ev = evaluate(model, pde, *cfg["data"]["test_grid"])
    else:
        final = {"final_loss": None, "final_loss_parts": None}
        ev = None

    metrics: dict[str, Any] = {
        "pde": pde.name,
        "pde_equation": pde.describe(),
        "pde_params": pde.params,
        "model": cfg["model"]["name"],
        "activation": None
        if cfg["model"]["name"] == "mlp"
        else get_activation(cfg["model"]["activation"]).spec,
        "seq_len": model.seq_len,
        "num_params": n_params,
        "preset": cfg["preset"],
        "optimizer": tcfg["optimizer"],
        "seed": tcfg["seed"],
        "train_grid": cfg["data"]["train_grid"],
        "test_grid": cfg["data"]["test_grid"],
        "rMAE": None if ev is None else ev["rMAE"],
        "rRMSE": None if ev is None else ev["rRMSE"],
        **final,
        "steps": state["step"],
        "func_evals": state["func_evals"],
        "train_time_s": round(state["train_time_s"], 2),
        "diverged": stop_reason is not None,
        "stop_reason": stop_reason,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "history": state["history"],
    }
    if ev is not None:
        np.savez_compressed(buf := io.BytesIO(), x=ev["x"], t=ev["t"], exact=ev["exact"], pred=ev["pred"])
        atomic_write_bytes(buf.getvalue(), out / "prediction.npz")
        if plots:
            plot_fields(ev, pde, f"{pde.name}: {label}", out / "fields.png")
    if plots and state["history"]:
        plot_loss(state["history"], f"{pde.name}: {label}", out / "loss.png")
    atomic_write_json(metrics, out / "metrics.json")
    return metrics


def _read_run(run_dir: Path) -> tuple[dict, dict | None]:
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        raise ValueError(
            f"{str(run_dir)!r} has no metrics.json: is it a finished `polyattn pinn` run directory?"
        )
    metrics = json.loads(mpath.read_text(encoding="utf-8"))
    ppath = run_dir / "prediction.npz"
    pred = dict(np.load(ppath)) if ppath.is_file() else None
    return metrics, pred


def _variant(metrics: dict) -> str:
    return "MLP PINN" if metrics["model"] == "mlp" else metrics["activation"]


def compare_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, dpi: int = 72) -> str:
    """A Markdown table of finished runs, plus one small PNG per PDE of the runs' predictions.

    Writes ``out_dir/comparison.md`` and ``out_dir/<pde>.png`` (exact solution,
    then each run's prediction and |error|); returns the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out = Path(out_dir)
    runs = [(Path(d), *_read_run(Path(d))) for d in run_dirs]
    lines = [
        "| PDE | model | attention | seed | rMAE | rRMSE | final loss | steps (evals) | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for _, m, _ in runs:
        att = m["activation"] or "-"
        groups.setdefault((m["pde"], m["model"], att), []).append(m)
        if m["diverged"]:
            lines.append(
                f"| {m['pde']} | {m['model']} | {att} | {m['seed']} | diverged | | | {m['steps']} | |"
            )
            continue
        lines.append(
            f"| {m['pde']} | {m['model']} | {att} | {m['seed']} | {m['rMAE']:.3f} | {m['rRMSE']:.3f} | "
            f"{m['final_loss']:.2e} | {m['steps']} ({m['func_evals']}) | {m['train_time_s']:.0f} s |"
        )
    table = "\n".join(lines) + "\n"
    if any(len(g) > 1 for g in groups.values()):
        agg = [
            "",
            "| PDE | model | attention | runs | rMAE mean (min - max) | rRMSE mean (min - max) |",
            "|---|---|---|---|---|---|",
        ]
        for (pde_name, model_name, att), group in groups.items():
            ok = [m for m in group if not m["diverged"]]
            cells = []
            for key in ("rMAE", "rRMSE"):
                vals = [m[key] for m in ok]
                cells.append(f"{np.mean(vals):.3f} ({min(vals):.3f} - {max(vals):.3f})" if vals else "-")
            diverged = len(group) - len(ok)
            runs_cell = f"{len(group)}" + (f" ({diverged} diverged)" if diverged else "")
            agg.append(f"| {pde_name} | {model_name} | {att} | {runs_cell} | {cells[0]} | {cells[1]} |")
        table += "\n".join(agg) + "\n"
    atomic_write_text(table, out / "comparison.md")

    # The figure shows the first run of each (PDE, model, attention).
    runs = [
        next((d, m, p) for d, m, p in runs if (m["pde"], m["model"], m["activation"] or "-") == key)
        for key in groups
    ]
    for pde_name in dict.fromkeys(m["pde"] for _, m, _ in runs):
        group = [(m, p) for _, m, p in runs if m["pde"] == pde_name and p is not None]
        if not group:
            continue
        pde = get_pde(pde_name, group[0][0]["pde_params"])
        extent = [pde.x_range[0], pde.x_range[1], pde.t_range[0], pde.t_range[1]]
        exact = group[0][1]["exact"]
        n = len(group)
        fig, axes = plt.subplots(2, n + 1, figsize=(2.1 * (n + 1), 4.0), squeeze=False)
        fig.subplots_adjust(left=0.02, right=0.99, bottom=0.02, top=0.82, wspace=0.08, hspace=0.08)
        lim = float(np.abs(exact).max())
        err_max = max(float(np.abs(p["pred"] - p["exact"]).max()) for _, p in group)
        axes[0, 0].imshow(
            exact, origin="lower", extent=extent, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim
        )
        axes[0, 0].set_title("exact", fontsize=8)
        axes[1, 0].axis("off")
        axes[1, 0].text(
            0.0, 0.5, "top: prediction\nbottom: |error|\n(shared scales)", fontsize=7, va="center"
        )
        for j, (m, p) in enumerate(group, start=1):
            axes[0, j].imshow(
                p["pred"], origin="lower", extent=extent, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim
            )
            axes[0, j].set_title(f"{_variant(m)}\nrMAE {m['rMAE']:.3f}", fontsize=7)
            axes[1, j].imshow(
                np.abs(p["pred"] - p["exact"]),
                origin="lower",
                extent=extent,
                aspect="auto",
                cmap="magma",
                vmin=0,
                vmax=err_max,
            )
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{pde_name} (x horizontal, t vertical)", fontsize=9, y=0.985)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        # A 128-colour palette keeps the documentation figures small.
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(colors=128)
        small = io.BytesIO()
        img.save(small, format="PNG", optimize=True)
        atomic_write_bytes(small.getvalue(), out / f"{pde_name}.png")
    return table


def summary_row(metrics: dict) -> str:
    """One line for the terminal."""
    act = metrics["activation"] or "-"
    if metrics["diverged"]:
        return f"{metrics['pde']:<11} {metrics['model']:<12} {act:<13} diverged: {metrics['stop_reason']}"
    return (
        f"{metrics['pde']:<11} {metrics['model']:<12} {act:<13} rMAE {metrics['rMAE']:.4f}  "
        f"rRMSE {metrics['rRMSE']:.4f}  loss {metrics['final_loss']:.3e}  "
        f"{metrics['steps']} steps / {metrics['func_evals']} evals  {metrics['train_time_s']:.0f} s"
    )
