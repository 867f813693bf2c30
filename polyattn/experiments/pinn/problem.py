"""The PINN problem: model from a config, the training batch, the loss, prediction and errors.

The loss is the sum, unweighted as published, of the mean squared PDE
residual on the training grid (every token of every pseudo-sequence), the
initial condition on the token at t = 0 (and u_t(x, 0) = 0 for the wave), and
the boundary condition on every token of the x = x_lo and x = x_hi columns.
Errors are measured against the exact solution on a test grid (101 x 101 as
published): rMAE = sum |u - u_hat| / sum |u|, rRMSE = sqrt(sum (u - u_hat)^2 / sum u^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...models.pinnsformer import build_pinn_model, pseudo_sequence
from ..pdes import PDE, grads

__all__ = [
    "PinnBatch",
    "build_batch",
    "build_model_from_config",
    "evaluate",
    "grid",
    "pinn_loss",
    "predict",
    "relative_errors",
]


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


def grid(pde: PDE, n_x: int, n_t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
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
