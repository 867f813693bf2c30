"""Transformer PINN in the style of PINNsFormer (Zhao, Ding and Prakash, 2023), on polyattn attention.

Each (x, t) point becomes a pseudo-sequence of k copies shifted in time,
(x, t), (x, t + dt), ..., (x, t + (k-1) dt) (published: k = 5, dt = 1e-4). A
linear spatio-temporal mixer embeds every token; an encoder of self-attention
layers and a decoder of cross-attention layers (queries: the embedded
sequence, keys and values: the encoder output) process it; a wavelet MLP
head maps each token to u. Token 0 is the prediction u(x, t).

The wavelet activation is ``w1 sin(x) + w2 cos(x)`` with learnable w1, w2
(both start at 1). Attention is :class:`polyattn.PolyAttention`, so the
attention activation is a spec string such as ``"softmax"`` or
``"x^3/sqrt(N)"``; here N is the pseudo-sequence length k.

:class:`MLPPINN` is the plain tanh MLP PINN baseline. Both models take x and t
of shape (P, k, 1) and return (P, k, d_out); the MLP has k = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.activations import ActivationLike
from ..core.layers import PolyAttention
from ..core.module import set_activation
from . import _checks

__all__ = [
    "MLPPINN",
    "PINNsFormer",
    "PINN_MODELS",
    "Wavelet",
    "WaveletMLP",
    "build_pinn_model",
    "init_pinn_weights",
    "pseudo_sequence",
]


class Wavelet(nn.Module):
    """``w1 * sin(x) + w2 * cos(x)``, one learnable pair per module."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.ones(1))
        self.w2 = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1 * torch.sin(x) + self.w2 * torch.cos(x)


class WaveletMLP(nn.Sequential):
    """Linear -> Wavelet -> Linear -> Wavelet -> Linear (the feed-forward block and the output head)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__(
            nn.Linear(d_in, d_hidden),
            Wavelet(),
            nn.Linear(d_hidden, d_hidden),
            Wavelet(),
            nn.Linear(d_hidden, d_out),
        )


class EncoderLayer(nn.Module):
    """Pre-activation residual block: x + attn(wav(x)), then x + ff(wav(x))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, activation: ActivationLike) -> None:
        super().__init__()
        self.act1 = Wavelet()
        self.attn = PolyAttention(d_model, num_heads, activation=activation)
        self.act2 = Wavelet()
        self.ff = WaveletMLP(d_model, d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.act1(x))
        return x + self.ff(self.act2(x))


class DecoderLayer(EncoderLayer):
    """Like :class:`EncoderLayer`, but the attention takes keys and values from the encoder output."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.attn(self.act1(x), context=memory)
        return x + self.ff(self.act2(x))


def _check_xt(x: torch.Tensor, t: torch.Tensor) -> None:
    if x.shape != t.shape or x.dim() != 3 or x.shape[-1] != 1:
        raise ValueError(
            f"x and t must both have shape (P, k, 1) (P points, k tokens), got {tuple(x.shape)} "
            f"and {tuple(t.shape)}; build them with pseudo_sequence(x, t, k, dt)"
        )


class PINNsFormer(nn.Module):
    """Encoder-decoder transformer PINN; defaults are the published sizes (453k parameters at softmax).

    Args:
        activation: attention activation spec (``"softmax"``, ``"x^3/sqrt(N)"``, ...).
        d_model: token width after the spatio-temporal mixer (published 32).
        d_ff: hidden width of each layer's wavelet feed-forward block (256).
        d_hidden: hidden width of the wavelet output head (512).
        num_layers: encoder layers = decoder layers (1).
        num_heads: attention heads (2).
        seq_len, seq_step: pseudo-sequence length k and time shift dt (5, 1e-4);
            stored here so callers build inputs with the model's own values.
        d_out: solution components (1).
    """

    def __init__(
        self,
        activation: ActivationLike = "softmax",
        d_model: int = 32,
        d_ff: int = 256,
        d_hidden: int = 512,
        num_layers: int = 1,
        num_heads: int = 2,
        seq_len: int = 5,
        seq_step: float = 1e-4,
        d_out: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len (the pseudo-sequence length k) must be >= 1, got {seq_len!r}")
        for name, value in (
            ("d_model", d_model),
            ("d_ff", d_ff),
            ("d_hidden", d_hidden),
            ("num_layers", num_layers),
            ("d_out", d_out),
        ):
            _checks.positive_int(name, value)
        _checks.heads("d_model", d_model, num_heads)
        if isinstance(seq_step, bool) or not isinstance(seq_step, (int, float)) or not math.isfinite(seq_step):
            raise ValueError(f"seq_step (the time shift dt) must be a finite number, got {seq_step!r}")
        self.seq_len = int(seq_len)
        self.seq_step = float(seq_step)
        self.mixer = nn.Linear(2, d_model)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, num_heads, d_ff, activation) for _ in range(num_layers))
        self.encoder_act = Wavelet()
        self.decoder = nn.ModuleList(DecoderLayer(d_model, num_heads, d_ff, activation) for _ in range(num_layers))
        self.decoder_act = Wavelet()
        self.head = WaveletMLP(d_model, d_hidden, d_out)
        for m in self.attention_layers():
            # PDE residuals differentiate through attention two or three times
            # (u_tt, then the parameter gradient); the reference backend is plain
            # autograd ops, which supports any order.
            m.backend = "reference"

    def attention_layers(self) -> list[PolyAttention]:
        return [m for m in self.modules() if isinstance(m, PolyAttention)]

    @property
    def activation(self) -> str:
        return self.attention_layers()[0].activation.spec

    @activation.setter
    def activation(self, spec: ActivationLike) -> None:
        set_activation(self, spec)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x, t (P, k, 1) -> u (P, k, d_out)."""
        _check_xt(x, t)
        src = self.mixer(torch.cat((x, t), dim=-1))
        memory = src
        for layer in self.encoder:
            memory = layer(memory)
        memory = self.encoder_act(memory)
        out = src
        for layer in self.decoder:
            out = layer(out, memory)
        return self.head(self.decoder_act(out))


