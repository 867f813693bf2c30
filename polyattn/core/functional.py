"""``polyattn.attention``: scaled dot-product attention with a pluggable activation."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from .activations import ActivationLike, get_activation
from .backends import resolve_backend
from .backends.common import BlockSource, row_counts, values_known

__all__ = ["attention", "autocast_off", "compute_dtype"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are computed in fp32 (x^3 of a score of 40 is 64,000, fp16's edge); others as they are."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that turns autocast off for ``device_type`` when it is on (and costs nothing when not)."""
    # Meta and other devices have no autocast at all (asking raises).
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float | None,
    dropout_p: float,
) -> tuple[int, ...]:
    """Validate arguments; returns the shape of the score matrix S."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor, got dtype {t.dtype}; convert it with {name}.float()"
            )
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., N, d), got {_shape(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    _check_devices(q, k, v, attn_mask, bias)
    if q.shape[-1] < 1:
        # scale 1/sqrt(d) and every score are undefined without a head dimension.
        raise ValueError(f"the head dimension d must be >= 1, got q {_shape(q)} and k {_shape(k)} (..., N, d)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dimension d: q {_shape(q)} (..., Nq, d), k {_shape(k)} (..., Nk, d)"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of keys Nk: k {_shape(k)} (..., Nk, d), v {_shape(v)} (..., Nk, dv)"
        )
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        hint = ""
        if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
            hint = (
                f"; for grouped-query attention ({q.shape[-3]} query heads over {k.shape[-3]} key/value heads) "
                "pass enable_gqa=True, as to F.scaled_dot_product_attention"
            )
        raise ValueError(
            f"the leading (batch/head) dimensions of q {_shape(q)}, k {_shape(k)} and v {_shape(v)} do not "
            f"broadcast{hint}"
        ) from None
    s_shape = (*batch, q.shape[-2], k.shape[-2])

    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a bool tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            raise TypeError(
                f"attn_mask must be a bool tensor (True = may attend), got dtype {attn_mask.dtype}; "
                "pass additive float masks as bias=..., or convert with attn_mask.bool()"
            )
        _check_broadcast("attn_mask", attn_mask, s_shape)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a float tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got dtype {bias.dtype}")
        _check_broadcast("bias", bias, s_shape)
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (or None for 1/sqrt(d)), got {scale}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return s_shape


def _check_devices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: object, bias: object) -> None:
    # Mixed devices must fail here: a meta q with CPU k, v would otherwise run
    # on CPU and return uninitialised memory instead of an error.
    named = [("q", q), ("k", k), ("v", v)]
    named += [(n, t) for n, t in (("attn_mask", attn_mask), ("bias", bias)) if isinstance(t, torch.Tensor)]
    if any(t.device != q.device for _, t in named):
        listed = ", ".join(f"{n}.device: {t.device}" for n, t in named)
        raise ValueError(
            f"q, k and v (and attn_mask, bias when given) must be on one device, got {listed}; "
            "move them with .to(q.device)"
        )


def _check_broadcast(name: str, t: torch.Tensor, s_shape: tuple[int, ...]) -> None:
    ok = t.dim() <= len(s_shape)
    if ok:
        try:
            ok = torch.broadcast_shapes(t.shape, s_shape) == torch.Size(s_shape)
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(f"{name} of shape {_shape(t)} does not broadcast to the score shape {s_shape} (..., Nq, Nk)")


def _row_counts(
    attn_mask: torch.Tensor | None, causal: bool, s_shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Keys each query row may attend, broadcastable to (..., Nq, 1): the backends' own count, which
    never builds the (Nq, Nk) causal mask."""
    batch = s_shape[:-2]
    mask = None if attn_mask is None else BlockSource(attn_mask, batch)
    counts = row_counts(mask, causal, s_shape[-2], s_shape[-1], device)
    if counts is None:  # every row sees all Nk keys
        return torch.full((1, 1), s_shape[-1], device=device)
    lead = batch if counts.shape[0] > 1 else (1,) * len(batch)
    return counts.reshape(*lead, counts.shape[1], 1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    activation: ActivationLike = "softmax",
    *,
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention ``phi(scale * q k^T + bias) v`` with activation ``phi`` named by a spec string.

    Shapes follow ``F.scaled_dot_product_attention``: q (..., Nq, d), k (..., Nk, d),
    v (..., Nk, dv) -> (..., Nq, dv); leading dimensions broadcast.

    - ``scale`` defaults to 1/sqrt(d); ``bias`` is an additive float tensor
      broadcastable to (..., Nq, Nk), e.g. a relative-position bias.
    - ``attn_mask`` is bool, True = may attend; ``causal`` masks key j > query i
      (top-left aligned). Both may be given. Masked entries of A are exactly 0;
      softmax normalises over the allowed keys only; in ``/sqrt(N)`` and ``/N``,
      N counts the keys that row may attend. A row with nothing to attend
      outputs zeros.
    - fp16/bf16 inputs are computed in fp32 and returned in the input dtype.
    - ``dropout_p`` drops entries of A after masking, whenever it is > 0 (as in
      SDPA: pass 0 in eval mode; :class:`PolyAttention` does this for you).
    - ``backend``: ``"auto"`` (the cheapest backend that supports the call, see
      :func:`polyattn.select_backend` / :func:`polyattn.explain_backend`) or a
      name in ``polyattn.core.backends.BACKENDS``: ``reference``, ``sdpa``,
      ``chunked``, ``linear``, ``triton``. A named backend that cannot compute
      the call raises ``BackendUnsupported`` (a ValueError) saying why.
    - ``enable_gqa``: as in SDPA, k and v may have fewer heads (dimension -3) than q;
      query head h attends with key/value head ``h // (Hq / Hkv)``. Each group of query
      heads runs against k and v as they are: nothing copies them.
    """
    act = get_activation(activation)
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        return _grouped_query_attention(q, k, v, act, attn_mask, bias, causal, scale, dropout_p, backend)
    s_shape = _check_inputs(q, k, v, attn_mask, bias, scale, dropout_p)
    if act.shift is not None:
        # sigmoid(S - log N) is sigmoid(S + b) with b = -log N per row: every backend that takes a bias
        # computes it, and the gradient of the caller's bias (if any) flows through the sum unchanged.
        shift = act.shift_value(_row_counts(attn_mask, causal, s_shape, q.device).to(compute_dtype(q.dtype)))
        bias = -shift if bias is None else bias - shift
        act = act.unshifted()
    fn = resolve_backend(backend, q, k, v, act, attn_mask, bias, causal, dropout_p)

    out_dtype = q.dtype
    # sdpa and triton take bf16 as it is on a GPU (fp32 sums inside); the rest compute in fp32.
    cd = fn.compute_dtype(out_dtype, q.device)
    if cd != out_dtype:
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
        if bias is not None:
            bias = bias.to(cd)
    # Under autocast every matmul inside a backend would drop back to fp16/bf16, undoing the fp32
    # compute above (x^3 of an fp16 score overflows): the backend runs with autocast off.
    with autocast_off(q.device.type):
        out = fn(q, k, v, act, attn_mask=attn_mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p)
    out = out.to(out_dtype)
    # values_known: not while torch.compile traces, nor for meta and fake tensors, which have no values.
    if out.device.type == "cpu" and values_known(out):
        _warn_on_overflow(out, (q, k, v, bias), act)
    return out


def _warn_on_overflow(out: torch.Tensor, inputs: tuple[torch.Tensor | None, ...], act) -> None:
    """Warn (once per calling line) when finite inputs gave a non-finite output: the scores' powers
    overflowed. One sum over the output in the common case (a sum of finite numbers that is itself
    non-finite is checked entry by entry); CPU only, since on a GPU reading the answer would
    synchronise every call."""
    out = out.detach()
    if out.numel() == 0 or math.isfinite(float(out.sum())) or bool(torch.isfinite(out).all()):
        return
    if not all(t is None or bool(torch.isfinite(t.detach()).all()) for t in inputs):
        return  # non-finite in, non-finite out: nothing overflowed here
    warnings.warn(
        f"polyattn.attention: finite q, k, v gave a non-finite output under activation {act.spec!r} "
        f"({str(out.dtype).replace('torch.', '')} output): the scores' powers overflowed (docs/reliability.md, "
        "'Where scores overflow'). Use a divisor that grows with N (x^p/sqrt(N) or /N), a lower power, smaller "
        "scores (scale, or normalised q and k), or fp32 instead of fp16",
        RuntimeWarning,
        stacklevel=3,
    )


def _group_heads(t: torch.Tensor | None, heads: int, groups: int, g: int) -> torch.Tensor | None:
    """The query heads of group member ``g`` (heads g, G + g, ...: one per key/value head) of a mask or
    bias broadcastable to (..., Hq, Nq, Nk); one with a single head or none is shared as it is."""
    if t is None or t.dim() < 3 or t.shape[-3] == 1:
        return t
    if t.shape[-3] != heads:
        raise ValueError(
            f"a mask or bias with {t.shape[-3]} heads (shape {_shape(t)}) cannot broadcast to {heads} query heads"
        )
    return t.unflatten(-3, (heads // groups, groups))[..., g, :, :]


def _grouped_query_attention(q, k, v, act, attn_mask, bias, causal, scale, dropout_p, backend) -> torch.Tensor:
    """enable_gqa: the query heads that share a key/value head, one group member at a time, each call
    taking k and v as they are (SDPA's grouping: query head h reads key/value head h // G)."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 3:
            raise ValueError(f"enable_gqa needs {name} of shape (..., heads, N, d)")
    hq, hkv = q.shape[-3], k.shape[-3]
    if v.shape[-3] != hkv or hkv == 0 or hq % hkv:
        raise ValueError(
            f"enable_gqa: the query heads must be a multiple of the key/value heads, and k and v must have as many "
            f"heads as each other: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (..., heads, N, d)"
        )
    groups = hq // hkv
    qg = q.unflatten(-3, (hkv, groups))
    outs = [
        attention(
            qg[..., g, :, :],
            k,
            v,
            act,
            attn_mask=_group_heads(attn_mask, hq, groups, g),
            bias=_group_heads(bias, hq, groups, g),
            causal=causal,
            scale=scale,
            dropout_p=dropout_p,
            backend=backend,
        )
        for g in range(groups)
    ]
    return torch.stack(outs, dim=-3).flatten(-4, -3)
