"""``polyattn.attention_varlen``: attention over packed sequences (several documents in one row).

The layout is flash-attn's ``flash_attn_varlen_func``: q (total_q, H, d), k (total_k, Hk, d),
v (total_k, Hk, dv), and ``cu_seqlens`` int32 offsets of shape (docs + 1,) with document i at rows
``cu_seqlens[i]:cu_seqlens[i + 1]``. Each document attends to itself only, and the N of ``/sqrt(N)``,
``/N`` and ``sigmoid-log(N)`` is counted per document: the keys a row may attend inside its own
document (causal included). The result equals :func:`polyattn.attention` run on every document alone.

Backends:

- ``reference``, ``sdpa``, ``linear``: the backend run on each document in turn (the readable
  definition is the ``reference`` loop); ``linear`` thus keeps one state per document, its causal
  prefix sums restarting at every boundary;
- ``chunked``: one tiled pass over the packed tensors whose tiles never cross a document
  (:mod:`.backends.chunked_varlen`); memory O(total * block), no (total, total) mask;
- ``triton``: one fused kernel launch per pass whose programs read their document's offsets from
  cu_seqlens, as flash-attn's varlen kernels (:mod:`.backends.triton_varlen`).

``backend="auto"`` prices each backend per document with the cost model of ``polyattn.attention``
and takes the cheapest; :func:`explain_varlen` (or ``explain_backend(..., cu_seqlens_q=...)``) shows it.
"""

from __future__ import annotations

from collections import Counter

import torch

from .activations import Activation, ActivationLike, get_activation
from .backends import (
    BACKENDS,
    BackendChoice,
    BackendUnsupported,
    choice_table,
    lowest_cost,
    rank_candidates,
)
from .backends.auto import estimate
from .backends.chunked_varlen import chunked_varlen
from .backends.common import CallInfo
from .backends.triton_varlen import triton_varlen
from .functional import attention, autocast_off, compute_dtype

__all__ = ["attention_varlen", "explain_varlen", "packed_row_counts", "select_backend_varlen"]

Docs = list[tuple[int, int, int, int]]  # (q_start, q_end, k_start, k_end) per document


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be packed as (total_tokens, heads, head_dim) as in flash_attn_varlen_func, got "
                f"{tuple(t.shape)}; for (B, H, N, d) batches use polyattn.attention"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if q.shape[2] < 1 or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must share a head dimension d >= 1: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"k and v must have the same tokens and heads: k {tuple(k.shape)} (total_k, Hk, d), "
            f"v {tuple(v.shape)} (total_k, Hk, dv)"
        )
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q has {q.shape[1]} heads and k/v {k.shape[1]}: grouped-query attention needs the query heads to be "
            "a multiple of the key/value heads (query head h reads k/v head h // (H / Hk), as flash-attn)"
        )


def _offsets(name: str, cu: object, total: int, device: torch.device) -> list[int]:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape (docs + 1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(
            f"{name} must be int32 (as flash-attn's cu_seqlens), got {cu.dtype}; convert it with {name}.to(torch.int32)"
        )
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}; move it with {name}.to(q.device)")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{name} must have shape (docs + 1,) with at least one document, e.g. [0, 5, 12], got shape "
            f"{tuple(cu.shape)}"
        )
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0 (the first document's first token), got {offsets[0]}")
    bad = next((i for i in range(1, len(offsets)) if offsets[i] < offsets[i - 1]), None)
    if bad is not None:
        raise ValueError(
            f"{name} must be non-decreasing (documents in order, lengths >= 0), but {name}[{bad}] = {offsets[bad]} "
            f"< {name}[{bad - 1}] = {offsets[bad - 1]}"
        )
    if offsets[-1] != total:
        raise ValueError(
            f"{name}[-1] = {offsets[-1]} must equal the number of packed tokens, {total} (the first dimension "
            "of q for cu_seqlens_q, of k and v for cu_seqlens_k)"
        )
    return offsets


def _documents(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
) -> Docs:
    """The checked (q_start, q_end, k_start, k_end) of every document."""
    oq = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"q has {q.shape[0]} packed tokens and k {k.shape[0]}: pass cu_seqlens_k for keys packed "
                "differently from the queries"
            )
        ok = oq
    else:
        ok = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(ok) != len(oq):
        raise ValueError(
            f"cu_seqlens_q describes {len(oq) - 1} documents and cu_seqlens_k {len(ok) - 1}; they must describe "
            "the same documents"
        )
    for name, given, offs in (("max_seqlen_q", max_seqlen_q, oq), ("max_seqlen_k", max_seqlen_k, ok)):
        longest = max(b - a for a, b in zip(offs[:-1], offs[1:], strict=True))
        if given is not None and int(given) < longest:
            raise ValueError(
                f"{name}={int(given)} is shorter than the longest document ({longest} tokens); pass the true "
                "maximum or None (it is then read from cu_seqlens)"
            )
    return [(oq[i], oq[i + 1], ok[i], ok[i + 1]) for i in range(len(oq) - 1)]