class MLPPINN(nn.Module):
    """The plain PINN: a tanh MLP on (x, t) (published baseline: 4 linear layers of width 512).

    ``num_layers`` counts the linear layers. The input is a sequence of length
    ``seq_len = 1``, so it is called exactly like :class:`PINNsFormer`.
    """

    seq_len = 1
    seq_step = 0.0

    def __init__(self, hidden: int = 512, num_layers: int = 4, d_out: int = 1) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(f"num_layers (linear layers) must be >= 2, got {num_layers!r}")
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("d_out", d_out)
        layers: list[nn.Module] = [nn.Linear(2, hidden), nn.Tanh()]
        for _ in range(num_layers - 2):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        layers.append(nn.Linear(hidden, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x, t (P, 1, 1) -> u (P, 1, d_out); any (P, k, 1) works, each token on its own."""
        _check_xt(x, t)
        return self.net(torch.cat((x, t), dim=-1))


def pseudo_sequence(
    x: torch.Tensor, t: torch.Tensor, seq_len: int, seq_step: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points x, t of shape (P,) -> (P, k, 1) each, token i at time t + i * dt."""
    if x.shape != t.shape or x.dim() != 1:
        raise ValueError(f"x and t must both have shape (P,), got {tuple(x.shape)} and {tuple(t.shape)}")
    shifts = torch.arange(seq_len, dtype=t.dtype, device=t.device) * seq_step
    xs = x[:, None].expand(-1, seq_len)
    ts = t[:, None] + shifts[None, :]
    return xs.unsqueeze(-1).contiguous(), ts.unsqueeze(-1).contiguous()


def init_pinn_weights(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights and biases of 0.01 on every Linear layer, as in the published code."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.01)
    return model


from ..utils.registry import Registry  # noqa: E402  (TODO: join the imports at the top)

# name -> builder(activation, **sizes). Keyword names are those of the classes.
PINN_MODELS = Registry("PINN model")


@PINN_MODELS.register("pinnsformer")
def _pinnsformer(activation: ActivationLike = "softmax", **kw) -> nn.Module:
    return PINNsFormer(activation=activation, **kw)


@PINN_MODELS.register("mlp")
def _mlp(activation: ActivationLike = "softmax", **kw) -> nn.Module:
    # The MLP has no attention; the activation is accepted so both builders share a signature.
    return MLPPINN(**kw)


def build_pinn_model(name: str, activation: ActivationLike = "softmax", **kwargs) -> nn.Module:
    """A PINN model by name (``"pinnsformer"`` or ``"mlp"``), initialised as published."""
    builder = PINN_MODELS.get(name)
    try:
        model = builder(activation, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad size arguments for PINN model {name!r}: {e}") from None
    return init_pinn_weights(model)
