"""The exact linear-time form of x^p attention (integer p), forward and backward.

For integer p, (q . k)^p = <phi_p(q), phi_p(k)> where phi_p lists every
monomial of degree p in the d coordinates once (the symmetric tensor power),
weighted by the square root of its multinomial coefficient:

    phi_p(x)_f = sqrt(p! / (c_1! ... c_d!)) * x_1^c_1 ... x_d^c_d,   sum c = p,

so there are F = C(d + p - 1, p) features (528 for d = 32, p = 2; 2,080 for
d = 64, p = 2; 5,984 for d = 32, p = 3; 47,905 for d = 64, p = 3). Then

    sum_j (q_i . k_j)^p v_j = phi(q_i)^T (sum_j phi(k_j) v_j^T)

costs O(N F dv) instead of O(Nq Nk d): exact up to float rounding, not an
approximation. It pays off when N is larger than about F (times a constant
this module's :func:`cost` puts on it): for x^2 at d = 32 from
N ~ 1k, for x^3 at d = 64 only beyond N ~ 50k.

Non-causal: one (F, dv) state per head. Causal: queries and keys in chunks;
a chunk sees the state of all earlier chunks through phi and its own keys
through the quadratic form (q k^T)^p with a causal mask, so no feature of a
query is ever multiplied by a later key. Padding masks zero the values of
padded keys; the divisor (1/C, 1/sqrt(N), 1/N with N the attendable keys of
the row) scales output rows. Backward recomputes features chunk by chunk, so
memory stays O(N + chunk * F + F * dv) per head.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from ..activations import Activation
from .common import (
    Call,
    CallInfo,
    Estimate,
    MachineRates,
    assume_constant_result,
    backend_run,
    causal_block,
    keys_only_limits,
    refuse_double_backward,
    row_slice,
    scale_rows,
)

if TYPE_CHECKING:
    from .common import Layout

__all__ = ["NAME", "chunking", "cost", "feature_count", "linear_attention", "run", "symmetric_features", "unsupported"]

NAME = "linear"
SUMMARY = "exact linear-time x^p (symmetric features)"

# Bytes of one (heads, F, chunk) feature buffer; a few of them are live at once.
_FEATURE_BYTES = 16 << 20
_CHUNK = 128  # rows of q or k per step, causal or not
_MIN_CHUNK, _MIN_CAUSAL_CHUNK = 16, 64  # when one head's features do not fit _FEATURE_BYTES

# The cost model, counted from the code below. Products of (F, dv) states with
# one row of q or k: non-causal 3 per query (readout; backward dState, dQ) and
# 3 per key (state; backward dK, dV); causal one more per key (pass 1 rebuilds
# the state) plus the 7 in-chunk (q k^T)^p products per query over its chunk.
# Per row and feature a monomial build is 2p - 1 passes (p gathers, p - 1
# products) and its VJP p(p + 1); rows are built twice (keys three times under
# causal) and differentiated once. PyTorch ops: ~25 small ones (gathers,
# products, slices, copies) per (head group, chunk) step, worth about ten of
# the machine's per-op overheads at these sizes (fitted to the bench timings);
# ~20 per call.
_QUERY_PRODUCTS, _KEY_PRODUCTS, _CAUSAL_KEY_PRODUCTS, _INTRA_PRODUCTS = 3, 3, 4, 7
_OPS_PER_STEP, _OPS = 10, 20


def feature_count(d: int, p: int) -> int:
    """C(d + p - 1, p): the number of symmetric degree-p features of a d-vector."""
    # The product form of math.comb, since d may be a symbolic size under torch.compile:
    # after step i, c = C(d - 1 + i, i), an integer, so every division is exact.
    c = 1
    for i in range(1, p + 1):
        c = c * (d - 1 + i) // i
    return c


def _feature_tables(d: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, F) index table (row t: the t-th index of each multiset) and the multinomial coefficients (F,)."""
    if torch.compiler.is_compiling():
        # d may be symbolic (torch.compile(dynamic=True)), which dynamo cannot hand to
        # assume_constant_result; iterating range(d) specialises it (with a guard on
        # its value): the tables exist per d anyway. (Dynamo reports a SymInt as an
        # int to isinstance, so this cannot test for one.)
        d = len(list(range(d)))
    return _constant_feature_tables(d, p)