def packed_row_counts(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool) -> torch.Tensor:
    """(total_q,) int64: the keys each packed query row may attend inside its own document.

    Not causal: the document's key count. Causal: min(position in the document + 1, its key count).
    """
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    lens_q, lens_k = cq.diff(), ck.diff()
    doc = torch.repeat_interleave(torch.arange(lens_q.numel(), device=cq.device), lens_q)
    nk = lens_k[doc]
    if not causal:
        return nk
    local = torch.arange(doc.numel(), device=cq.device) - cq[doc]
    return torch.minimum(local + 1, nk)


def _call_infos(
    q: torch.Tensor, v: torch.Tensor, act: Activation, docs: Docs, causal: bool
) -> list[tuple[int, CallInfo]]:
    """(how many documents, the call one of them makes) for each distinct (n_q, n_k); empty ones skipped."""
    sizes = Counter((b - a, d - c) for a, b, c, d in docs if b > a and d > c)
    base = act.unshifted() if act.shift is not None else act
    return [
        (
            count,
            CallInfo(
                device=q.device,
                dtype=q.dtype,
                bh=q.shape[1],
                nq=nq,
                nk=nk,
                d=q.shape[2],
                dv=v.shape[2],
                activation=base,
                mask=None,
                has_bias=act.shift is not None,  # sigmoid-log(N)'s -log N reaches the backends as a bias
                causal=causal,
                dropout_p=0.0,
            ),
        )
        for (nq, nk), count in sorted(sizes.items())
    ]


def _unsupported(name: str, infos: list[tuple[int, CallInfo]], act: Activation) -> str | None:
    if name == "chunked":
        return None  # the packed plan takes every activation (sigmoid-log(N) as a per-row bias)
    backend = BACKENDS[name]
    probe = infos[0][1] if infos else None
    if probe is None:
        return None
    return backend.unsupported(probe)


def _choose(q: torch.Tensor, v: torch.Tensor, act: Activation, docs: Docs, causal: bool) -> BackendChoice:
    infos = _call_infos(q, v, act, docs, causal)

    def estimated(name: str) -> tuple[float, str]:
        seconds = sum(count * estimate(name, info).seconds for count, info in infos)
        how = {"chunked": "one tiled pass, tiles inside documents", "triton": "one kernel, offsets read in it"}.get(
            name, "one call per document"
        )
        return seconds, f"{len(docs)} documents, {how}"

    candidates = rank_candidates(q.device, lambda name: _unsupported(name, infos, act), estimated)
    entries = sum(count * info.bh * info.nq * info.nk for count, info in infos)
    none_finite = ("chunked", "no estimate is finite; the tiled pass holds the least")
    return lowest_cost(candidates, entries, f"{entries} scores over all documents", none_finite)


def _packed_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
) -> tuple[torch.Tensor, Docs]:
    """v (k when None) and the checked documents of a select/explain call."""
    v = k if v is None else v
    _check_tensors(q, k, v)
    return v, _documents(q, k, cu_seqlens_q, cu_seqlens_k, None, None)


def select_backend_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    activation: ActivationLike,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    v: torch.Tensor | None = None,
    causal: bool = False,
) -> BackendChoice:
    """The backend ``attention_varlen(..., backend="auto")`` runs for these packed inputs, with the reason."""
    v, docs = _packed_call(q, k, v, cu_seqlens_q, cu_seqlens_k)
    return _choose(q, v, get_activation(activation), docs, causal)


def explain_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    activation: ActivationLike,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    v: torch.Tensor | None = None,
    causal: bool = False,
) -> str:
    """A table of every backend for one packed call: estimated fwd+bwd seconds or why not; and auto's pick."""
    v, docs = _packed_call(q, k, v, cu_seqlens_q, cu_seqlens_k)
    act = get_activation(activation)
    choice = _choose(q, v, act, docs, causal)
    lens = [b - a for a, b, _, _ in docs]
    header = (
        f"attention_varlen {act.spec!r}: {len(docs)} documents of {min(lens)}..{max(lens)} tokens "
        f"(total_q={q.shape[0]} total_k={k.shape[0]}) H={q.shape[1]} Hk={k.shape[1]} d={q.shape[2]} "
        f"dv={v.shape[2]} {q.device.type} {str(q.dtype).replace('torch.', '')} causal={causal}"
    )
    return choice_table(header, choice)


