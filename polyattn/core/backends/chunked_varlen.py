"""Chunked attention over packed documents: tiles that never cross a document boundary.

The packed (total, heads, d) layout of ``polyattn.attention_varlen`` becomes one
flat problem of the chunked backend: q as (Hk, G * total_q, d) (the G query heads
of a key/value head stacked as rows, so k and v are read once per key/value
head), k and v as (Hk, total_k, d). The tile list then holds, for every document
and every stacked query head, the tiles of that document's own (n_q, n_k)
block, cut at the document's edges: keys of another document are never
multiplied, and no (total, total) mask exists. Causal tiles on a document's
diagonal are masked in the document's own positions (key j <= query i, both
counted from the document's start, as :func:`polyattn.attention` on the
document alone).

The forward and backward passes are the chunked backend's own
(:mod:`.chunked`); only the plan differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..activations import Activation
from .chunked import Plan, Tile, _ChunkedFunction, default_block_sizes, settle_plan, tile_group
from .common import BlockSource, Layout

__all__ = ["chunked_varlen", "varlen_plan"]


@dataclass
class _DocTile(Tile):
    # query row i and key j are at document positions i - row_start and j - key_start;
    # shift = row_start - key_start, so causal allows j <= i - shift.
    shift: int = 0


@dataclass
class _VarlenPlan(Plan):
    def blocked(self, tile: Tile, h0: int, h1: int, device: torch.device) -> torch.Tensor | None:
        if not tile.masked:
            return None
        i = torch.arange(tile.i0, tile.i1, device=device).unsqueeze(-1) - tile.shift
        j = torch.arange(tile.j0, tile.j1, device=device)
        return j > i


def varlen_plan(
    activation: Activation,
    docs: list[tuple[int, int, int, int]],
    layout: Layout,
    groups_q: int,
    total_q: int,
    scale: float,
    causal: bool,
    r: torch.Tensor | float,
    bias: BlockSource | None,
    device: torch.device,
    dtype_bytes: int,
    block_sizes: tuple[int, int] | None = None,
) -> Plan:
    """The chunked plan of one packed call.

    ``docs`` lists (q_start, q_end, k_start, k_end) per document; ``layout`` is the
    flat (Hk, G * total_q, total_k) problem; ``r`` the 1/divisor per stacked row.
    """
    max_q = max((b - a for a, b, _, _ in docs), default=0)
    max_k = max((d - c for _, _, c, d in docs), default=0)
    doc_layout = Layout(layout.bh, max(max_q, 1), max(max_k, 1), layout.d, layout.dv)
    bq, bk = block_sizes or default_block_sizes(doc_layout, device)
    plan = _VarlenPlan(activation, layout, scale, causal, bq, bk, None, bias, r)
    group = tile_group(layout, bq, bk, dtype_bytes, device)
    plan.groups = [(h, min(layout.bh, h + group)) for h in range(0, layout.bh, group)]
    for g in range(groups_q):
        for qa, qb, ka, kb in docs:
            n, m = qb - qa, kb - ka
            row0 = g * total_q + qa
            for i0 in range(0, n, bq):
                i1 = min(n, i0 + bq)
                j_end = min(m, i1) if causal else m
                for j0 in range(0, j_end, bk):
                    j1 = min(j_end, j0 + bk)
                    diagonal = causal and j1 - 1 > i0
                    plan.tiles.append(
                        _DocTile(row0 + i0, row0 + i1, ka + j0, ka + j1, diagonal, diagonal, shift=row0 - ka)
                    )
    return settle_plan(plan, activation, layout, dtype_bytes)


def chunked_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    activation: Activation,
    docs: list[tuple[int, int, int, int]],
    *,
    causal: bool,
    scale: float,
    row_counts: torch.Tensor,
    row_bias: torch.Tensor | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Packed attention (total_q, H, d) x (total_k, Hk, d) -> (total_q, H, dv) on the chunked backend.

    ``row_counts`` (total_q,) are the keys each row may attend (for /sqrt(N), /N);
    ``row_bias`` (total_q,) an optional per-row additive score bias (sigmoid-log(N)'s -log N).
    Inputs are in the compute dtype already.
    """
    total_q, heads, d = q.shape
    total_k, kv_heads, dv = v.shape
    groups_q = heads // kv_heads
    # (total, Hk, G, d) -> (Hk, G * total, d): a group's query heads become rows of its k/v head. k and v
    # (and q without GQA) are read as strided views, rows H * d apart: the tiles' products take them as
    # they are, and the gradients come back in the packed layout.
    kf, vf = k.transpose(0, 1), v.transpose(0, 1)
    if groups_q == 1:
        qf = q.transpose(0, 1)
    else:
        qf = q.reshape(total_q, kv_heads, groups_q, d).permute(1, 2, 0, 3).reshape(kv_heads, groups_q * total_q, d)
    layout = Layout(kv_heads, groups_q * total_q, total_k, d, dv)

    def stacked(t: torch.Tensor) -> torch.Tensor:  # (total_q,) -> (1, G * total_q, 1)
        return t.to(q.dtype).repeat(groups_q).view(1, -1, 1)

    r: torch.Tensor | float = 1.0
    if activation.divisor is not None:
        r = (
            1.0 / activation.divisor_value(stacked(row_counts))
            if activation.is_dynamic
            else 1.0 / float(activation.divisor_value(1))
        )
    bias = BlockSource(stacked(row_bias), (kv_heads,)) if row_bias is not None else None
    plan = varlen_plan(
        activation, docs, layout, groups_q, total_q, scale, causal, r, bias, q.device, q.element_size(), block_sizes
    )
    out = _ChunkedFunction.apply(qf, kf, vf, bias.flat if bias is not None else None, plan)
    return out.reshape(kv_heads, groups_q, total_q, dv).permute(2, 0, 1, 3).reshape(total_q, heads, dv).contiguous()