@assume_constant_result
def _constant_feature_tables(d: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Under torch.compile the tables become graph constants instead of dynamo
    # tracing the Python loop over all F multisets (47,905 for d = 64, p = 3).
    return _build_feature_tables(d, p)


@lru_cache(maxsize=32)
def _build_feature_tables(d: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    combos = list(itertools.combinations_with_replacement(range(d), p))
    idx = torch.tensor(combos, dtype=torch.long).T.contiguous()
    coefs = []
    for c in combos:
        coef = math.factorial(p)
        for _, group in itertools.groupby(c):
            coef //= math.factorial(len(list(group)))
        coefs.append(float(coef))
    return idx, torch.tensor(coefs, dtype=torch.float64)


def symmetric_features(x: torch.Tensor, p: int) -> torch.Tensor:
    """phi_p(x) over the last dim: (..., d) -> (..., C(d+p-1, p)), with <phi(a), phi(b)> = (a . b)^p."""
    d = x.shape[-1]
    idx, coef = _feature_tables(d, p)
    idx = idx.to(x.device)
    out = x.index_select(-1, idx[0])
    for t in range(1, p):
        out = out * x.index_select(-1, idx[t])
    return out * coef.to(device=x.device, dtype=x.dtype).sqrt()


class _Monomials:
    """The raw monomials m_f(x) = prod_t x[idx_t[f]] of chunks (heads, d, c) -> (heads, F, c), and their VJP.

    (q . k)^p = sum_f coef_f m_f(q) m_f(k): the backends keep the coefficients
    on the small (F, dv) states instead of multiplying them into every
    feature. The feature axis is the middle one so each gather copies whole
    contiguous rows of c values.
    """

    def __init__(self, d: int, p: int, device: torch.device, dtype: torch.dtype) -> None:
        self.p = p
        idx, coef = _feature_tables(d, p)
        self.idx = [idx[t].to(device) for t in range(p)]
        self.coef = coef.to(device=device, dtype=dtype).view(1, -1, 1)
        self.count = feature_count(d, p)  # idx.shape[1], which dynamo cannot read off a constant

    def _columns(self, xt: torch.Tensor) -> list[torch.Tensor]:
        return [xt.index_select(1, i) for i in self.idx]

    def __call__(self, xt: torch.Tensor) -> torch.Tensor:
        if self.p == 1:
            return xt
        xt = xt.contiguous()
        out = xt.index_select(1, self.idx[0])
        for t in range(1, self.p):
            out.mul_(xt.index_select(1, self.idx[t]))
        return out

    def vjp(self, xt: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """d<gt, m(xt)>/d xt for gt (heads, F, c): (heads, d, c)."""
        if self.p == 1:
            return gt
        xt = xt.contiguous()
        cols = self._columns(xt)
        dx = torch.zeros_like(xt)
        for t in range(self.p):
            others = [cols[s] for s in range(self.p) if s != t]
            term = gt * others[0]
            for o in others[1:]:
                term.mul_(o)
            dx.index_add_(1, self.idx[t], term)
        return dx

    def weigh(self, state: torch.Tensor) -> torch.Tensor:
        """coef (.) state for a (heads, F, dv) state."""
        return state if self.p == 1 else state * self.coef


@dataclass
class _Plan:
    activation: Activation
    layout: Layout
    scale: float
    causal: bool
    key_mask: torch.Tensor | None  # (BH or 1, Nk, 1) float, 1 = attendable
    r: torch.Tensor | float
    chunk: int
    groups: list[tuple[int, int]]

    def r_rows(self, h0: int, h1: int, i0: int, i1: int) -> torch.Tensor | float:
        return row_slice(self.r, h0, h1, i0, i1)

    def key_mask_heads(self, h0: int, h1: int) -> torch.Tensor | None:
        m = self.key_mask
        return m if m is None or m.shape[0] == 1 else m[h0:h1]


def _masked_values(v: torch.Tensor, plan: _Plan, h0: int, h1: int) -> torch.Tensor:
    m = plan.key_mask_heads(h0, h1)
    return v[h0:h1] if m is None else v[h0:h1] * m


# --------------------------------------------------------------------------
# non-causal: one state per head
# --------------------------------------------------------------------------
def _fwd_global(q, k, v, plan: _Plan, mono: _Monomials):
    lay = plan.layout
    out = torch.empty(lay.bh, lay.nq, lay.dv, dtype=q.dtype, device=q.device)
    states = torch.empty(lay.bh, mono.count, lay.dv, dtype=q.dtype, device=q.device)
    c = plan.chunk
    for h0, h1 in plan.groups:
        vm = _masked_values(v, plan, h0, h1)
        h = states[h0:h1].zero_()
        for j0 in range(0, lay.nk, c):
            kt = k[h0:h1, j0 : j0 + c].transpose(1, 2)
            h.baddbmm_(mono(kt), vm[:, j0 : j0 + c])
        hw = mono.weigh(h)
        states[h0:h1] = hw
        for i0 in range(0, lay.nq, c):
            i1 = min(lay.nq, i0 + c)
            qt = (q[h0:h1, i0:i1] * plan.scale).transpose(1, 2)
            o = torch.bmm(mono(qt).transpose(1, 2), hw)
            out[h0:h1, i0:i1] = scale_rows(o, plan.r_rows(h0, h1, i0, i1))
    return out, states  # states hold coef (.) sum_j m(k_j) v_j^T


def _bwd_global(q, k, v, states, do, plan: _Plan, mono: _Monomials):
    lay = plan.layout
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    c = plan.chunk
    for h0, h1 in plan.groups:
        vm = _masked_values(v, plan, h0, h1)
        hw = states[h0:h1]
        dhw = torch.zeros_like(hw)
        for i0 in range(0, lay.nq, c):
            i1 = min(lay.nq, i0 + c)
            qt = (q[h0:h1, i0:i1] * plan.scale).transpose(1, 2).contiguous()
            dor = scale_rows(do[h0:h1, i0:i1], plan.r_rows(h0, h1, i0, i1))
            dhw.baddbmm_(mono(qt), dor)
            dmq = torch.bmm(hw, dor.transpose(1, 2))
            dq[h0:h1, i0:i1] = mono.vjp(qt, dmq).transpose(1, 2) * plan.scale
        dh = mono.weigh(dhw)
        for j0 in range(0, lay.nk, c):
            j1 = min(lay.nk, j0 + c)
            kt = k[h0:h1, j0:j1].transpose(1, 2).contiguous()
            dmk = torch.bmm(dh, vm[:, j0:j1].transpose(1, 2))
            dk[h0:h1, j0:j1] = mono.vjp(kt, dmk).transpose(1, 2)
            dv[h0:h1, j0:j1] = torch.bmm(mono(kt).transpose(1, 2), dh)
        if plan.key_mask is not None:
            dv[h0:h1].mul_(plan.key_mask_heads(h0, h1))
    return dq, dk, dv


# --------------------------------------------------------------------------
# causal: chunked prefix sums of the state
# --------------------------------------------------------------------------
def _intra(qs: torch.Tensor, kc: torch.Tensor, p: int, i0: int, j0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q k^T) and its p-th power, zero above the causal diagonal, for one chunk."""
    s = torch.bmm(qs, kc.transpose(1, 2))
    allowed = causal_block(i0, i0 + qs.shape[1], j0, j0 + kc.shape[1], qs.device)
    s.masked_fill_(~allowed, 0.0)
    return s, s.pow(p) if p > 1 else s


def _fwd_causal(q, k, v, plan: _Plan, mono: _Monomials):
    lay, p = plan.layout, plan.activation.power
    out = torch.empty(lay.bh, lay.nq, lay.dv, dtype=q.dtype, device=q.device)
    c = plan.chunk
    for h0, h1 in plan.groups:
        vm = _masked_values(v, plan, h0, h1)
        h = torch.zeros(h1 - h0, mono.count, lay.dv, dtype=q.dtype, device=q.device)
        for i0 in range(0, lay.nq, c):
            i1 = min(lay.nq, i0 + c)
            qs = q[h0:h1, i0:i1] * plan.scale
            if i0 > 0 and lay.nk > 0:
                o = torch.bmm(mono(qs.transpose(1, 2)).transpose(1, 2), mono.weigh(h))
            else:
                o = torch.zeros(h1 - h0, i1 - i0, lay.dv, dtype=q.dtype, device=q.device)
            j1 = min(i1, lay.nk)
            if i0 < j1:
                kc, vc = k[h0:h1, i0:j1], vm[:, i0:j1]
                _, a = _intra(qs, kc, p, i0, i0)
                o.baddbmm_(a, vc)
                h.baddbmm_(mono(kc.transpose(1, 2)), vc)
            out[h0:h1, i0:i1] = scale_rows(o, plan.r_rows(h0, h1, i0, i1))
    return out


def _bwd_causal(q, k, v, do, plan: _Plan, mono: _Monomials):
    lay, p = plan.layout, plan.activation.power
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    c = plan.chunk
    starts = list(range(0, lay.nq, c))
    for h0, h1 in plan.groups:
        vm = _masked_values(v, plan, h0, h1)
        dvm = torch.zeros_like(vm)
        # Pass 1, in order: the state each query chunk saw, and the in-chunk terms.
        h = torch.zeros(h1 - h0, mono.count, lay.dv, dtype=q.dtype, device=q.device)
        for i0 in starts:
            i1 = min(lay.nq, i0 + c)
            qs = q[h0:h1, i0:i1] * plan.scale
            dor = scale_rows(do[h0:h1, i0:i1], plan.r_rows(h0, h1, i0, i1))
            dqs = dq[h0:h1, i0:i1]
            if i0 > 0 and lay.nk > 0:
                qt = qs.transpose(1, 2)
                dmq = torch.bmm(mono.weigh(h), dor.transpose(1, 2))
                dqs.add_(mono.vjp(qt, dmq).transpose(1, 2))
            j1 = min(i1, lay.nk)
            if i0 < j1:
                kc, vc = k[h0:h1, i0:j1], vm[:, i0:j1]
                s, a = _intra(qs, kc, p, i0, i0)
                dvm[:, i0:j1].baddbmm_(a.transpose(1, 2), dor)
                ds = torch.bmm(dor, vc.transpose(1, 2))
                if p > 1:
                    ds.mul_(s.pow(p - 1) if p > 2 else s).mul_(p)
                else:
                    ds.masked_fill_(~causal_block(i0, i1, i0, j1, q.device), 0.0)
                dqs.baddbmm_(ds, kc)
                dk[h0:h1, i0:j1].baddbmm_(ds.transpose(1, 2), qs)
                h.baddbmm_(mono(kc.transpose(1, 2)), vc)
        # Pass 2, in reverse: g = sum of the state gradients of all later query chunks.
        g = torch.zeros(h1 - h0, mono.count, lay.dv, dtype=q.dtype, device=q.device)
        for i0 in reversed(starts):
            i1 = min(lay.nq, i0 + c)
            j1 = min(i1, lay.nk)
            if i0 < j1 and i0 != starts[-1]:
                kt = k[h0:h1, i0:j1].transpose(1, 2).contiguous()
                gw = mono.weigh(g)
                dmk = torch.bmm(gw, vm[:, i0:j1].transpose(1, 2))
                dk[h0:h1, i0:j1].add_(mono.vjp(kt, dmk).transpose(1, 2))
                dvm[:, i0:j1].baddbmm_(mono(kt).transpose(1, 2), gw)
            if i0 > 0:
                qt = (q[h0:h1, i0:i1] * plan.scale).transpose(1, 2)
                dor = scale_rows(do[h0:h1, i0:i1], plan.r_rows(h0, h1, i0, i1))
                g.baddbmm_(mono(qt), dor)
        if plan.key_mask is not None:
            dvm.mul_(plan.key_mask_heads(h0, h1))
        dv[h0:h1] = dvm
    dq.mul_(plan.scale)
    return dq, dk, dv


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        mono = _Monomials(plan.layout.d, plan.activation.power, q.device, q.dtype)
        if plan.causal:
            out = _fwd_causal(q, k, v, plan, mono)
            ctx.save_for_backward(q, k, v)
        else:
            out, states = _fwd_global(q, k, v, plan, mono)
            ctx.save_for_backward(q, k, v, states)
        ctx.plan, ctx.mono = plan, mono
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward("linear")
        plan, mono = ctx.plan, ctx.mono
        dout = dout.contiguous()
        if plan.causal:
            q, k, v = ctx.saved_tensors
            dq, dk, dv = _bwd_causal(q, k, v, dout, plan, mono)
        else:
            q, k, v, states = ctx.saved_tensors
            dq, dk, dv = _bwd_global(q, k, v, states, dout, plan, mono)
        return dq, dk, dv, None


def unsupported(info: CallInfo) -> str | None:
    if not info.activation.is_polynomial:
        return f"the linear form exists for x^p only, not {info.activation.spec!r}"
    return keys_only_limits(info, "the linear form")


def chunking(bh: int, causal: bool, features: int, dtype_bytes: int, chunk: int | None = None) -> tuple[int, int]:
    """(rows per chunk, heads per group): as many heads as keep one (heads, F, chunk) buffer within budget.

    A head whose features alone exceed it gets shorter chunks instead.
    """
    chunk = chunk if chunk is not None else _CHUNK
    per_head = features * chunk * dtype_bytes
    group = max(1, min(bh, _FEATURE_BYTES // max(per_head, 1)))
    if group == 1 and per_head > _FEATURE_BYTES:
        chunk = max(_MIN_CAUSAL_CHUNK if causal else _MIN_CHUNK, _FEATURE_BYTES // (features * dtype_bytes))
    return chunk, group


def cost(info: CallInfo, rates: MachineRates) -> Estimate:
    p = info.activation.power
    f = feature_count(info.d, p)
    chunk, group = chunking(info.bh, info.causal, f, 4)
    key_products = _CAUSAL_KEY_PRODUCTS if info.causal else _KEY_PRODUCTS
    flops = 2 * info.bh * f * info.dv * (_QUERY_PRODUCTS * info.nq + key_products * info.nk)
    if info.causal:
        flops += _INTRA_PRODUCTS * info.bh * info.nq * chunk * (info.d + info.dv)
    build, vjp = (2 * p - 1, p * (p + 1)) if p > 1 else (0, 0)  # x itself needs no monomials
    passes = 2 * build + vjp  # per row and feature
    ew = info.bh * f * (passes * info.nq + (passes + (build if info.causal else 0)) * info.nk)
    steps = math.ceil(info.bh / group) * (math.ceil(info.nq / chunk) + math.ceil(info.nk / chunk))
    t = rates.seconds(flops=flops, cached=ew, ops=steps * _OPS_PER_STEP + _OPS)
    # f may be symbolic under torch.compile(dynamic=True), which has no "," format; nobody reads notes there.
    return Estimate(t, f"{f} features" if torch.compiler.is_compiling() else f"{f:,} features")


def _compute(call: Call, chunk: int | None = None) -> torch.Tensor:
    """Exact O(N F dv) attention for x^p activations (any divisor), padding masks, causal or not.

    ``chunk`` overrides the rows per step (see :func:`chunking`).
    """
    q, act, layout = call.q, call.activation, call.layout
    flags = call.key_flags()
    key_mask = flags.to(q.dtype).unsqueeze(-1) if flags is not None else None
    chunk, group = chunking(layout.bh, call.causal, feature_count(layout.d, act.power), q.element_size(), chunk)
    groups = [(h, min(layout.bh, h + group)) for h in range(0, layout.bh, group)]
    plan = _Plan(act, layout, call.scale_value, call.causal, key_mask, call.row_factors(q.dtype), chunk, groups)
    return _LinearFunction.apply(q, call.k, call.v, plan)


run = backend_run(NAME, unsupported, _compute)
linear_attention = run
