"""Attention activations and the spec strings that name them.

A spec string mirrors the paper's notation and means the same thing in the
Python API, in config files and on the command line:

    softmax
    x^P, x                  integer powers (x = x^1)
    relu, elu, gelu, tanh, exp, sigmoid
    <any of the above but softmax>/C          constant divisor, e.g. x^3/14
    <any of the above but softmax>/sqrt(N)    dynamic divisor
    <any of the above but softmax>/N          dynamic divisor
    sigmoid-log(N)          sigmoid(S - log N): sigmoid attention's bias as part of the spec

N is the number of keys the query row may attend once masks and causality are
applied, so a padded batch is scaled per row and per example.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Activation",
    "get_activation",
    "list_activations",
    "ActivationLike",
]

_ELEMENTWISE = ("relu", "elu", "gelu", "tanh", "exp", "sigmoid")

# Largest power x^P accepted. Backends compute in fp32 (max 3.4e38), and scores
# |s| near 40 do occur (see functional.compute_dtype): 40^16 ~ 4e25 leaves 1e12
# of headroom for summing N keys times the values, while 40^24 ~ 3e38 is
# already fp32's maximum and x^32 overflows from |s| = 16. The paper uses P <= 3;
# higher powers only shrink the range of scores that stay finite.
MAX_POWER = 16
# Accepted constant divisors C (phi(S) / C). C only rescales A's rows, so six
# decades either way of 1 cover every useful value: the paper's 14-64, and as
# much as /N divides by at a million keys. Inside the range the largest x^16
# weight times a million keys (40^16 / 1e-6 * 1e6 ~ 4e37) still fits fp32;
# outside it C is a typo: 1e-300 is 0 in fp32 (1/C = inf, NaN outputs) and
# 1/1e300 is 0 (every weight and output 0).
MIN_DIVISOR, MAX_DIVISOR = 1e-6, 1e6

_FORMS = (
    ("softmax", "row-normalised exponential (masked keys excluded from the sum)"),
    ("x^P", f"integer power 1 <= P <= {MAX_POWER}, e.g. x^3; 'x' is x^1"),
    ("relu", "max(x, 0)"),
    ("elu", "ELU with alpha = 1"),
    ("gelu", "GELU, exact erf form"),
    ("tanh", "hyperbolic tangent"),
    ("exp", "e^x with no row normalisation"),
    ("sigmoid", "logistic sigmoid"),
    ("<phi>/C", f"divide by a constant C in [{MIN_DIVISOR:g}, {MAX_DIVISOR:g}], e.g. x^3/14"),
    ("<phi>/sqrt(N)", "divide by sqrt of the number of keys the row may attend"),
    ("<phi>/N", "divide by the number of keys the row may attend, e.g. relu/N"),
    ("sigmoid-log(N)", "sigmoid(S - log N), N the keys the row may attend (sigmoid attention)"),
)


def list_activations() -> list[str]:
    """The accepted spec forms, one per entry, with a short meaning."""
    return [f"{form:<14} {meaning}" for form, meaning in _FORMS]


def _forms_help() -> str:
    return "accepted forms:\n  " + "\n  ".join(list_activations())


def _fmt_number(c: float) -> str:
    return f"{c:g}"


def _gelu_derivative(s: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(s / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * s * s) / math.sqrt(2.0 * math.pi)
    return cdf + s * pdf


def _tanh_derivative(s: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(s)
    return 1.0 - t * t


def _sigmoid_derivative(s: torch.Tensor) -> torch.Tensor:
    g = torch.sigmoid(s)
    return g * (1.0 - g)


# The named elementwise activations: (phi, d phi / d s in closed form, as the backends' backward uses it).
_NAMED: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "relu": (F.relu, lambda s: (s > 0).to(s.dtype)),
    "elu": (F.elu, lambda s: torch.where(s > 0, torch.ones_like(s), torch.exp(s))),
    "gelu": (F.gelu, _gelu_derivative),
    "tanh": (torch.tanh, _tanh_derivative),
    "exp": (torch.exp, torch.exp),
    "sigmoid": (torch.sigmoid, _sigmoid_derivative),
}


@dataclass(frozen=True)
class Activation:
    """One attention activation phi, applied to the score matrix S.

    ``kind`` is ``"softmax"``, ``"power"`` or one of the elementwise names;
    ``power`` is set for ``"power"``; ``divisor`` is ``None``, ``"const"``,
    ``"sqrt(N)"`` or ``"N"``, with ``constant`` holding C for ``"const"``;
    ``shift`` is ``None`` or ``"log(N)"`` (phi(S - log N), sigmoid only, no divisor).
    """

    kind: str
    power: int = 1
    divisor: str | None = None
    constant: float = 1.0
    shift: str | None = None

    def __post_init__(self) -> None:
        # Activations built directly, not parsed, get the same limits as spec strings.
        if self.kind == "power" and not 1 <= self.power <= MAX_POWER:
            raise ValueError(f"Activation power must be in 1..{MAX_POWER}, got {self.power}")
        if self.shift is not None and (self.shift != "log(N)" or self.kind != "sigmoid" or self.divisor is not None):
            raise ValueError(f"Activation shift 'log(N)' is defined for sigmoid without a divisor, got {self!r}")
        if self.divisor == "const" and not MIN_DIVISOR <= self.constant <= MAX_DIVISOR:
            raise ValueError(
                f"Activation constant divisor must be in [{MIN_DIVISOR:g}, {MAX_DIVISOR:g}], got {self.constant!r}"
            )

    # --- naming -----------------------------------------------------------
    @property
    def spec(self) -> str:
        """The canonical spec string; ``get_activation(a.spec) == a``."""
        if self.kind == "softmax":
            return "softmax"
        base = self.kind
        if self.kind == "power":
            base = "x" if self.power == 1 else f"x^{self.power}"
        if self.shift is not None:
            return f"{base}-{self.shift}"
        if self.divisor is None:
            return base
        if self.divisor == "const":
            return f"{base}/{_fmt_number(self.constant)}"
        return f"{base}/{self.divisor}"

    @property
    def slug(self) -> str:
        """The spec as a file or directory name: ``x^3/sqrt(N)`` -> ``x3_divsqrtN``, ``x/0.5`` -> ``x_div0p5``."""
        text = self.spec.replace("^", "").replace("/", "_div").replace("-", "_minus")
        return text.replace("(", "").replace(")", "").replace(".", "p")

    def __str__(self) -> str:
        return self.spec

    # --- properties used by backends and diagnostics ----------------------
    @property
    def is_softmax(self) -> bool:
        return self.kind == "softmax"

    @property
    def is_elementwise(self) -> bool:
        return self.kind != "softmax"

    @property
    def is_polynomial(self) -> bool:
        return self.kind == "power"

    @property
    def is_dynamic(self) -> bool:
        """True when the divisor or shift depends on the number of attendable keys."""
        return self.divisor in ("sqrt(N)", "N") or self.shift is not None

    def unshifted(self) -> Activation:
        """phi without its -log(N) shift: what a backend computes once the shift is a per-row bias."""
        return Activation(self.kind, self.power, self.divisor, self.constant)

    def shift_value(self, n: torch.Tensor | float) -> torch.Tensor | float:
        """What is subtracted from S before phi, for rows that may attend n keys (0 without a shift)."""
        if self.shift is None:
            return 0.0
        if isinstance(n, torch.Tensor):
            return n.clamp_min(1).log()
        return math.log(max(float(n), 1.0))

    # --- maths --------------------------------------------------------------
    def divisor_value(self, n: torch.Tensor | float) -> torch.Tensor | float:
        """The number phi(S) is divided by, for rows that may attend n keys.

        n is clamped to at least 1 so that fully masked rows (whose weights are
        zeroed anyway) never produce inf or NaN, not even in gradients.
        """
        if self.divisor is None:
            return 1.0
        if self.divisor == "const":
            return self.constant
        if isinstance(n, torch.Tensor):
            n = n.clamp_min(1)
            return n.sqrt() if self.divisor == "sqrt(N)" else n
        n = max(float(n), 1.0)
        return math.sqrt(n) if self.divisor == "sqrt(N)" else n

    def base(self, s: torch.Tensor) -> torch.Tensor:
        """phi without its divisor, elementwise. Not defined for softmax."""
        if self.kind == "power":
            return s if self.power == 1 else s.pow(self.power)
        return self._named()[0](s)

    def base_derivative(self, s: torch.Tensor) -> torch.Tensor:
        """d phi / d s without the divisor, elementwise, in closed form."""
        if self.kind == "power":
            p = self.power
            return torch.ones_like(s) if p == 1 else p * s.pow(p - 1)
        return self._named()[1](s)

    def _named(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        if self.kind not in _NAMED:
            raise ValueError(f"activation {self.spec!r} is not elementwise")
        return _NAMED[self.kind]

    def __call__(self, s: torch.Tensor, n: torch.Tensor | float | None = None) -> torch.Tensor:
        """phi(S) for an elementwise activation; n = attendable keys per row.

        Without masks n is the last dimension of S. Masking is not applied
        here: that is :func:`polyattn.attention`'s job.
        """
        return self._shifted_scaled(self.base, s, n)

    def derivative(self, s: torch.Tensor, n: torch.Tensor | float | None = None) -> torch.Tensor:
        """d phi(S) / d S elementwise, shift and divisor included (n as in ``__call__``)."""
        return self._shifted_scaled(self.base_derivative, s, n)

    def _shifted_scaled(
        self, fn: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor, n: torch.Tensor | float | None
    ) -> torch.Tensor:
        # phi and phi' both read the shifted score and are divided by the same divisor.
        if n is None:
            n = s.shape[-1]
        out = fn(s - self.shift_value(n) if self.shift is not None else s)
        if self.divisor is not None:
            out = out / self.divisor_value(n)
        return out


ActivationLike = str | Activation

_DIV_RE = re.compile(r"^(?P<base>[a-z0-9^.+-]+?)(?:/(?P<div>.+))?$")


def _parse_number(text: str, spec: str) -> float:
    try:
        c = float(text)
    except ValueError:
        raise ValueError(
            f"bad activation spec {spec!r}: divisor {text!r} is not a number, 'sqrt(N)' or 'N'.\n" + _forms_help()
        ) from None
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"bad activation spec {spec!r}: the divisor must be a finite positive number, got {text!r}")
    if not MIN_DIVISOR <= c <= MAX_DIVISOR:
        effect = "overflow to inf/NaN" if c < MIN_DIVISOR else "underflow towards 0"
        raise ValueError(
            f"bad activation spec {spec!r}: the constant divisor {text} is outside "
            f"[{MIN_DIVISOR:g}, {MAX_DIVISOR:g}]; attention weights phi(S)/{text} would {effect} in fp32. "
            "Use a divisor in that range (e.g. x^3/14), or /sqrt(N) or /N to scale with the number of keys"
        )
    return c


def get_activation(spec: ActivationLike) -> Activation:
    """Parse a spec string (or pass an :class:`Activation` through).

    Whitespace and letter case are ignored: ``"X^3 / sqrt(n)"`` is
    ``"x^3/sqrt(N)"``. A malformed spec raises ValueError listing the forms.
    """
    if isinstance(spec, Activation):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"activation must be a spec string such as 'x^3/sqrt(N)' or an Activation, got {type(spec).__name__}"
        )
    text = re.sub(r"\s+", "", spec).lower()
    if "-log" in text:
        return _shifted(text, spec)
    m = _DIV_RE.match(text)
    if not text or m is None:
        raise ValueError(f"bad activation spec {spec!r}.\n" + _forms_help())
    base, div = m.group("base"), m.group("div")

    if base == "softmax":
        if div is not None:
            raise ValueError(
                f"bad activation spec {spec!r}: softmax takes no divisor (its rows already sum to 1). Use 'softmax'."
            )
        return Activation("softmax")

    if base == "x":
        kind, power = "power", 1
    elif base.startswith("x^"):
        digits = base[2:]
        if not digits.isdigit() or int(digits) < 1:
            raise ValueError(
                f"bad activation spec {spec!r}: the power in x^P must be a positive integer, "
                f"got {digits!r}.\n" + _forms_help()
            )
        if int(digits) > MAX_POWER:
            raise ValueError(
                f"bad activation spec {spec!r}: the power {int(digits)} is above the maximum {MAX_POWER}; "
                f"x^{int(digits)} overflows fp32 (max 3.4e38) once |score| > {3.4e38 ** (1 / int(digits)):.3g} "
                f"and gives inf/NaN. Use a power in 1..{MAX_POWER} (the paper uses x^3)"
            )
        kind, power = "power", int(digits)
    elif base in _ELEMENTWISE:
        kind, power = base, 1
    else:
        raise ValueError(f"bad activation spec {spec!r}: unknown activation {base!r}.\n" + _forms_help())

    if div is None:
        return Activation(kind, power)
    if div == "sqrt(n)":
        return Activation(kind, power, "sqrt(N)")
    if div == "n":
        return Activation(kind, power, "N")
    return Activation(kind, power, "const", _parse_number(div, spec))


def _shifted(text: str, spec: str) -> Activation:
    """``sigmoid-log(N)``: the one shifted form (sigmoid attention's b = -log N)."""
    if text == "sigmoid-log(n)":
        return Activation("sigmoid", shift="log(N)")
    base, _, rest = text.partition("-log")
    if base != "sigmoid":
        raise ValueError(
            f"bad activation spec {spec!r}: the -log(N) shift is defined for sigmoid only ('sigmoid-log(N)'); "
            f"for {base!r} use a divisor such as /N.\n" + _forms_help()
        )
    raise ValueError(
        f"bad activation spec {spec!r}: write the shift as 'sigmoid-log(N)' (N = keys the row may attend; "
        "it takes no divisor).\n" + _forms_help()
    )
