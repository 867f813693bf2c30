"""Benchmark PDEs with exact solutions: 1D convection, 1D reaction, 1D wave.

The set-ups are those of "Characterizing possible failure modes in PINNs"
(Krishnapriyan et al., 2021) as used by PINNsFormer (Zhao et al., 2023):

- convection: u_t + beta u_x = 0 on x in [0, 2 pi], t in [0, 1], u(x, 0) = sin x,
  periodic in x; beta = 50. Exact: u = sin(x - beta t).
- reaction: u_t - rho u (1 - u) = 0 on x in [0, 2 pi], t in [0, 1],
  u(x, 0) = h(x) = exp(-(x - pi)^2 / (2 (pi/4)^2)), periodic in x; rho = 5.
  Exact: u = h e^(rho t) / (h e^(rho t) + 1 - h).
- wave: u_tt - c^2 u_xx = 0 on x in [0, 1], t in [0, 1], c = 2 (so u_tt - 4 u_xx),
  u(x, 0) = sin(pi x) + 0.5 sin(beta pi x), u_t(x, 0) = 0, u(0, t) = u(1, t) = 0;
  beta = 3. Exact: u = sin(pi x) cos(c pi t) + 0.5 sin(beta pi x) cos(c beta pi t).

Each PDE computes its residual with autograd from u(x, t) and the input
tensors it was computed from, so ``residual(exact(x, t), x, t)`` vanishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["PDE", "PDES", "Convection", "Reaction", "Wave", "d", "get_pde", "grads"]


def d(u: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """du/d(wrt) elementwise, keeping the graph so the result can be differentiated again.

    u and wrt have the same shape and u[i] depends on wrt[i] (and, inside a
    pseudo-sequence, slightly on its neighbours: see docs/pinn.md).
    """
    (g,) = torch.autograd.grad(u, wrt, grad_outputs=torch.ones_like(u), create_graph=True)
    return g


def grads(u: torch.Tensor, *wrt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(du/dw for w in wrt) in one backward pass, keeping the graph."""
    return torch.autograd.grad(u, wrt, grad_outputs=torch.ones_like(u), create_graph=True)


@dataclass(frozen=True)
class PDE:
    """A 1D time-dependent PDE on [x_lo, x_hi] x [t_lo, t_hi] with an exact solution.

    Subclasses define ``exact``, ``initial`` (u(x, 0)), ``residual`` and the kind
    of boundary condition: ``"periodic"`` (u(x_lo, t) = u(x_hi, t)) or
    ``"dirichlet"`` (u = exact at both ends, here 0). ``initial_velocity`` is
    True when the PDE is second order in time and u_t(x, 0) is imposed too.
    """

    name: str = ""
    x_range: tuple[float, float] = (0.0, 1.0)
    t_range: tuple[float, float] = (0.0, 1.0)
    boundary: str = "periodic"
    initial_velocity: bool = False
    params: dict = field(default_factory=dict)

    def exact(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        return self.exact(x, torch.zeros_like(x))

    def residual(self, u: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Convection(PDE):
    name: str = "convection"
    x_range: tuple[float, float] = (0.0, 2 * math.pi)
    params: dict = field(default_factory=lambda: {"beta": 50.0})

    def exact(self, x, t):
        return torch.sin(x - self.params["beta"] * t)

    def residual(self, u, x, t):
        u_x, u_t = grads(u, x, t)
        return u_t + self.params["beta"] * u_x

    def describe(self):
        return f"u_t + {self.params['beta']:g} u_x = 0, u(x,0) = sin x, periodic, x in [0, 2pi], t in [0, 1]"


@dataclass(frozen=True)
class Reaction(PDE):
    name: str = "reaction"
    x_range: tuple[float, float] = (0.0, 2 * math.pi)
    params: dict = field(default_factory=lambda: {"rho": 5.0})

    @staticmethod
    def _h(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((x - math.pi) ** 2) / (2 * (math.pi / 4) ** 2))

    def exact(self, x, t):
        h = self._h(x)
        g = h * torch.exp(self.params["rho"] * t)
        return g / (g + 1 - h)

    def initial(self, x):
        return self._h(x)

    def residual(self, u, x, t):
        return d(u, t) - self.params["rho"] * u * (1 - u)

    def describe(self):
        return (
            f"u_t - {self.params['rho']:g} u(1-u) = 0, u(x,0) = exp(-(x-pi)^2 / (2 (pi/4)^2)), "
            "periodic, x in [0, 2pi], t in [0, 1]"
        )


@dataclass(frozen=True)
class Wave(PDE):
    name: str = "wave"
    boundary: str = "dirichlet"
    initial_velocity: bool = True
    params: dict = field(default_factory=lambda: {"c": 2.0, "beta": 3.0})

    def exact(self, x, t):
        c, b = self.params["c"], self.params["beta"]
        return torch.sin(math.pi * x) * torch.cos(c * math.pi * t) + 0.5 * torch.sin(b * math.pi * x) * torch.cos(
            c * b * math.pi * t
        )

    def residual(self, u, x, t):
        u_x, u_t = grads(u, x, t)
        return d(u_t, t) - self.params["c"] ** 2 * d(u_x, x)

    def describe(self):
        c, b = self.params["c"], self.params["beta"]
        return (
            f"u_tt - {c * c:g} u_xx = 0, u(x,0) = sin(pi x) + 0.5 sin({b:g} pi x), u_t(x,0) = 0, "
            "u(0,t) = u(1,t) = 0, x in [0, 1], t in [0, 1]"
        )


PDES: dict[str, type[PDE]] = {"convection": Convection, "reaction": Reaction, "wave": Wave}


def get_pde(name: str, params: dict | None = None) -> PDE:
    """The PDE ``name`` with its published coefficients, updated by ``params`` (e.g. {"beta": 30})."""
    if name not in PDES:
        raise ValueError(f"unknown PDE {name!r}; choose one of {sorted(PDES)}")
    cls = PDES[name]
    defaults = cls().params
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for PDE {name!r}; its parameters are "
            + ", ".join(f"{k} (default {v:g})" for k, v in defaults.items())
        )
    merged = dict(defaults)
    for k, v in params.items():
        try:
            merged[k] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"PDE parameter {k!r} must be a number, got {v!r}") from None
    return cls(params=merged)
