"""Diagnostics of attention: the norms of the attention matrix and of its Jacobian, and the matrix itself.

The paper's argument is about two numbers per attention matrix A = phi(S):

* ``||A||_F``, and
* ``||dA/dS||_F``, the Frobenius norm of the Jacobian of the map S -> A
  (Theorem 4.1 bounds both for softmax by sqrt(N) and 2 sqrt(N)).

:func:`attention_norms` computes both in O(Nq * Nk) time and memory, never
materialising the (Nq Nk) x (Nq Nk) Jacobian; :class:`NormRecorder` records
them per layer and head while a model trains. :class:`AttentionMapRecorder`
records A itself (the paper's heat maps and class-token maps), from any model
whose attention follows the protocol of :mod:`polyattn.core.module`.

Closed forms (rows i, allowed keys j; masked entries neither vary nor count):

* elementwise phi with divisor c_i (1, C, sqrt(N_i) or N_i; dynamic divisors
  are constants of S): the Jacobian is diagonal, dA_ij/dS_ij = phi'(S_ij) / c_i.
* softmax: each row has Jacobian J = diag(a) - a a^T, and
  ``||J||_F^2 = sum_j a_j^2 (1 - a_j)^2 + sum_j a_j^2 (s2 - a_j^2)`` with
  s2 = sum_k a_k^2. For the row's largest entry, 1 - a_j and s2 - a_j^2 are
  formed as sums over the other entries: when a row is nearly one-hot the
  plain differences would cancel to rounding noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn as nn

from .activations import Activation, ActivationLike, get_activation
from .backends.reference import attention_weights
from .functional import compute_dtype
from .masking import combine_masks, valid_key_counts
from .module import attention_modules, module_activation

__all__ = ["AttentionMapRecorder", "NormRecorder", "attention_norms", "observed_attention_weights"]


# --------------------------------------------------------------------------- #
# attention_norms
# --------------------------------------------------------------------------- #
def _check_scores_and_mask(scores: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor of shape (..., Nq, Nk), got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.dim() < 2:
        raise ValueError(f"scores must have shape (..., Nq, Nk), got {tuple(scores.shape)}")
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        got = attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise TypeError(f"attn_mask must be a bool tensor (True = may attend) or None, got {got}")
    ok = attn_mask.dim() <= scores.dim()
    if ok:
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, scores.shape) == scores.shape
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the score shape "
            f"{tuple(scores.shape)} (..., Nq, Nk)"
        )


def _frobenius(t: torch.Tensor) -> torch.Tensor:
    """||t||_F over the last two dimensions, scaled by the largest entry so the
    sum of squares cannot overflow before the square root (x^3 of a diverging
    model reaches 1e18 long before its norm leaves the fp32 range)."""
    m = t.detach().abs().amax(dim=(-2, -1), keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return (t / m).square().sum(dim=(-2, -1)).sqrt() * m[..., 0, 0]


def _softmax_jacobian_fro(a: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the Jacobian of row-wise softmax, from A alone.

    Per row, with m the largest entry and r, q, t the sums of the other entries, their squares and
    their cubes (so 1 - m = r and sum a^2 = m^2 + q, without the cancellation of 1 - m when the row
    is nearly one-hot): ``||J||_F^2 = m^2 (r^2 + q) + q (1 + m^2 + q) - 2 t``, the closed form above
    summed out. Masked entries of ``a`` are 0 and so drop out of every sum; an empty row
    (all zeros) contributes 0.
    """
    m, idx = a.max(dim=-1, keepdim=True)
    rest = a.scatter(-1, idx, 0.0)  # the row without its largest entry
    r = rest.sum(dim=-1, keepdim=True)
    rest2 = rest.square()
    q = rest2.sum(dim=-1, keepdim=True)
    t = (rest2 * rest).sum(dim=-1, keepdim=True)
    m2 = m.square()
    per_row = m2 * (r.square() + q) + q * (1.0 + m2 + q) - 2.0 * t
    return per_row.sum(dim=(-2, -1)).clamp_min(0).sqrt()