def _per_document(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    act: Activation,
    docs: Docs,
    causal: bool,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    """The definition: ``polyattn.attention`` on each document alone, outputs packed back in order."""
    heads, kv_heads, dv = q.shape[1], k.shape[1], v.shape[2]
    groups = heads // kv_heads
    outs = []
    for qa, qb, ka, kb in docs:
        n, m = qb - qa, kb - ka
        if n == 0:
            continue
        if m == 0:  # nothing to attend: zero rows, as polyattn.attention gives fully masked rows
            outs.append(q.new_zeros(n, heads, dv))
            continue
        # (n, H, d) -> (Hk, G, n, d) against (Hk, 1, m, d): a group's query heads share their k/v head by broadcasting.
        qd = q[qa:qb].reshape(n, kv_heads, groups, -1).permute(1, 2, 0, 3)
        kd = k[ka:kb].transpose(0, 1).unsqueeze(1)
        vd = v[ka:kb].transpose(0, 1).unsqueeze(1)
        out = attention(qd, kd, vd, act, causal=causal, scale=scale, backend=backend)
        outs.append(out.permute(2, 0, 1, 3).reshape(n, heads, dv))
    if not outs:
        return q.new_zeros(q.shape[0], heads, dv)
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    act: Activation,
    docs: Docs,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    out_dtype = q.dtype
    cd = compute_dtype(out_dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    counts = packed_row_counts(cu_q, cu_k, causal) if act.is_dynamic else torch.zeros(0, device=q.device)
    row_bias = None
    if act.shift is not None:
        row_bias = -act.shift_value(counts.to(cd))
        act = act.unshifted()
    scale_value = float(scale) if scale is not None else q.shape[-1] ** -0.5
    with autocast_off(q.device.type):
        out = chunked_varlen(q, k, v, act, docs, causal=causal, scale=scale_value, row_counts=counts, row_bias=row_bias)
    return out.to(out_dtype)


def _triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    act: Activation,
    docs: Docs,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    out_dtype = q.dtype
    cd = BACKENDS["triton"].compute_dtype(out_dtype, q.device)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    counts = packed_row_counts(cu_q, cu_k, causal) if act.is_dynamic else None
    scale_value = float(scale) if scale is not None else q.shape[-1] ** -0.5
    max_q = max(b - a for a, b, _, _ in docs)
    max_k = max(d - c for _, _, c, d in docs)
    with autocast_off(q.device.type):
        out = triton_varlen(q, k, v, act, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale_value, row_counts=counts)
    return out.to(out_dtype)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    activation: ActivationLike = "softmax",
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over packed documents, as ``flash_attn_varlen_func``; returns (total_q, H, dv).

    - q (total_q, H, d), k (total_k, Hk, d), v (total_k, Hk, dv); H a multiple of Hk (grouped-query
      attention: query head h reads k/v head h // (H / Hk); chunked and triton read k and v as they
      are, the per-document backends broadcast them as :func:`polyattn.attention` does).
    - ``cu_seqlens_q`` int32 (docs + 1,): document i is q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]];
      ``cu_seqlens_k`` likewise for k and v (None: the same as the queries). Empty documents are
      allowed; a query document with no keys outputs zeros.
    - Every document attends only to itself. N (in ``/sqrt(N)``, ``/N``, ``sigmoid-log(N)``) is the
      number of keys the row may attend inside its document; ``causal`` masks key j > query i,
      positions counted from the document's start (top-left aligned, as :func:`polyattn.attention`).
    - ``max_seqlen_q``/``max_seqlen_k`` are accepted for flash-attn compatibility and checked
      against the true maxima (they are read from cu_seqlens anyway).
    - ``backend``: ``"auto"`` or one of reference, sdpa, chunked, linear, triton (see the module docstring).
    """
    _check_tensors(q, k, v)
    docs = _documents(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    act = get_activation(activation)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if backend == "auto":
        backend = _choose(q, v, act, docs, causal).name
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    else:
        why_not = _unsupported(backend, _call_infos(q, v, act, docs, causal), act)
        if why_not is not None:
            raise BackendUnsupported(
                f"backend {backend!r} cannot compute this packed call: {why_not}. Use backend='auto' (which picks "
                "one that can) or backend='reference'."
            )
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    if backend == "chunked":
        return _chunked(q, k, v, act, docs, cu_seqlens_q, cu_k, causal, scale)
    if backend == "triton":
        return _triton(q, k, v, act, docs, cu_seqlens_q, cu_k, causal, scale)
    return _per_document(q, k, v, act, docs, causal, scale, backend)
