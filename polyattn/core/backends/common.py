"""What every backend shares: the backend protocol, the call preamble, flat layouts, block access, row counts.

The protocol: each backend module exports

    NAME: str, SUMMARY: str
    NATIVE_CUDA_DTYPES: tuple[torch.dtype, ...]    optional: low-precision dtypes it takes as they are on a GPU
    unsupported(info: CallInfo) -> str | None       why it cannot compute a call, or None
    run(q, k, v, activation, *, attn_mask=None, bias=None, causal=False, scale=None, dropout_p=0.0,
        **options) -> Tensor                          made by :func:`backend_run`
    cost(info: CallInfo, rates: MachineRates) -> Estimate   fwd+bwd seconds for the cost model

``run`` is written once, here: it checks ``unsupported`` (raising
:class:`BackendUnsupported`), resolves the default scale, flattens the heads
and wraps masks and biases as :class:`BlockSource`, then hands a :class:`Call`
to the backend's own compute function.

The fast backends work on q, k, v flattened to (BH, N, d), where BH is the
product of the broadcast leading dimensions. Masks and biases stay in their
own (often broadcast) shapes and are read one block at a time, so a key-padding
mask (B, 1, 1, Nk) or a shared (Nq, Nk) bias is never expanded to
(B, H, Nq, Nk).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..activations import Activation, ActivationLike, get_activation


def _is_fake(t: torch.Tensor) -> bool:
    # Importing torch's fake-tensor module takes about a second (it loads dynamo and sympy), and no
    # tensor can be fake before something else has imported it: look it up only when it is loaded.
    module = sys.modules.get("torch._subclasses.fake_tensor")
    is_fake = getattr(module, "is_fake", None)  # private, but the one test that covers every subclass
    return bool(is_fake(t)) if is_fake is not None else False


__all__ = [
    "BackendUnsupported",
    "BlockSource",
    "Call",
    "CallInfo",
    "Estimate",
    "Layout",
    "MachineRates",
    "backend_run",
    "batch_shape",
    "causal_block",
    "compute_dtype",
    "flatten_heads",
    "keys_only_limits",
    "mask_kind",
    "num_threads",
    "refuse_double_backward",
    "row_counts",
    "row_factors",
    "row_slice",
    "scale_rows",
    "unflatten",
    "values_known",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class BackendUnsupported(ValueError):
    """A backend was asked for a combination of inputs it cannot compute."""


def refuse_double_backward(name: str, why: str = "") -> None:
    """Called at the top of a custom backward: its gradients carry no graph of their own.

    Grad mode is on inside backward only under ``create_graph=True``; returning
    graph-less gradients there would silently drop every second-order term.
    ``why`` is appended to the backend's name in the message.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend {name!r}{why} is not twice differentiable (create_graph=True through attention); "
            "use backend='reference' for higher derivatives"
        )


def values_known(*tensors: torch.Tensor | None) -> bool:
    """Whether Python may read these tensors' values (``bool(mask.all())`` and the like).

    False while torch.compile traces (reading a value breaks the graph) and for
    meta and fake tensors, which have no values. Data-dependent shortcuts (such
    as skipping key blocks that are masked for every query) must then take the
    general path, which computes the same result.
    """
    if torch.compiler.is_compiling():
        return False
    return not any(t is not None and (t.is_meta or _is_fake(t)) for t in tensors)


def assume_constant_result(fn: Callable) -> Callable:
    """torch.compiler.assume_constant_result without its cost: calling that imports dynamo (about a
    second, with sympy) in every process that imports polyattn, compiled or not; it only sets this mark."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@assume_constant_result
def num_threads() -> int:
    """``torch.get_num_threads()``, which dynamo cannot put in a graph.

    It only sizes tiles, so under torch.compile the value at trace time is
    baked into the graph instead of breaking it.
    """
    return torch.get_num_threads()


def batch_shape(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The broadcast leading (batch, head) shape of tensors shaped (..., N, d)."""
    shapes = [tuple(t.shape[:-2]) for t in tensors]
    if all(sh == shapes[0] for sh in shapes):  # the common case, without torch's general broadcasting
        return shapes[0]
    return tuple(torch.broadcast_shapes(*shapes))


