"""Exact recurrent decoding for causal x^p attention: a fixed-size state instead of a KV cache.

For an integer power p, (q . k)^p = <phi_p(q), phi_p(k)> with phi_p the symmetric degree-p features
(F = C(d + p - 1, p) of them, see :func:`polyattn.core.backends.linear.symmetric_features`). Causal
attention's output at position t is then

    out_t = phi(q_t)^T S_t / c(N_t),    S_t = sum_{j <= t, j not padded} phi(k_j) v_j^T,

with c the activation's divisor (1, a constant, sqrt(N) or N) and N_t the number of keys row t may
attend. ``S_t`` is an (F, dv) matrix per head and ``N_t`` a count, so each new token costs O(F dv)
whatever the context length, where a softmax KV cache costs O(t d) and grows by 2 d numbers per
token and head. This is the same function as :func:`polyattn.attention` with ``causal=True``, not an
approximation: the tests compare both in float64.

    state, out = LinearState.prefill(q, k, v, "x^2/sqrt(N)")      # prompt: (B, H, T, d)
    for _ in range(new_tokens):
        y = state.step(q_t, k_t, v_t)                              # one token: (B, H, 1, d)

F grows as d^p / p!: 64 (x) and 2,080 (x^2) features at d = 64, 47,905 for x^3; x and x^2 are the
practical cases, higher powers work but their state outgrows a KV cache until long contexts.
"""

from __future__ import annotations

import math

import torch

from .activations import ActivationLike, get_activation
from .backends.linear import feature_count, symmetric_features
from .functional import compute_dtype

__all__ = ["LinearState"]

_CHUNK = 256  # prompt tokens per step of prefill: bounds the (..., chunk, F) feature buffer