def _elementwise_jacobian_fro(scores: torch.Tensor, act: Activation, mask: torch.Tensor | None) -> torch.Tensor:
    """||diag(phi'(S) / c)||_F on allowed entries: the Jacobian of an elementwise phi is diagonal."""
    if mask is None:
        return _frobenius(act.derivative(scores, scores.shape[-1]))
    # Masked scores are replaced by 0 before phi' (as attention_weights does
    # before phi) so exp of a huge masked score cannot overflow.
    safe = torch.where(mask, scores, torch.zeros_like(scores))
    n = valid_key_counts(mask, scores.shape).to(scores.dtype)
    return _frobenius(torch.where(mask, act.derivative(safe, n), torch.zeros_like(safe)))


def attention_norms(
    scores: torch.Tensor,
    activation: ActivationLike,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||A||_F, ||dA/dS||_F)`` for the attention matrix A = phi(S) that
    :func:`polyattn.attention` builds from the scores S.

    ``scores`` is S of shape (..., Nq, Nk) (already scaled and biased); both
    results have shape ``scores.shape[:-2]``. ``attn_mask`` (bool, True = may
    attend, broadcastable to S) and ``causal`` follow :func:`polyattn.attention`:
    masked entries of A are 0 and do not vary, and in ``/sqrt(N)`` and ``/N``
    N counts the keys each row may attend, a constant of S.

    The Jacobian norm is the quantity bounded by 2 sqrt(N) in the paper's
    Theorem 4.1 (softmax) and plotted in its Figures 3, 5, 12 and 14. Both
    norms are closed forms in O(Nq Nk) time and memory, computed in fp32 for
    fp16/bf16 inputs, and are differentiable.
    """
    act = get_activation(activation)
    _check_scores_and_mask(scores, attn_mask)
    nq, nk = scores.shape[-2], scores.shape[-1]
    mask = combine_masks(attn_mask, causal, nq, nk, scores.device)
    if mask is not None:
        mask = mask.expand(scores.shape)
    s = scores.to(compute_dtype(scores.dtype))

    if mask is None and act.is_polynomial and act.shift is None:
        return _power_norms(s, act)
    a = attention_weights(s, act, mask)
    if act.is_softmax:
        # Softmax weights lie in [0, 1]: their squares cannot overflow, so no scaling is needed.
        return a.square().sum(dim=(-2, -1)).sqrt(), _softmax_jacobian_fro(a)
    return _frobenius(a), _elementwise_jacobian_fro(s, act, mask)


def _power_norms(s: torch.Tensor, act: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """Both norms of A = S^p / c without a mask, from two sums over T = S / max|S| (per matrix):
    ||A||_F = m^p sqrt(sum T^(2p)) / c and ||dA/dS||_F = p m^(p-1) sqrt(sum T^(2p-2)) / c.

    The general path's values to rounding, in about six passes over S instead of fifteen (the norm
    recorder runs this every few training steps); |T| <= 1, so no power can overflow."""
    p = act.power
    nq, nk = s.shape[-2], s.shape[-1]
    c = act.divisor_value(nk)
    lo, hi = torch.aminmax(s.detach().flatten(-2), dim=-1)
    m = torch.maximum(-lo, hi)
    m = torch.where(m > 0, m, torch.ones_like(m))
    t2 = (s / m[..., None, None]).square()
    if p == 1:
        fro2 = t2.sum(dim=(-2, -1))
        jac = torch.full_like(fro2, math.sqrt(nq * nk))
        return fro2.sqrt() * m / c, jac / c
    lower = t2 if p == 2 else t2.pow(p - 1)  # T^(2p-2)
    jac2 = lower.sum(dim=(-2, -1))
    fro2 = torch.einsum("...ij,...ij->...", lower, t2)
    return fro2.sqrt() * m**p / c, jac2.sqrt() * (p * m ** (p - 1)) / c


# --------------------------------------------------------------------------- #
# From an observer call to S
# --------------------------------------------------------------------------- #
def _observed_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """S = scale q k^T + bias as polyattn.attention forms it, from detached copies in the compute dtype."""
    cd = compute_dtype(q.dtype)
    q, k = q.detach().to(cd), k.detach().to(cd)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.detach().to(cd)
    return scores


def head_norms(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-averaged (fro, jac_fro) per head, each of shape (H,), from an observer call."""
    with torch.no_grad():
        scores = _observed_scores(q, k, bias, scale)
        fro, jac = attention_norms(scores, module_activation(module), attn_mask, causal)
        if fro.dim() <= 1:  # no head dimension: one "head"
            return fro.mean().reshape(1), jac.mean().reshape(1)
        # q is (B, H, N, hd): norms are (B, H); average every leading dim but the heads.
        lead = tuple(range(fro.dim() - 1))
        return fro.mean(dim=lead), jac.mean(dim=lead)


