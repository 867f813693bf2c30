"""Chunked attention: tiles of queries x keys, never the whole (Nq, Nk) matrix.

Forward walks query blocks (outer) and key blocks (inner), accumulating
``phi(S_ij) v_j`` into the output rows. Backward recomputes each tile and walks
key blocks (outer) so that dK_j and dV_j stay hot while dQ_i accumulates. Memory
is O(N * block) on top of the inputs and gradients: a few (heads, BQ, BK) tile
buffers, reused for every tile.

Why it is fast for x^p on CPU: the tiles fit the L3 cache, phi is one in-place
pass (``s.pow_(3)``), the row divisor (1/sqrt(N), 1/N, 1/C) scales output rows
(and dO rows in backward) instead of every score, 1/sqrt(d) scales the query
tile, and the derivative constant p is applied once to dQ and dK at the end.
Polynomials need no running max, no row sums and no saved statistics, so
backward recomputes S and nothing else; for short sequences (the score tiles
take at most 4x the bytes of q, k, v and the output: N <= 16 d) forward keeps
the tiles instead, and backward runs six matrix products instead of seven.

Tiles above the diagonal are skipped in causal mode; key blocks that are masked
for every head are skipped too. softmax uses the online (running max and sum)
normalisation and saves one log-sum-exp per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..activations import Activation
from .common import (
    BlockSource,
    Call,
    CallInfo,
    Estimate,
    Layout,
    MachineRates,
    backend_run,
    causal_block,
    num_threads,
    refuse_double_backward,
    row_slice,
    scale_rows,
    values_known,
)

__all__ = [
    "NAME",
    "chunked_attention",
    "cost",
    "default_block_sizes",
    "keeps_scores",
    "run",
    "tile_group",
    "unsupported",
]

NAME = "chunked"
SUMMARY = "tiled, O(N * block) memory, every activation"

# Bytes one (heads, BQ, BK) tile buffer may take, per thread: on CPU a group
# of heads is processed together while each core's share of the two tile
# buffers stays within a few MiB of its 1 MiB L2, well inside the 32 MiB L3;
# larger groups mean fewer operations (each a parallel region).
_CPU_TILE_BYTES = 2 << 20
_GPU_TILE_BYTES = 256 << 20
# Short sequences: forward keeps the scores S for backward instead of
# recomputing them there (one matrix product fewer out of seven) while they
# take at most _KEEP_FACTOR times the bytes of q, k, v and the output together
# (for d = dv = 64: N <= 1024), and never more than _KEEP_SCORES_BYTES. Long
# sequences recompute, so memory stays O(N * block).
_KEEP_FACTOR = 4
_KEEP_SCORES_BYTES = 256 << 20

# The cost model, counted from the code below. Products per tile: forward S
# and A v, backward S again, dV, dA, dQ, dK (one fewer when S is kept).
# Elementwise passes per score entry: x^p one forward (s.pow_) and three
# backward (phi', phi, dA * phi'); other elementwise activations about nine
# (phi and phi' are several passes each); softmax ten (max, exp, sums and the
# rowsum(dO O) term); one more for a mask tile. PyTorch ops: ~16 per tile and
# head group (forward ~5, backward ~11), ~20 per call.
_PRODUCTS, _KEPT_PRODUCTS = 7, 6
_POWER_PASSES, _ELEMENTWISE_PASSES, _SOFTMAX_PASSES, _MASK_PASSES = 4, 9, 10, 1
_OPS_PER_TILE, _OPS = 16, 20


def default_block_sizes(layout: Layout, device: torch.device) -> tuple[int, int]:
    """(BQ, BK) tile shape; measured on a 2-core AVX-512 CPU (see docs/benchmarks.md)."""
    if device.type == "cuda":
        return min(layout.nq, 1024), min(layout.nk, 2048)
    bq = min(layout.nq, 256)
    bk = min(layout.nk, 512)
    # Short sequences: one tile per head group costs the fewest Python-level ops.
    if layout.nq <= 768 and layout.nk <= 768:
        bq, bk = layout.nq, layout.nk
    return max(bq, 1), max(bk, 1)


def tile_group(layout: Layout, bq: int, bk: int, dtype_bytes: int, device: torch.device) -> int:
    """How many heads share one batched tile operation."""
    budget = _GPU_TILE_BYTES if device.type == "cuda" else _CPU_TILE_BYTES * max(1, num_threads())
    return max(1, min(layout.bh, budget // max(bq * bk * dtype_bytes, 1)))


def keeps_scores(layout: Layout, dtype_bytes: int = 4) -> bool:
    """Whether forward keeps the (non-causal) scores for backward at this size."""
    io_bytes = layout.bh * (layout.nq + layout.nk) * (layout.d + layout.dv) * dtype_bytes
    kept = layout.bh * layout.nq * layout.nk * dtype_bytes
    return kept <= min(_KEEP_FACTOR * io_bytes, _KEEP_SCORES_BYTES)


def unsupported(info: CallInfo) -> str | None:
    if info.dropout_p > 0.0:
        return "chunked has no dropout (dropout_p > 0 needs reference, or sdpa for softmax)"
    return None


def cost(info: CallInfo, rates: MachineRates) -> Estimate:
    layout = info.layout
    bq, bk = default_block_sizes(layout, info.device)
    row_blocks = math.ceil(info.nq / bq)
    tiles = row_blocks * math.ceil(info.nk / bk)
    if info.causal:  # the tiles on and below the diagonal
        tiles = max(1, tiles // 2 + row_blocks)
    groups = math.ceil(info.bh / tile_group(layout, bq, bk, 4, info.device))
    act = info.activation
    kept = not act.is_softmax and keeps_scores(layout)
    passes = _SOFTMAX_PASSES if act.is_softmax else _POWER_PASSES if act.is_polynomial else _ELEMENTWISE_PASSES
    passes += _MASK_PASSES if info.mask or info.causal else 0
    t = rates.seconds(
        flops=(_KEPT_PRODUCTS if kept else _PRODUCTS) * info.product_flops,
        cached=passes * info.entries,
        ops=tiles * groups * _OPS_PER_TILE + _OPS,
    )
    return Estimate(t, f"{tiles * groups} tiles of {bq}x{bk}" + (", scores kept" if kept else ""))


@dataclass
class Tile:
    i0: int
    i1: int
    j0: int
    j1: int
    masked: bool  # needs a mask tile: a partial attn_mask block or a causal diagonal block
    diagonal: bool


@dataclass
class Plan:
    """Everything about one call that is not a tensor to differentiate."""

    activation: Activation
    layout: Layout
    scale: float
    causal: bool
    bq: int
    bk: int
    mask: BlockSource | None
    bias: BlockSource | None
    r: torch.Tensor | float  # 1/divisor per query row (elementwise activations)
    keep_scores: bool = False  # forward saves the score tiles for backward (short sequences)
    whole: bool = False  # that one tile covers every query and key: results are written, not accumulated
    groups: list[tuple[int, int]] = field(default_factory=list)
    tiles: list[Tile] = field(default_factory=list)

    def rows(self) -> list[tuple[int, int, list[Tile]]]:
        out: dict[tuple[int, int], list[Tile]] = {}
        for t in self.tiles:
            out.setdefault((t.i0, t.i1), []).append(t)
        return [(i0, i1, ts) for (i0, i1), ts in out.items()]

    def cols(self) -> list[tuple[int, int, list[Tile]]]:
        out: dict[tuple[int, int], list[Tile]] = {}
        for t in self.tiles:
            out.setdefault((t.j0, t.j1), []).append(t)
        return [(j0, j1, ts) for (j0, j1), ts in sorted(out.items())]

    def blocked(self, tile: Tile, h0: int, h1: int, device: torch.device) -> torch.Tensor | None:
        """True where the tile's entries may NOT be attended (for masked_fill_), or None."""
        if not tile.masked:
            return None
        allowed = None
        if self.mask is not None:
            allowed = self.mask.heads(h0, h1).block(tile.i0, tile.i1, tile.j0, tile.j1)
        if tile.diagonal:
            c = causal_block(tile.i0, tile.i1, tile.j0, tile.j1, device)
            allowed = c if allowed is None else allowed & c
        return ~allowed

    def r_rows(self, h0: int, h1: int, i0: int, i1: int) -> torch.Tensor | float:
        return row_slice(self.r, h0, h1, i0, i1)