def flatten_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """q, k, v with broadcast leading dims -> contiguous (BH, N, d) views/copies, and the batch shape.

    Differentiable: gradients of broadcast inputs are summed back by autograd.
    """
    batch = batch_shape(q, k, v)

    def flat(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape[:-2]) != batch:
            t = t.expand(*batch, *t.shape[-2:])
        # An explicit BH, not -1: reshape cannot infer -1 for an empty tensor (B = 0 or dv = 0).
        return t.reshape(math.prod(batch), *t.shape[-2:]).contiguous()

    return flat(q), flat(k), flat(v), batch


def unflatten(out: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    return out.reshape(*batch, *out.shape[-2:])


def causal_block(i0: int, i1: int, j0: int, j1: int, device: torch.device) -> torch.Tensor:
    """(i1-i0, j1-j0) bool, True where key j <= query i (top-left aligned, as SDPA's is_causal)."""
    i = torch.arange(i0, i1, device=device).unsqueeze(-1)
    j = torch.arange(j0, j1, device=device)
    return j <= i


class BlockSource:
    """A tensor broadcastable to (*batch, Nq, Nk), read (and for gradients written) block by block.

    ``flat`` is the tensor reshaped to (MB, MQ, MK) with MB the product of its
    own leading dims (1 or matching the batch), MQ in {1, Nq}, MK in {1, Nk}.
    A block comes back as (BH or 1, bq or 1, bk or 1), ready to broadcast
    against a (BH, bq, bk) tile. ``heads(h0, h1)`` restricts it to a range of
    the flat batch.
    """

    def __init__(self, t: torch.Tensor, batch: tuple[int, ...]) -> None:
        pad = len(batch) + 2 - t.dim()
        t = t.reshape((1,) * pad + tuple(t.shape))
        own_batch = tuple(t.shape[:-2])
        self.rows_broadcast = t.shape[-2] == 1
        self.cols_broadcast = t.shape[-1] == 1
        nb = math.prod(own_batch)
        self.flat = t.reshape(nb, t.shape[-2], t.shape[-1])
        self.h0, self.h1 = 0, math.prod(batch)
        # "shared": one entry for the whole batch; "identity": one per flat
        # batch entry; "indexed": broadcast over some batch dims (e.g. a
        # (1, H, N, N) bias under batch (B, H)), mapped through ``index``.
        self.index: torch.Tensor | None = None
        if nb == 1:
            self.kind = "shared"
        elif own_batch == batch:
            self.kind = "identity"
        else:
            self.kind = "indexed"
            self.index = torch.arange(nb, device=t.device).reshape(own_batch).expand(*batch).reshape(-1)

    def heads(self, h0: int, h1: int) -> BlockSource:
        """The same source restricted to flat batch entries [h0, h1)."""
        sub = copy.copy(self)
        sub.h0, sub.h1 = h0, h1
        return sub

    def _slices(self, i0: int, i1: int, j0: int, j1: int) -> tuple[slice, slice]:
        rs = slice(0, 1) if self.rows_broadcast else slice(i0, i1)
        cs = slice(0, 1) if self.cols_broadcast else slice(j0, j1)
        return rs, cs

    def block(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        rs, cs = self._slices(i0, i1, j0, j1)
        if self.kind == "shared":
            return self.flat[:, rs, cs]
        if self.kind == "identity":
            return self.flat[self.h0 : self.h1, rs, cs]
        return self.flat[:, rs, cs].index_select(0, self.index[self.h0 : self.h1])

    def accumulate(self, grad: torch.Tensor, g: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        """Add the (heads, bq, bk) tile gradient g into ``grad`` (shaped like ``flat``) at this block."""
        if self.rows_broadcast:
            g = g.sum(dim=1, keepdim=True)
        if self.cols_broadcast:
            g = g.sum(dim=2, keepdim=True)
        rs, cs = self._slices(i0, i1, j0, j1)
        if self.kind == "shared":
            grad[:, rs, cs].add_(g.sum(dim=0, keepdim=True))
        elif self.kind == "identity":
            grad[self.h0 : self.h1, rs, cs].add_(g)
        else:
            grad[:, rs, cs].index_add_(0, self.index[self.h0 : self.h1], g)

    def key_flags(self, nk: int) -> torch.Tensor:
        """A padding mask (rows broadcast) as one flag per key: (BH or 1, Nk), in the mask's dtype."""
        m = self.flat[:, 0, :]
        if self.cols_broadcast:
            m = m.expand(m.shape[0], nk)
        if self.index is not None:
            m = m.index_select(0, self.index)
        return m


def mask_kind(attn_mask: torch.Tensor | None) -> str | None:
    """None, ``"padding"`` (the same keys for every query: shape (..., 1, Nk)) or ``"full"``."""
    if attn_mask is None:
        return None
    if attn_mask.dim() >= 2 and attn_mask.shape[-2] == 1:
        return "padding"
    if attn_mask.dim() < 2:
        return "padding"
    return "full"


def row_counts(
    mask: BlockSource | None, causal: bool, nq: int, nk: int, device: torch.device, block: int = 512
) -> torch.Tensor | None:
    """Keys each query row may attend, as (BH or 1, Nq or 1, 1) int64; None when every row sees all Nk.

    Never builds the (Nq, Nk) causal mask: padding masks use a prefix sum over
    keys, full masks are summed one block of rows at a time.
    """
    if mask is None:
        if not causal:
            return None
        return torch.arange(1, nq + 1, device=device).clamp_(max=nk).view(1, nq, 1)
    m = mask.flat
    if mask.cols_broadcast:  # (.., 1) mask: every key shares one flag per row
        m = m.expand(m.shape[0], m.shape[1], nk)
    if mask.rows_broadcast:
        if not causal:
            counts = m.sum(dim=-1, keepdim=True)
        else:
            prefix = m[:, 0, :].cumsum(dim=-1)  # (MB, Nk): allowed keys among 0..j
            last = torch.arange(nq, device=device).clamp_(max=max(nk - 1, 0))
            counts = (
                prefix.index_select(1, last).unsqueeze(-1)
                if nk > 0
                else torch.zeros(m.shape[0], nq, 1, dtype=torch.long, device=device)
            )
    else:
        parts = []
        for i0 in range(0, nq, block):
            i1 = min(nq, i0 + block)
            mb = m[:, i0:i1, :]
            if causal:
                mb = mb & causal_block(i0, i1, 0, nk, device)
            parts.append(mb.sum(dim=-1, keepdim=True))
        counts = torch.cat(parts, dim=1) if parts else torch.zeros(m.shape[0], 0, 1, dtype=torch.long)
    if mask.index is not None:
        counts = counts.index_select(0, mask.index)
    return counts


def row_factors(
    activation: Activation, counts: torch.Tensor | None, nk: int, dtype: torch.dtype
) -> torch.Tensor | float:
    """1 / divisor per query row: (BH or 1, Nq or 1, 1) tensor for dynamic divisors, else a float.

    The divisor scales a whole row of A, so backends apply it to the output
    rows (and to dO in backward) instead of to every entry of A.
    """
    if activation.divisor is None:
        return 1.0
    if not activation.is_dynamic:
        return 1.0 / float(activation.divisor_value(nk))
    if counts is None:
        return 1.0 / float(activation.divisor_value(nk))
    return 1.0 / activation.divisor_value(counts.to(dtype))


@dataclass(frozen=True)
class Layout:
    """Sizes of one flattened attention problem."""

    bh: int
    nq: int
    nk: int
    d: int
    dv: int

    @staticmethod
    def of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Layout:
        return Layout(q.shape[0], q.shape[1], k.shape[1], q.shape[2], v.shape[2])


def row_slice(t: torch.Tensor | float, h0: int, h1: int, i0: int, i1: int) -> torch.Tensor | float:
    """Heads [h0, h1) and rows [i0, i1) of a per-row factor shaped (BH or 1, Nq or 1, 1), or the float itself."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t if t.shape[0] == 1 else t[h0:h1]
    return t if t.shape[1] == 1 else t[:, i0:i1]


def scale_rows(x: torch.Tensor, r: torch.Tensor | float) -> torch.Tensor:
    """x * r, skipping the pass when r is the float 1."""
    if isinstance(r, torch.Tensor) or r != 1.0:
        return x * r
    return x


def compute_dtype(dtype: torch.dtype, device: torch.device, native_cuda: tuple[torch.dtype, ...]) -> torch.dtype:
    """The dtype a backend receives from :func:`polyattn.attention` for inputs of ``dtype``.

    fp16 and bf16 are upcast to fp32 (x^3 of a score of 40 overflows fp16)
    except on a GPU for the low-precision dtypes the backend takes natively.
    """
    if dtype in _LOW_PRECISION:
        return dtype if (device.type == "cuda" and dtype in native_cuda) else torch.float32
    return dtype


def keys_only_limits(info: CallInfo, what: str) -> str | None:
    """Why a backend that never forms the (Nq, Nk) matrix (linear, triton) cannot take this call, or None.

    Such a backend sums over keys: it has no entry of A to add a bias to or
    drop out, and a mask it can apply must be one flag per key.
    """
    if info.has_bias:
        return f"{what} takes no additive bias"
    if info.dropout_p > 0.0:
        return f"{what} has no dropout (that needs the materialised A)"
    if info.mask == "full":
        return f"{what} takes key-padding masks (..., 1, Nk) only, not per-query masks"
    return None


# --------------------------------------------------------------------------
# the protocol: what a call is, what it costs, and the shared preamble
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class CallInfo:
    """What the cost model and the support checks need to know about one attention call."""

    device: torch.device
    dtype: torch.dtype
    bh: int
    nq: int
    nk: int
    d: int
    dv: int
    activation: Activation
    mask: str | None  # None, "padding" (one flag per key) or "full" (per query and key)
    has_bias: bool
    causal: bool
    dropout_p: float

    @staticmethod
    def of(
        q: torch.Tensor,
        k: torch.Tensor,
        activation: ActivationLike,
        *,
        v: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        has_mask: bool = False,
        has_bias: bool = False,
        causal: bool = False,
        dropout_p: float = 0.0,
    ) -> CallInfo:
        """Describe a call; ``has_mask``/``has_bias`` stand for a mask (assumed per-query) or bias not at hand."""
        batch = batch_shape(q, k, *([v] if v is not None else []))
        kind = mask_kind(attn_mask) if attn_mask is not None else ("full" if has_mask else None)
        return CallInfo(
            device=q.device,
            dtype=q.dtype,
            bh=math.prod(batch),
            nq=q.shape[-2],
            nk=k.shape[-2],
            d=q.shape[-1],
            dv=v.shape[-1] if v is not None else q.shape[-1],
            activation=get_activation(activation),
            mask=kind,
            has_bias=has_bias or bias is not None,
            causal=causal,
            dropout_p=dropout_p,
        )

    @property
    def entries(self) -> int:
        """Score entries computed: BH * Nq * Nk (about half of it under causal)."""
        e = self.bh * self.nq * self.nk
        if self.causal:
            n = min(self.nq, self.nk)
            e = self.bh * (n * (n + 1) // 2 + max(self.nq - self.nk, 0) * self.nk)
        return max(e, 1)

    @property
    def product_flops(self) -> float:
        """FLOPs of one (Nq, Nk) x (Nk, d or dv) matrix product over the computed entries: 2 * entries * (d + dv) / 2.

        Forward and backward multiply by q, k (d) and by v, dO (dv) alike, so
        the average head dimension prices each of them.
        """
        return self.entries * (self.d + self.dv)

    @property
    def layout(self) -> Layout:
        return Layout(self.bh, self.nq, self.nk, self.d, self.dv)


@dataclass(frozen=True)
class Estimate:
    seconds: float
    note: str


@dataclass(frozen=True)
class MachineRates:
    """The throughputs of one kind of machine: the only machine constants of the cost model.

    ``scale`` multiplies one backend's estimates (from :func:`polyattn.core.backends.auto.calibrated`).
    """

    matmul_flops: float  # dense fp32 matrix product, FLOP/s
    sdpa_flops: float  # SDPA softmax fwd+bwd, FLOP/s (its six products, as :attr:`CallInfo.product_flops`)
    sdpa_fixed: float  # SDPA seconds per fwd+bwd call (small-N overhead)
    ew_cache: float  # elementwise elements/s on a cache-resident tile
    ew_memory: float  # elementwise elements/s on a tensor streamed from memory (with allocation)
    op_overhead: float  # seconds per PyTorch operation (dispatch, a parallel region, a kernel launch)
    cache_bytes: float  # a working set up to this size runs elementwise passes at ew_cache
    memory_budget: float  # bytes the materialised reference may hold before it is ruled out
    scale: dict[str, float] = field(default_factory=dict)

    def seconds(self, *, flops: float = 0.0, cached: float = 0.0, streamed: float = 0.0, ops: float = 0.0) -> float:
        """Matrix-product FLOPs, elementwise element-passes (in cache, from memory) and PyTorch ops, in seconds."""
        return flops / self.matmul_flops + cached / self.ew_cache + streamed / self.ew_memory + ops * self.op_overhead


@dataclass
class Call:
    """One call after the shared preamble: support checked, heads flattened (for flat backends).

    ``q, k, v`` are (BH, N, d) for flat backends and as given otherwise;
    ``mask`` and ``bias`` wrap attn_mask and bias (cast to q's dtype) for
    block access; ``scale`` is as given (None: 1/sqrt(d), see :attr:`scale_value`).
    """

    activation: Activation
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    batch: tuple[int, ...]
    attn_mask: torch.Tensor | None
    bias: torch.Tensor | None
    causal: bool
    scale: float | None
    dropout_p: float
    mask: BlockSource | None = None
    bias_source: BlockSource | None = None

    @property
    def scale_value(self) -> float:
        return float(self.scale) if self.scale is not None else self.q.shape[-1] ** -0.5

    @property
    def layout(self) -> Layout:
        return Layout.of(self.q, self.k, self.v)

    def row_factors(self, dtype: torch.dtype) -> torch.Tensor | float:
        """1 / divisor per query row (see :func:`row_factors`), from the mask and causal row counts."""
        lay = self.layout
        counts = None
        if self.activation.is_dynamic:
            counts = row_counts(self.mask, self.causal, lay.nq, lay.nk, self.q.device)
        return row_factors(self.activation, counts, lay.nk, dtype)

    def key_flags(self) -> torch.Tensor | None:
        """The padding mask as (BH or 1, Nk) flags per key (backends that take no per-query mask), or None."""
        return self.mask.key_flags(self.layout.nk) if self.mask is not None else None


RunFn = Callable[..., torch.Tensor]


def backend_run(
    name: str,
    unsupported: Callable[[CallInfo], str | None],
    compute: Callable[..., torch.Tensor],
    *,
    flat: bool = True,
) -> RunFn:
    """The protocol's ``run``: the preamble every backend shares, then ``compute(call, **options)``.

    ``flat``: compute receives (BH, N, d) tensors and returns (BH, Nq, dv),
    unflattened here; otherwise it gets the tensors as given.
    """

    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        activation: ActivationLike,
        *,
        attn_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        dropout_p: float = 0.0,
        **options,
    ) -> torch.Tensor:
        info = CallInfo.of(q, k, activation, v=v, attn_mask=attn_mask, bias=bias, causal=causal, dropout_p=dropout_p)
        why_not = unsupported(info)
        if why_not is not None:
            raise BackendUnsupported(f"backend {name!r} cannot compute this call: {why_not}; use backend='auto'")
        if not flat:
            batch = batch_shape(q, k, v)
            return compute(Call(info.activation, q, k, v, batch, attn_mask, bias, causal, scale, dropout_p), **options)
        qf, kf, vf, batch = flatten_heads(q, k, v)
        call = Call(
            info.activation,
            qf,
            kf,
            vf,
            batch,
            attn_mask,
            bias,
            causal,
            scale,
            dropout_p,
            mask=BlockSource(attn_mask, batch) if attn_mask is not None else None,
            bias_source=BlockSource(bias.to(qf.dtype), batch) if bias is not None else None,
        )
        return unflatten(compute(call, **options), batch)

    run.__name__ = run.__qualname__ = f"{name}_attention"
    run.__doc__ = compute.__doc__
    return run
