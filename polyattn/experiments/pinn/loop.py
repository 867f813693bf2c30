"""Training one PINN: L-BFGS (strong Wolfe) or Adam, checkpoints, exact resume, a stop on divergence.

A run directory holds ``config.yaml`` (resolved), ``metrics.json``, ``checkpoints/last.pt``,
``prediction.npz`` (grids of x, t, exact and predicted u), ``fields.png`` (exact, predicted,
|error|) and ``loss.png``. It is locked for the run (:class:`~polyattn.utils.RunDirLock`);
resume follows the trainer's rules (:mod:`polyattn.training.checkpoint`): the step budget,
logging and threads may change, anything else is refused, naming the keys.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...training.checkpoint import CHECKPOINT, config_changes, read_checkpoint, refuse_changes
from ...utils import RunDirLock, atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text, seed_everything
from ...utils.machine import machine_line
from ...utils.rundir import RunDirError
from ...utils.threads import torch_threads
from ..pdes import PDE, get_pde
from .config import PINN_CONFIG, resolve_pinn_config
from .problem import PinnBatch, build_batch, build_model_from_config, evaluate, pinn_loss
from .report import label, plot_fields, plot_loss

__all__ = ["NonFiniteLossError", "load_pinn_run", "run_pinn"]

_CHECKPOINT_KEYS = ("model", "optimizer", "config", "step", "func_evals", "train_time_s", "history")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def load_pinn_run(run_dir: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """(model with the checkpoint's weights, resolved config) of a run directory."""
    run = Path(run_dir)
    cfg_path, ckpt_path = run / "config.yaml", run / CHECKPOINT
    if not cfg_path.is_file() or not ckpt_path.is_file():
        raise ValueError(
            f"{str(run)!r} is not a finished PINN run directory: it needs config.yaml and "
            "checkpoints/last.pt (written by `polyattn pinn --out DIR`)"
        )
    cfg = resolve_pinn_config(cfg_path)
    model = build_model_from_config(cfg)
    model.load_state_dict(read_checkpoint(run, _CHECKPOINT_KEYS, "polyattn pinn")["model"])
    return model, cfg


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


@dataclass
class _State:
    step: int = 0
    func_evals: int = 0
    train_time_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def run_pinn(
    cfg: dict, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True, plots: bool = True
) -> dict:
    """Train and evaluate one PINN; returns the metrics also written to ``out_dir/metrics.json``.

    ``resume=True`` continues from ``out_dir/checkpoints/last.pt`` and reproduces an
    uninterrupted run exactly. A NaN or infinite loss stops training: the metrics then have
    ``diverged: True`` and ``stop_reason``, and the checkpoint keeps the last finite state.
    ``plots=False`` skips the PNGs.
    """
    cfg = PINN_CONFIG.resolve(cfg)
    # Tiny tensors gain nothing from intra-op threads, and on shared cores
    # a second spinning thread can slow each step several times.
    with torch_threads(cfg["train"]["num_threads"]), RunDirLock(out_dir, "polyattn pinn", command="pinn"):
        return _run(cfg, Path(out_dir), resume, progress, plots)


def _run(cfg: dict, out: Path, resume: bool, progress: bool, plots: bool) -> dict:
    pde = get_pde(cfg["pde"]["name"], cfg["pde"]["params"])
    seed_everything(cfg["train"]["seed"])
    model = build_model_from_config(cfg)
    opt = _make_optimizer(cfg, model.parameters())
    state = _restore(cfg, out, model, opt) if resume else _fresh(out)
    atomic_write_text(PINN_CONFIG.dump(cfg), out / "config.yaml")
    batch = build_batch(pde, *cfg["data"]["train_grid"], model.seq_len, model.seq_step)
    model.train()
    stop_reason = _train(cfg, pde, model, opt, batch, state, out, progress)
    return _finish(cfg, pde, model, opt, batch, state, out, stop_reason, plots)


def _fresh(out: Path) -> _State:
    if (out / CHECKPOINT).exists():
        raise RunDirError(
            f"{out} already holds a PINN run ({CHECKPOINT}); continue it with --resume or choose another --out"
        )
    return _State()


def _restore(cfg: dict, out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> _State:
    ckpt = read_checkpoint(out, _CHECKPOINT_KEYS, "polyattn pinn")
    _, refused = config_changes(ckpt["config"], cfg, PINN_CONFIG)  # by each key's resume rule
    refuse_changes(out, refused)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    return _State(ckpt["step"], ckpt["func_evals"], ckpt["train_time_s"], ckpt["history"])


def _checkpoint(out: Path, model, opt, state: _State, cfg: dict) -> None:
    atomic_save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), **vars(state), "config": cfg},
        out / CHECKPOINT,
    )