def _no_attention_error(recorder: str) -> ValueError:
    return ValueError(
        f"{recorder} found no attention module in the model: it needs PolyAttention layers "
        "(or modules with an `attention_observers` list and an `activation` attribute, such as "
        "timm attention patched by polyattn)"
    )


_R = TypeVar("_R", bound="_Recorder")


class _Recorder:
    """What both recorders share: one observer per recorded attention module, attached and detached
    as a group, and the context-manager protocol."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.model = model
        self.layers = attention_modules(model)
        if not self.layers:
            raise _no_attention_error(kind)
        self._hooks: list[tuple[nn.Module, Callable]] = []

    def _recorded_layers(self) -> list[int]:
        return list(range(len(self.layers)))

    def _make_observer(self, index: int, name: str) -> Callable:
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self: _R) -> _R:
        """Add one observer to every recorded attention module (idempotent)."""
        if self._hooks:
            return self
        for index in self._recorded_layers():
            name, module = self.layers[index]
            fn = self._make_observer(index, name)
            module.attention_observers.append(fn)
            self._hooks.append((module, fn))
        return self

    def detach(self) -> None:
        """Remove this recorder's observers; what it recorded stays available."""
        for module, fn in self._hooks:
            # Identity, not equality: another recorder's observer must stay.
            module.attention_observers[:] = [f for f in module.attention_observers if f is not fn]
        self._hooks = []

    def __enter__(self: _R) -> _R:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