def _mask_summary(mask: BlockSource, i0: int, i1: int, j0: int, j1: int) -> tuple[bool, bool]:
    """(any allowed, all allowed) over every head for this block.

    Without readable values (torch.compile, meta or fake tensors) every block
    is (True, False): computed with its mask tile, which is what skipping or
    not masking would have given.
    """
    if not values_known(mask.flat):
        return True, False
    b = mask.flat[
        :, slice(0, 1) if mask.rows_broadcast else slice(i0, i1), slice(0, 1) if mask.cols_broadcast else slice(j0, j1)
    ]
    return bool(b.any()), bool(b.all())


def _make_plan(
    activation: Activation,
    layout: Layout,
    scale: float,
    causal: bool,
    mask: BlockSource | None,
    bias: BlockSource | None,
    r: torch.Tensor | float,
    device: torch.device,
    block_sizes: tuple[int, int] | None,
    dtype_bytes: int,
) -> Plan:
    bq, bk = block_sizes or default_block_sizes(layout, device)
    plan = Plan(activation, layout, scale, causal, bq, bk, mask, bias, r)
    group = tile_group(layout, bq, bk, dtype_bytes, device)
    plan.groups = [(h, min(layout.bh, h + group)) for h in range(0, layout.bh, group)]

    key_summary: dict[tuple[int, int], tuple[bool, bool]] = {}
    for i0 in range(0, layout.nq, bq):
        i1 = min(layout.nq, i0 + bq)
        j_end = min(layout.nk, i1) if causal else layout.nk  # key j <= query i
        for j0 in range(0, j_end, bk):
            j1 = min(j_end, j0 + bk)
            diagonal = causal and j1 - 1 > i0
            partial = False
            if mask is not None:
                if mask.rows_broadcast:  # padding mask: one summary per key block
                    if (j0, j1) not in key_summary:
                        key_summary[(j0, j1)] = _mask_summary(mask, i0, i1, j0, j1)
                    any_ok, all_ok = key_summary[(j0, j1)]
                else:
                    any_ok, all_ok = _mask_summary(mask, i0, i1, j0, j1)
                if not any_ok:
                    continue
                partial = not all_ok
            plan.tiles.append(Tile(i0, i1, j0, j1, partial or diagonal, diagonal))
    return settle_plan(plan, activation, layout, dtype_bytes)