def _train(cfg, pde: PDE, model, opt, batch: PinnBatch, state: _State, out: Path, progress: bool) -> str | None:
    """Optimizer steps up to train.max_steps; the reason training stopped early, or None."""
    from tqdm.auto import tqdm

    tcfg = cfg["train"]
    name = cfg["model"]["name"]
    bar = tqdm(
        total=tcfg["max_steps"],
        initial=min(state.step, tcfg["max_steps"]),
        disable=not progress,
        desc=f"pinn {pde.name} {name}" + ("" if name == "mlp" else f" {cfg['model']['activation']}"),
        dynamic_ncols=True,
    )
    try:
        while state.step < tcfg["max_steps"]:
            step = state.step
            first: dict[str, float] = {}

            def closure(step=step, first=first):
                opt.zero_grad(set_to_none=True)
                loss, parts = pinn_loss(model, pde, batch)
                state.func_evals += 1
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
            state.train_time_s += time.perf_counter() - t0
            state.step = step + 1
            if step % tcfg["log_every"] == 0:
                state.history.append({"step": step, **first})
            bar.update(1)
            bar.set_postfix(loss=f"{first['loss']:.3g}")
            if state.step % tcfg["checkpoint_every"] == 0:
                _checkpoint(out, model, opt, state, cfg)
    except NonFiniteLossError as e:
        return str(e)
    finally:
        bar.close()
    return None


def _finish(cfg, pde: PDE, model, opt, batch, state: _State, out: Path, stop_reason, plots: bool) -> dict:
    """The final checkpoint, evaluation, metrics.json, prediction.npz and the figures."""
    ev = None
    final: dict[str, Any] = {"final_loss": None, "final_loss_parts": None}
    if stop_reason is None:
        _checkpoint(out, model, opt, state, cfg)
        final_loss, final_parts = pinn_loss(model, pde, batch)
        final = {"final_loss": final_loss.item(), "final_loss_parts": final_parts}
        ev = evaluate(model, pde, *cfg["data"]["test_grid"])
    tcfg = cfg["train"]
    metrics: dict[str, Any] = {
        "pde": pde.name,
        "pde_equation": pde.describe(),
        "pde_params": pde.params,
        "model": cfg["model"]["name"],
        "activation": None if cfg["model"]["name"] == "mlp" else cfg["model"]["activation"],
        "seq_len": model.seq_len,
        "num_params": sum(p.numel() for p in model.parameters()),
        "preset": cfg["preset"],
        "optimizer": tcfg["optimizer"],
        "seed": tcfg["seed"],
        "train_grid": cfg["data"]["train_grid"],
        "test_grid": cfg["data"]["test_grid"],
        "rMAE": None if ev is None else ev["rMAE"],
        "rRMSE": None if ev is None else ev["rRMSE"],
        **final,
        "steps": state.step,
        "func_evals": state.func_evals,
        "train_time_s": round(state.train_time_s, 2),
        "diverged": stop_reason is not None,
        "stop_reason": stop_reason,
        "machine": machine_line(),
        "history": state.history,
    }
    title = f"{pde.name}: {label(cfg)}"
    if ev is not None:
        np.savez_compressed(buf := io.BytesIO(), x=ev["x"], t=ev["t"], exact=ev["exact"], pred=ev["pred"])
        atomic_write_bytes(buf.getvalue(), out / "prediction.npz")
        if plots:
            plot_fields(ev, pde, title, out / "fields.png")
    if plots and state.history:
        plot_loss(state.history, title, out / "loss.png")
    atomic_write_json(metrics, out / "metrics.json")
    return metrics
