"""Norm diagnostics: the Frobenius norm of the attention matrix and of its Jacobian.

The paper's argument is about two numbers per attention matrix A = phi(S):

* ``||A||_F``, and
* ``||dA/dS||_F``, the Frobenius norm of the Jacobian of the map S -> A
  (Theorem 4.1 bounds both for softmax by sqrt(N) and 2 sqrt(N)).

:func:`attention_norms` computes both in O(Nq * Nk) time and memory, never
materialising the (Nq Nk) x (Nq Nk) Jacobian; :class:`NormRecorder` records
them per layer and head while a model trains.

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

from collections.abc import Callable

import torch
import torch.nn as nn

from .activations import Activation, ActivationLike, get_activation
from .backends.reference import attention_weights
from .functional import compute_dtype
from .masking import combine_masks, valid_key_counts

__all__ = ["NormRecorder", "attention_norms", "find_attention_modules"]


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

    Masked entries of ``a`` are 0 and so drop out of every sum; an empty row
    (all zeros) contributes 0.
    """
    idx = a.argmax(dim=-1, keepdim=True)
    is_max = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)
    rest = torch.where(is_max, torch.zeros_like(a), a)  # the row without its largest entry
    a2 = a.square()
    s2 = a2.sum(dim=-1, keepdim=True)
    one_minus_a = torch.where(is_max, rest.sum(dim=-1, keepdim=True), 1.0 - a)
    s2_minus_a2 = torch.where(is_max, rest.square().sum(dim=-1, keepdim=True), s2 - a2)
    per_entry = a2 * (one_minus_a.square() + s2_minus_a2)
    return per_entry.sum(dim=(-2, -1)).clamp_min(0).sqrt()


def _elementwise_jacobian_fro(
    scores: torch.Tensor, act: Activation, mask: torch.Tensor | None
) -> torch.Tensor:
    """||diag(phi'(S) / c)||_F on allowed entries: the Jacobian of an elementwise phi is diagonal."""
    if mask is None:
        deriv = act.base_derivative(scores)
        n: torch.Tensor | int = scores.shape[-1]
    else:
        # Masked scores are replaced by 0 before phi' (as attention_weights does
        # before phi) so exp of a huge masked score cannot overflow.
        safe = torch.where(mask, scores, torch.zeros_like(scores))
        deriv = torch.where(mask, act.base_derivative(safe), torch.zeros_like(safe))
        n = valid_key_counts(mask, scores.shape).to(scores.dtype)
    if act.divisor is not None:
        deriv = deriv / act.divisor_value(n)
    return _frobenius(deriv)


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

    a = attention_weights(s, act, mask)
    fro = _frobenius(a)
    jac = _softmax_jacobian_fro(a) if act.is_softmax else _elementwise_jacobian_fro(s, act, mask)
    return fro, jac


# --------------------------------------------------------------------------- #
# NormRecorder
# --------------------------------------------------------------------------- #
def _has_activation(module: nn.Module) -> bool:
    return hasattr(module, "_activation") or hasattr(module, "activation")


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module, in ``model.modules()`` order.

    An attention module is one with an ``attention_observers`` list and an
    ``activation`` (or ``_activation``) attribute: :class:`PolyAttention`, and
    any patched third-party attention that follows the same protocol.
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "attention_observers", None), list) and _has_activation(m)
    ]


def _module_activation(module: nn.Module) -> Activation:
    act = getattr(module, "activation", None)
    if act is None:
        act = module._activation
    return get_activation(act)


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
        cd = compute_dtype(q.dtype)
        q, k = q.detach().to(cd), k.detach().to(cd)
        if scale is None:
            scale = q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        if bias is not None:
            scores = scores + bias.detach().to(cd)
        fro, jac = attention_norms(scores, _module_activation(module), attn_mask, causal)
        if fro.dim() <= 1:  # no head dimension: one "head"
            return fro.mean().reshape(1), jac.mean().reshape(1)
        # q is (B, H, N, hd): norms are (B, H); average every leading dim but the heads.
        lead = tuple(range(fro.dim() - 1))
        return fro.mean(dim=lead), jac.mean(dim=lead)


class NormRecorder:
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
        self.model = model
        self.every = every
        self.layers = find_attention_modules(model)
        if not self.layers:
            raise ValueError(
                "NormRecorder found no attention module in the model: it needs PolyAttention layers "
                "(or modules with an `attention_observers` list and an `activation` attribute, such as "
                "timm attention patched by polyattn)"
            )
        self.rows: list[dict] = []
        self._step = 0
        self._active = True
        self._done: set[int] = set()
        self._hooks: list[tuple[nn.Module, Callable]] = []

    # --- lifecycle -----------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self) -> NormRecorder:
        """Add one observer to every attention module (idempotent)."""
        if self._hooks:
            return self
        for index, (name, module) in enumerate(self.layers):
            fn = self._make_observer(index, name)
            module.attention_observers.append(fn)
            self._hooks.append((module, fn))
        return self

    def detach(self) -> None:
        """Remove this recorder's observers; recorded rows stay available."""
        for module, fn in self._hooks:
            # Identity, not equality: another recorder's observer must stay.
            module.attention_observers[:] = [f for f in module.attention_observers if f is not fn]
        self._hooks = []

    def __enter__(self) -> NormRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

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