def settle_plan(plan: Plan, activation: Activation, layout: Layout, dtype_bytes: int) -> Plan:
    """Once a plan's tiles are laid: whether forward keeps the scores for backward (short sequences),
    and whether one tile covers everything (products then write their result instead of adding it)."""
    kept_bytes = sum((t.i1 - t.i0) * (t.j1 - t.j0) for t in plan.tiles) * layout.bh * dtype_bytes
    io_bytes = layout.bh * (layout.nq + layout.nk) * (layout.d + layout.dv) * dtype_bytes
    plan.keep_scores = (
        not activation.is_softmax
        and bool(plan.tiles)
        and kept_bytes <= min(_KEEP_FACTOR * io_bytes, _KEEP_SCORES_BYTES)
    )
    plan.whole = (
        len(plan.tiles) == 1
        and (plan.tiles[0].j0, plan.tiles[0].j1) == (0, layout.nk)
        and (plan.tiles[0].i0, plan.tiles[0].i1) == (0, layout.nq)
    )
    return plan


def _kept_sizes(plan: Plan) -> list[int]:
    return [(h1 - h0) * (t.i1 - t.i0) * (t.j1 - t.j0) for h0, h1 in plan.groups for t in plan.tiles]


def _kept_offsets(plan: Plan) -> dict[tuple[int, int, int], int]:
    """Start of each (head group, tile) in the flat buffer of kept scores."""
    offsets, pos = {}, 0
    for h0, h1 in plan.groups:
        for t in plan.tiles:
            offsets[(h0, t.i0, t.j0)] = pos
            pos += (h1 - h0) * (t.i1 - t.i0) * (t.j1 - t.j0)
    return offsets