# --------------------------------------------------------------------------- #
# NormRecorder
# --------------------------------------------------------------------------- #
class NormRecorder(_Recorder):
    """Record ||A||_F and ||dA/dS||_F per attention layer and head during training.

    ::

        rec = polyattn.NormRecorder(model, every=50)
        with rec:                      # or rec.attach() ... rec.detach()
            for step, (x, y) in enumerate(loader):
                rec.set_step(step)     # before the training forward
                loss = loss_fn(model(x), y)
                ...
                metrics.extend(rec.pop_rows())

    On a step with ``step % every == 0`` the first forward of each attention
    module is recorded (later forwards in that step, e.g. evaluation, are not);
    on other steps the observer returns at once. Rows are plain dicts
    ``{"step", "layer", "name", "head", "fro", "jac_fro"}`` with the norms
    averaged over the batch; ``layer`` is the 0-based order of the attention
    modules in ``model.modules()``. Model outputs and gradients are unchanged:
    the norms are computed from detached copies under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (record every K steps), got {every!r}")
        super().__init__(model, "NormRecorder")
        self.every = every
        self.rows: list[dict] = []
        self._step = 0
        self._active = True
        self._done: set[int] = set()

    # --- stepping --------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @property
    def recording(self) -> bool:
        """Whether the current step is a recording step."""
        return self._active

    def set_step(self, step: int) -> None:
        """Set the training step; forwards made until the next call count as this step."""
        self._step = int(step)
        self._active = self._step % self.every == 0
        self._done.clear()

    def pop_rows(self) -> list[dict]:
        """The rows recorded since the last call, then cleared."""
        rows, self.rows = self.rows, []
        return rows

    # --- the observer ------------------------------------------------------------
    def _make_observer(self, index: int, name: str) -> Callable:
        def observe(module, q, k, attn_mask, bias, causal, scale) -> None:  # noqa: ANN001
            if not self._active or index in self._done:
                return
            self._done.add(index)
            fro, jac = head_norms(module, q, k, attn_mask, bias, causal, scale)
            for head, (f, j) in enumerate(zip(fro.tolist(), jac.tolist(), strict=True)):
                self.rows.append(
                    {"step": self._step, "layer": index, "name": name, "head": head, "fro": f, "jac_fro": j}
                )

        return observe


# --------------------------------------------------------------------------- #
# Attention maps
# --------------------------------------------------------------------------- #
def _pick(t: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t.index_select(dim, index.to(t.device))


def observed_attention_weights(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    *,
    heads: Sequence[int] | None = None,
    batch: Sequence[int] | None = None,
) -> torch.Tensor:
    """The attention matrix A of one observer call: (B, H, Nq, Nk) for q of shape (B, H, Nq, d).

    A is what :func:`polyattn.attention` applies to v: phi of the scaled, biased
    scores with masked entries exactly 0, computed by the reference backend's
    ``attention_weights`` in the compute dtype (fp32 for fp16/bf16), before
    attention dropout. ``batch`` and ``heads`` select items of the first and
    second dimension before anything is computed. Detached, under no_grad.
    """
    with torch.no_grad():
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        full = (*lead, q.shape[-2], k.shape[-2])
        if heads is not None and len(full) < 4:
            raise ValueError(f"heads given, but the attention of this module has no head dimension: A is {full}")
        if batch is not None and len(full) < 3:
            raise ValueError(f"batch given, but the attention of this module has no batch dimension: A is {full}")
        b_idx = None if batch is None else torch.as_tensor(list(batch), dtype=torch.long)
        h_idx = None if heads is None else torch.as_tensor(list(heads), dtype=torch.long)

        def select(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            # expand() is a view, so only the selected items are ever copied.
            return _pick(_pick(t.expand(shape), 0, b_idx), 1, h_idx)

        q = select(q, (*lead, *q.shape[-2:]))
        k = select(k, (*lead, *k.shape[-2:]))
        scores = _observed_scores(q, k, None if bias is None else select(bias, full), scale)
        mask = combine_masks(attn_mask, causal, full[-2], full[-1], scores.device)
        if mask is not None:
            mask = select(mask, full)
        return attention_weights(scores, module_activation(module), mask)


class AttentionMapRecorder(_Recorder):
    """Record the attention matrices A of chosen layers, heads and batch items.

    ::

        with polyattn.core.AttentionMapRecorder(model, layers=[1, -1], heads=[0]) as rec:
            model(images)
        a = rec.get(-1)            # (B, 1, T, T): A of the last attention layer, head 0

    ``layers`` are 0-based positions in :func:`polyattn.core.attention_modules`
    (negative counts from the end; default all), so it works on every model
    whose attention follows the protocol, timm models after :func:`polyattn.patch`
    included. ``heads`` and ``batch`` select along the first two dimensions of
    A (default all); for Swin the batch dimension holds each image's windows
    in turn. Each forward while attached appends one tensor per recorded layer
    to ``maps[layer]``, computed by :func:`observed_attention_weights` and
    moved to ``device`` (None: left where the attention ran); model outputs
    and gradients are unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        batch: Sequence[int] | None = None,
        device: torch.device | str | None = "cpu",
    ) -> None:
        super().__init__(model, "AttentionMapRecorder")
        n = len(self.layers)
        wanted = range(n) if layers is None else list(layers)
        bad = [i for i in wanted if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {n} attention layers")
        self._wanted = sorted({i % n for i in wanted})
        for name, value in (("heads", heads), ("batch", batch)):
            if value is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
                raise ValueError(f"{name} must be non-negative integer indices, got {list(value)!r}")
        self.heads = None if heads is None else list(heads)
        self.batch = None if batch is None else list(batch)
        self.device = device
        self.maps: dict[int, list[torch.Tensor]] = {i: [] for i in self._wanted}

    def _recorded_layers(self) -> list[int]:
        return self._wanted

    def _make_observer(self, index: int, name: str) -> Callable:
        def observe(module, q, k, attn_mask, bias, causal, scale) -> None:  # noqa: ANN001
            a = observed_attention_weights(
                module, q, k, attn_mask, bias, causal, scale, heads=self.heads, batch=self.batch
            )
            self.maps[index].append(a if self.device is None else a.to(self.device))

        return observe

    def get(self, layer: int) -> torch.Tensor:
        """A of ``layer`` (negative counts from the end) over every recorded forward, joined along the batch."""
        n = len(self.layers)
        index = layer % n if -n <= layer < n else layer
        if index not in self.maps:
            raise ValueError(f"layer {layer} is not recorded; recorded layers: {self._wanted}")
        if not self.maps[index]:
            raise ValueError(f"layer {layer} ({self.layers[index][0]}) has seen no forward while attached")
        return torch.cat(self.maps[index], dim=0)

    def clear(self) -> None:
        """Forget what was recorded."""
        for maps in self.maps.values():
            maps.clear()