class LinearState:
    """The decoding state of causal x^p attention for a batch of sequences (see the module docstring).

    ``batch_shape`` is the leading shape of q, k and v, e.g. (B, H). Build one with :meth:`prefill`
    (or :meth:`empty`), then call :meth:`step` per generated token or :meth:`extend` for several.
    The state is kept in float32 (float64 for float64 inputs); outputs come back in the input dtype.
    """

    def __init__(
        self,
        activation: ActivationLike,
        batch_shape: tuple[int, ...],
        d: int,
        dv: int,
        *,
        scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        act = get_activation(activation)
        if not act.is_polynomial:
            raise ValueError(
                f"LinearState needs an x^p activation (e.g. 'x^2/sqrt(N)'), got {act.spec!r}: only integer powers "
                "factor into a finite state; decode other activations with a KV cache and polyattn.attention"
            )
        if d < 1 or dv < 1:
            raise ValueError(f"LinearState needs head dimensions d >= 1 and dv >= 1, got d={d}, dv={dv}")
        self.activation = act
        self.d, self.dv = d, dv
        self.scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        self.dtype = compute_dtype(dtype)
        self.features = feature_count(d, act.power)
        self.state = torch.zeros(*batch_shape, self.features, dv, dtype=self.dtype, device=device)
        # Keys attended so far, per sequence (padded prompt positions do not count).
        self.count = torch.zeros(*batch_shape, dtype=self.dtype, device=device)

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        activation: ActivationLike,
        batch_shape: tuple[int, ...],
        d: int,
        dv: int | None = None,
        **kwargs,
    ) -> LinearState:
        """A state before any token: the first :meth:`step` attends to its own key only."""
        return cls(activation, batch_shape, d, d if dv is None else dv, **kwargs)

    @classmethod
    def prefill(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        activation: ActivationLike,
        *,
        key_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[LinearState, torch.Tensor]:
        """(the state after the prompt, the prompt's causal attention output (..., T, dv)).

        ``key_mask`` (broadcastable to (..., T), True = a real token) leaves padded prompt positions
        out of every later row, as ``attn_mask`` does in :func:`polyattn.attention`.
        """
        _check_qkv(q, k, v)
        state = cls(activation, tuple(q.shape[:-2]), q.shape[-1], v.shape[-1], scale=scale, dtype=q.dtype,
                    device=q.device)  # fmt: skip
        return state, state.extend(q, k, v, key_mask=key_mask)

    @classmethod
    def prefill_varlen(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        activation: ActivationLike,
        *,
        scale: float | None = None,
    ) -> tuple[LinearState, torch.Tensor]:
        """One state per document of a packed prompt, and the prompt's causal output (total, H, dv).

        q (total, H, d), k (total, Hk, d), v (total, Hk, dv) and int32 ``cu_seqlens`` (docs + 1,) as in
        :func:`polyattn.attention_varlen` (H a multiple of Hk). The state's batch shape is (docs, H): row i
        continues document i, so :meth:`step` then takes (docs, H, 1, d) with one new token per document.
        An empty document gets an empty state (its first step attends to its own key only).
        """
        from .varlen import _check_tensors, _documents  # varlen imports the backends, decode only its tables

        _check_tensors(q, k, v)
        docs = _documents(q, k, cu_seqlens, None, None, None)
        heads, groups = q.shape[1], q.shape[1] // k.shape[1]
        state = cls(activation, (len(docs), heads), q.shape[2], v.shape[2], scale=scale, dtype=q.dtype,
                    device=q.device)  # fmt: skip
        outs = []
        for i, (a, b, _, _) in enumerate(docs):
            if b == a:
                continue
            # (n, H, d) -> (H, n, d). The state is kept per query head (step takes q, k, v with H heads), so
            # each k/v head is repeated for its group's query heads here, one document at a time.
            qd = q[a:b].transpose(0, 1)
            kd, vd = (t[a:b].transpose(0, 1).repeat_interleave(groups, dim=0) for t in (k, v))
            doc = cls(state.activation, (heads,), q.shape[2], v.shape[2], scale=state.scale, dtype=q.dtype,
                      device=q.device)  # fmt: skip
            outs.append(doc.extend(qd, kd, vd).transpose(0, 1))
            state.state[i] = doc.state
            state.count[i] = doc.count
        out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, heads, v.shape[2])
        return state, out

    # --- advancing -----------------------------------------------------------------------------
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: q, k (..., 1, d) or (..., d), v likewise; returns the same layout."""
        squeeze = q.dim() == self.state.dim() - 1
        if squeeze:
            q, k, v = q.unsqueeze(-2), k.unsqueeze(-2), v.unsqueeze(-2)
        if q.shape[-2] != 1:
            raise ValueError(f"step takes one token, got q of shape {tuple(q.shape)}; use extend for several")
        _check_qkv(q, k, v)
        self._check_fits(q, k, v)
        # extend() for one token, without its in-chunk product and masks: the new key joins the state
        # first, then the query reads it (causal attention includes the token itself).
        p, out_dtype = self.activation.power, q.dtype
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        self.state.add_(symmetric_features(k, p).transpose(-1, -2) @ v)
        self.count.add_(1)
        out = symmetric_features(q * self.scale, p) @ self.state
        div = self.activation.divisor_value(self.count)
        out = (out / div[..., None, None] if isinstance(div, torch.Tensor) else out / div).to(out_dtype)
        return out.squeeze(-2) if squeeze else out

    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Several new tokens at once (causal among themselves and after everything before): (..., T, dv)."""
        _check_qkv(q, k, v)
        self._check_fits(q, k, v)
        out_dtype = q.dtype
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        t_len = q.shape[-2]
        if key_mask is None:
            keep = torch.ones(*self.state.shape[:-2], t_len, dtype=self.dtype, device=q.device)
        else:
            keep = _key_mask(key_mask, (*self.state.shape[:-2], t_len)).to(device=q.device, dtype=self.dtype)
        p = self.activation.power
        outs = []
        for i0 in range(0, t_len, _CHUNK):
            i1 = min(t_len, i0 + _CHUNK)
            qc, kc, m = q[..., i0:i1, :] * self.scale, k[..., i0:i1, :], keep[..., i0:i1]
            vc = v[..., i0:i1, :] * m.unsqueeze(-1)  # a padded key adds nothing to any row
            # Earlier tokens through the state; this chunk's own keys through (q k^T)^p, masked causally.
            earlier = symmetric_features(qc, p) @ self.state
            causal = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=q.device).tril()
            within = torch.where(causal, (qc @ kc.transpose(-1, -2)).pow(p), 0.0) @ vc
            n = self.count.unsqueeze(-1) + m.cumsum(-1)  # keys each row may attend
            div = self.activation.divisor_value(n)
            rows = earlier + within
            outs.append(rows / div.unsqueeze(-1) if isinstance(div, torch.Tensor) else rows / div)
            self.state += symmetric_features(kc, p).transpose(-1, -2) @ vc
            self.count += m.sum(-1)
        return torch.cat(outs, dim=-2).to(out_dtype)

    def absorb(self, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None) -> None:
        """Add keys and values (..., T, d), (..., T, dv) to the state without computing any output.

        For a prompt whose attention was already computed by :func:`polyattn.attention` (e.g. with the
        usual backends, GQA and masks of a transformers model): afterwards the state equals the one
        :meth:`prefill` would build. ``key_mask`` as in :meth:`prefill`.
        """
        _check_qkv(k, k, v)
        self._check_fits(k, k, v)
        k, v = k.to(self.dtype), v.to(self.dtype)
        t_len = k.shape[-2]
        keep = None if key_mask is None else _key_mask(key_mask, (*self.state.shape[:-2], t_len)).to(k.device)
        p = self.activation.power
        for i0 in range(0, t_len, _CHUNK):
            i1 = min(t_len, i0 + _CHUNK)
            vc = v[..., i0:i1, :]
            if keep is None:
                self.count += i1 - i0
            else:
                m = keep[..., i0:i1].to(self.dtype)
                vc = vc * m.unsqueeze(-1)
                self.count += m.sum(-1)
            self.state += symmetric_features(k[..., i0:i1, :], p).transpose(-1, -2) @ vc

    # --- inspecting ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held: the (…, F, dv) state and the counts; constant in the context length."""
        return self.state.nbytes + self.count.nbytes

    def __repr__(self) -> str:
        return (
            f"LinearState({self.activation.spec!r}, batch_shape={tuple(self.state.shape[:-2])}, d={self.d}, "
            f"dv={self.dv}, features={self.features}, tokens={self.count.max().item():g}, dtype={self.dtype})"
        )

    def _check_fits(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        want = (*self.state.shape[:-2], "T", self.d)
        for name, t, last in (("q", q, self.d), ("k", k, self.d), ("v", v, self.dv)):
            if tuple(t.shape[:-2]) != tuple(self.state.shape[:-2]) or t.shape[-1] != last:
                raise ValueError(
                    f"{name} of shape {tuple(t.shape)} does not fit this LinearState: it holds batch shape "
                    f"{tuple(self.state.shape[:-2])} with d={self.d}, dv={self.dv}; pass (..., T, d) as {want}"
                )
        if q.device != self.state.device:
            raise ValueError(f"q is on {q.device} but the state is on {self.state.device}; move one of them")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            raise ValueError(f"{name} must be a floating-point tensor of shape (..., T, d), got {_describe(t)}")
    if q.shape[:-1] != k.shape[:-1] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k, v must be (..., T, d), (..., T, d), (..., T, dv) with one T and batch shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def _key_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True = a real token), got {_describe(mask)}")
    try:
        return torch.broadcast_to(mask, shape)
    except RuntimeError:
        raise ValueError(
            f"key_mask of shape {tuple(mask.shape)} does not broadcast to (..., T) = {shape}; "
            "for (B, T) padding with (B, H, T, d) inputs pass key_mask[:, None, :]"
        ) from None


def _describe(t: object) -> str:
    return f"{type(t).__name__} {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