def _tile_buffer(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous (g, bq, bk) view at the start of a flat buffer (edge tiles are smaller)."""
    return buf[: math.prod(shape)].view(*shape)


def _kept_tile(
    kept: torch.Tensor, offsets: dict[tuple[int, int, int], int], h0: int, t: Tile, shape: tuple[int, int, int]
) -> torch.Tensor:
    """The (g, bq, bk) scores of tile t that forward kept for head group h0."""
    return kept[offsets[(h0, t.i0, t.j0)] :][: math.prod(shape)].view(*shape)


def _scores(qi: torch.Tensor, kj: torch.Tensor, out: torch.Tensor, bias: BlockSource | None, t: Tile) -> torch.Tensor:
    """S = q_i k_j^T (+ bias) for tile t, written into out; qi is already scaled."""
    s = torch.bmm(qi, kj.transpose(1, 2), out=out)
    if bias is not None:
        s.add_(bias.block(t.i0, t.i1, t.j0, t.j1))
    return s


# --------------------------------------------------------------------------
# elementwise activations (x^p above all)
# --------------------------------------------------------------------------
def _phi_inplace(s: torch.Tensor, act: Activation, blocked: torch.Tensor | None) -> torch.Tensor:
    """A = phi(S) without divisor, masked entries 0; overwrites s where it can."""
    if blocked is not None:
        # Zero before phi so phi never sees a score it could overflow on.
        s.masked_fill_(blocked, 0.0)
    if act.is_polynomial:
        p = act.power
        if p == 2:
            s.mul_(s)
        elif p > 2:
            s.pow_(p)
        return s  # phi(0) = 0: masked entries are already 0
    a = act.base(s)
    if blocked is not None:
        a.masked_fill_(blocked, 0.0)
    return a


def _fwd_elementwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output, and the (masked) scores when ``plan.keep_scores``."""
    lay, act = plan.layout, plan.activation
    alloc = torch.empty if plan.whole else torch.zeros
    out = alloc(lay.bh, lay.nq, lay.dv, dtype=q.dtype, device=q.device)
    kept = None
    if plan.keep_scores:  # tile after tile, each (heads, bq, bk) tile contiguous
        kept = torch.empty(sum(_kept_sizes(plan)), dtype=q.dtype, device=q.device)
    offsets = _kept_offsets(plan)
    for h0, h1 in plan.groups:
        g = h1 - h0
        buf = torch.empty(g * plan.bq * plan.bk, dtype=q.dtype, device=q.device)
        bias_src = plan.bias.heads(h0, h1) if plan.bias is not None else None
        for i0, i1, tiles in plan.rows():
            qi = q[h0:h1, i0:i1] * plan.scale
            oi = out[h0:h1, i0:i1]
            for t in tiles:
                shape = (g, i1 - i0, t.j1 - t.j0)
                s = _kept_tile(kept, offsets, h0, t, shape) if kept is not None else _tile_buffer(buf, *shape)
                _scores(qi, k[h0:h1, t.j0 : t.j1], s, bias_src, t)
                blocked = plan.blocked(t, h0, h1, q.device)
                if kept is None:
                    a = _phi_inplace(s, act, blocked)
                else:  # s is kept for backward: phi goes to the tile buffer
                    if blocked is not None:
                        s.masked_fill_(blocked, 0.0)
                    if act.is_polynomial:
                        a = torch.pow(s, act.power, out=_tile_buffer(buf, *shape)) if act.power > 1 else s
                    else:
                        a = _phi_inplace(_tile_buffer(buf, *shape).copy_(s), act, blocked)
                if plan.whole:
                    torch.bmm(a, v[h0:h1], out=oi)
                else:
                    oi.baddbmm_(a, v[h0:h1, t.j0 : t.j1])
            r = plan.r_rows(h0, h1, i0, i1)
            if isinstance(r, torch.Tensor):
                oi.mul_(r)
    if not isinstance(plan.r, torch.Tensor) and plan.r != 1.0:
        out.mul_(plan.r)
    return out, kept


def _phi_and_derivative(
    s: torch.Tensor, act: Activation, blocked: torch.Tensor | None, sb: torch.Tensor, tb: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(a, deriv, spare) of one tile: a = phi(s) and deriv = phi'(s) / p (None for x), both 0 at masked entries.

    ``spare`` is a buffer free once dV is done, where dA goes. Uses the tile
    buffers sb (where s was computed, unless forward kept it) and tb; never
    writes a kept s.
    """
    if not act.is_polynomial:
        a, deriv = act.base(s), act.base_derivative(s)
        if blocked is not None:
            a.masked_fill_(blocked, 0.0)
            deriv.masked_fill_(blocked, 0.0)
        return a, deriv, sb
    p = act.power
    if p == 1:
        return s, None, sb
    if p == 2:
        a = torch.mul(s, s, out=tb)
        return a, s, a
    deriv = torch.mul(s, s, out=tb) if p == 3 else torch.pow(s, p - 1, out=tb)
    return torch.mul(s, deriv, out=sb), deriv, sb


@dataclass
class _Grads:
    """The gradients the elementwise backward accumulates, tile by tile."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dbias: torch.Tensor | None
    need: tuple[bool, bool, bool]  # dq, dk, dv
    whole: bool  # one tile covers everything: products write their result instead of adding it
    # phi'(s) = p s^(p-1) for x^p: the constant p is applied once to dQ, dK (and dbias) at the end.
    dconst: float

    @staticmethod
    def start(q, k, v, plan: Plan, need: tuple[bool, bool, bool, bool]) -> _Grads:
        alloc = torch.empty_like if plan.whole else torch.zeros_like
        dbias = torch.zeros_like(plan.bias.flat) if (need[3] and plan.bias is not None) else None
        act = plan.activation
        dconst = float(act.power) if act.is_polynomial else 1.0
        return _Grads(alloc(q), alloc(k), alloc(v), dbias, need[:3], plan.whole, dconst)

    def _add(self, grad: torch.Tensor, r0: int, r1: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """grad[:, r0:r1] += x @ y (grad is already restricted to the head group)."""
        if self.whole:
            torch.bmm(x, y, out=grad)
        else:
            grad[:, r0:r1].baddbmm_(x, y)

    def add_tile(self, h0: int, h1: int, t: Tile, qi, kj, vj, doi, a, deriv, spare, blocked, bias_src) -> None:
        """dV_j += A^T dO_i; then dS = (dO_i v_j^T) (.) phi' into spare, dQ_i += dS k_j, dK_j += dS^T q_i."""
        need_q, need_k, need_v = self.need
        if need_v:
            self._add(self.dv[h0:h1], t.j0, t.j1, a.transpose(1, 2), doi)
        if not (need_q or need_k or self.dbias is not None):
            return
        ds = torch.bmm(doi, vj.transpose(1, 2), out=spare)
        if deriv is not None:
            ds.mul_(deriv)
        elif blocked is not None:
            ds.masked_fill_(blocked, 0.0)
        if need_q:
            self._add(self.dq[h0:h1], t.i0, t.i1, ds, kj)
        if need_k:
            self._add(self.dk[h0:h1], t.j0, t.j1, ds.transpose(1, 2), qi)
        if self.dbias is not None:
            bias_src.accumulate(self.dbias, ds * self.dconst if self.dconst != 1.0 else ds, t.i0, t.i1, t.j0, t.j1)

    def finish(self, scale: float):
        self.dq.mul_(self.dconst * scale)
        if self.dconst != 1.0:
            self.dk.mul_(self.dconst)
        return self.dq, self.dk, self.dv, self.dbias


def _bwd_elementwise(q, k, v, do, kept, plan: Plan, need: tuple[bool, bool, bool, bool]):
    """Recompute each tile (or read the kept scores); rows outer so the scaled q_i and dO_i
    rows are made once per row block. Kept scores are read, never written."""
    act = plan.activation
    grads = _Grads.start(q, k, v, plan, need)
    offsets = _kept_offsets(plan)
    two_buffers = act.is_polynomial and act.power >= 2  # phi and phi' of x^p need a second tile buffer
    for h0, h1 in plan.groups:
        n = (h1 - h0) * plan.bq * plan.bk
        s_buf = torch.empty(n, dtype=q.dtype, device=q.device)
        t_buf = torch.empty(n, dtype=q.dtype, device=q.device) if two_buffers else None
        bias_src = plan.bias.heads(h0, h1) if plan.bias is not None else None
        for i0, i1, tiles in plan.rows():
            qi = q[h0:h1, i0:i1] * plan.scale
            doi = scale_rows(do[h0:h1, i0:i1], plan.r_rows(h0, h1, i0, i1))  # the row divisor, moved from A onto dO
            for t in tiles:
                shape = (h1 - h0, i1 - i0, t.j1 - t.j0)
                kj = k[h0:h1, t.j0 : t.j1]
                sb = _tile_buffer(s_buf, *shape)
                blocked = plan.blocked(t, h0, h1, q.device)
                if kept is not None:  # masked entries already 0
                    s = _kept_tile(kept, offsets, h0, t, shape)
                else:
                    s = _scores(qi, kj, sb, bias_src, t)
                    if blocked is not None:
                        s.masked_fill_(blocked, 0.0)
                tb = _tile_buffer(t_buf, *shape) if t_buf is not None else None
                a, deriv, spare = _phi_and_derivative(s, act, blocked, sb, tb)
                grads.add_tile(h0, h1, t, qi, kj, v[h0:h1, t.j0 : t.j1], doi, a, deriv, spare, blocked, bias_src)
    return grads.finish(plan.scale)


# --------------------------------------------------------------------------
# softmax (online normalisation)
# --------------------------------------------------------------------------
def _fwd_softmax(q, k, v, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    lay = plan.layout
    out = torch.zeros(lay.bh, lay.nq, lay.dv, dtype=q.dtype, device=q.device)
    # Query rows with no tile at all (every key masked, or an empty document) attend nothing: lse inf.
    lse = torch.full((lay.bh, lay.nq, 1), float("inf"), dtype=q.dtype, device=q.device)
    neg_inf = float("-inf")
    rows = plan.rows()
    for h0, h1 in plan.groups:
        g = h1 - h0
        buf = torch.empty(g * plan.bq * plan.bk, dtype=q.dtype, device=q.device)
        bias_src = plan.bias.heads(h0, h1) if plan.bias is not None else None
        for i0, i1, tiles in rows:
            qi = q[h0:h1, i0:i1] * plan.scale
            oi = out[h0:h1, i0:i1]
            m = torch.full((g, i1 - i0, 1), neg_inf, dtype=q.dtype, device=q.device)
            ell = torch.zeros(g, i1 - i0, 1, dtype=q.dtype, device=q.device)
            m_safe = torch.zeros_like(m)
            for t in tiles:
                s = _scores(qi, k[h0:h1, t.j0 : t.j1], _tile_buffer(buf, g, i1 - i0, t.j1 - t.j0), bias_src, t)
                blocked = plan.blocked(t, h0, h1, q.device)
                if blocked is not None:
                    s.masked_fill_(blocked, neg_inf)
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                # Rows with nothing allowed yet keep max -inf; shifting by 0 keeps exp at 0.
                m_safe = m_new.masked_fill(m_new == neg_inf, 0.0)
                s.sub_(m_safe).exp_()
                alpha = torch.exp(m - m_safe)
                ell.mul_(alpha).add_(s.sum(dim=-1, keepdim=True))
                oi.mul_(alpha).baddbmm_(s, v[h0:h1, t.j0 : t.j1])
                m = m_new
            empty = ell == 0
            oi.div_(ell.masked_fill(empty, 1.0))
            lse[h0:h1, i0:i1] = (m_safe + ell.log()).masked_fill(empty, float("inf"))
    return out, lse


def _bwd_softmax(q, k, v, out, lse, do, plan: Plan, need):
    need_q, need_k, need_v, need_bias = need
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dbias = torch.zeros_like(plan.bias.flat) if (need_bias and plan.bias is not None) else None
    for h0, h1 in plan.groups:
        g = h1 - h0
        n = g * plan.bq * plan.bk
        s_buf = torch.empty(n, dtype=q.dtype, device=q.device)
        dp_buf = torch.empty(n, dtype=q.dtype, device=q.device)
        bias_src = plan.bias.heads(h0, h1) if plan.bias is not None else None
        for i0, i1, tiles in plan.rows():
            qi = q[h0:h1, i0:i1] * plan.scale
            doi = do[h0:h1, i0:i1]
            # rowsum(dO * O): the diagonal term of the softmax Jacobian
            delta = (doi * out[h0:h1, i0:i1]).sum(dim=-1, keepdim=True)
            lse_i = lse[h0:h1, i0:i1]
            dqi = dq[h0:h1, i0:i1]
            for t in tiles:
                j0, j1 = t.j0, t.j1
                kj, vj = k[h0:h1, j0:j1], v[h0:h1, j0:j1]
                shape = (g, i1 - i0, j1 - j0)
                s = _scores(qi, kj, _tile_buffer(s_buf, *shape), bias_src, t)
                blocked = plan.blocked(t, h0, h1, q.device)
                if blocked is not None:
                    s.masked_fill_(blocked, float("-inf"))
                pr = s.sub_(lse_i).exp_()
                if need_v:
                    dv[h0:h1, j0:j1].baddbmm_(pr.transpose(1, 2), doi)
                if not (need_q or need_k or dbias is not None):
                    continue
                ds = torch.bmm(doi, vj.transpose(1, 2), out=_tile_buffer(dp_buf, *shape))
                ds.sub_(delta).mul_(pr)
                if need_q:
                    dqi.baddbmm_(ds, kj)
                if need_k:
                    dk[h0:h1, j0:j1].baddbmm_(ds.transpose(1, 2), qi)
                if dbias is not None:
                    bias_src.accumulate(dbias, ds, i0, i1, j0, j1)
    dq.mul_(plan.scale)
    return dq, dk, dv, dbias


class _ChunkedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias_flat, plan: Plan):
        # bias_flat is plan.bias.flat: an input here only so autograd routes its gradient.
        if plan.activation.is_softmax:
            out, lse = _fwd_softmax(q, k, v, plan)
            ctx.save_for_backward(q, k, v, out, lse)
        else:
            if plan.keep_scores and not any(ctx.needs_input_grad[:4]):
                plan = replace(plan, keep_scores=False)  # evaluation: no backward will read them
            out, kept = _fwd_elementwise(q, k, v, plan)
            ctx.save_for_backward(q, k, v, kept)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward("chunked")
        plan: Plan = ctx.plan
        need = tuple(ctx.needs_input_grad[:4])
        dout = dout.contiguous()
        if plan.activation.is_softmax:
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv, dbias = _bwd_softmax(q, k, v, out, lse, dout, plan, need)
        else:
            q, k, v, kept = ctx.saved_tensors
            dq, dk, dv, dbias = _bwd_elementwise(q, k, v, dout, kept, plan, need)
        return dq, dk, dv, dbias, None


def _compute(call: Call, block_sizes: tuple[int, int] | None = None) -> torch.Tensor:
    """Tiled attention equal to the reference, in O(N * block) memory; every activation.

    ``block_sizes=(BQ, BK)`` overrides the tile shape (see :func:`default_block_sizes`).
    Not twice differentiable (no ``create_graph`` through it): use ``backend="reference"`` there.
    """
    q = call.q
    plan = _make_plan(
        call.activation,
        call.layout,
        call.scale_value,
        call.causal,
        call.mask,
        call.bias_source,
        call.row_factors(q.dtype),
        q.device,
        block_sizes,
        q.element_size(),
    )
    bias_flat = call.bias_source.flat if call.bias_source is not None else None
    return _ChunkedFunction.apply(q, call.k, call.v, bias_flat, plan)


run = backend_run(NAME, unsupported, _compute)
chunked_attention = run
