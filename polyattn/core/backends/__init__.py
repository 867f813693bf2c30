"""Attention backends: interchangeable implementations of :func:`polyattn.attention`.

========== =====================================================================
reference  materialises S and A; the readable definition and the test oracle
sdpa       softmax by ``F.scaled_dot_product_attention`` (FlashAttention & co.)
chunked    query x key tiles, O(N * block) memory, forward and backward; every
           activation, bias, masks, causal, dynamic N
linear     exact linear-time form of x^p via symmetric tensor features
           (C(d+p-1, p) of them); padding masks and causal, no bias
triton     fused GPU kernel for elementwise activations; padding masks, causal
========== =====================================================================

Every backend equals ``reference`` in values and gradients (tests/test_backends.py).
``backend="auto"`` picks the cheapest backend that supports the call by the cost
model in :mod:`.auto`; :func:`select_backend` returns the choice with its reason
and :func:`explain_backend` prints every estimate.

The fast backends are differentiable once: ``create_graph=True`` through them
raises; pass ``backend="reference"`` for higher derivatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from ..activations import Activation, ActivationLike
from .auto import MODULES, estimate
from .common import BackendUnsupported, CallInfo, Estimate, MachineRates, compute_dtype
from .reference import attention_weights, reference_attention

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendChoice",
    "BackendUnsupported",
    "CallInfo",
    "attention_weights",
    "call_info",
    "choose_backend",
    "explain_backend",
    "reference_attention",
    "select_backend",
]

BackendFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """One implementation: ``backend(q, k, v, activation, attn_mask=, bias=, causal=, scale=, dropout_p=)``.

    ``unsupported(info)`` says why it cannot compute a call (None when it can);
    ``cost(info, rates)`` estimates its fwd+bwd time; ``native_cuda_dtypes``
    are low-precision dtypes it takes as they are on a GPU (others are upcast
    to fp32 by :func:`polyattn.attention` first).
    """

    name: str
    fn: BackendFn
    summary: str
    unsupported: Callable[[CallInfo], str | None]
    cost: Callable[[CallInfo, MachineRates], Estimate]
    native_cuda_dtypes: tuple[torch.dtype, ...] = ()

    @staticmethod
    def of(module: ModuleType) -> Backend:
        """The Backend of a module that follows the protocol of :mod:`.common`."""
        return Backend(
            module.NAME,
            module.run,
            module.SUMMARY,
            module.unsupported,
            module.cost,
            getattr(module, "NATIVE_CUDA_DTYPES", ()),
        )

    def __call__(self, q, k, v, activation, **kwargs) -> torch.Tensor:
        return self.fn(q, k, v, activation, **kwargs)

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype this backend receives for inputs of ``dtype``."""
        return compute_dtype(dtype, device, self.native_cuda_dtypes)


BACKENDS: dict[str, Backend] = {m.NAME: Backend.of(m) for m in MODULES}

# Below this many score entries (BH * Nq * Nk) the materialised path costs
# well under a millisecond, and it alone is twice differentiable.
TINY_ENTRIES = 1 << 16


@dataclass(frozen=True)
class BackendChoice:
    """The backend ``backend="auto"`` runs, why, and every candidate's (name, seconds or None, note)."""

    name: str
    reason: str
    candidates: tuple[tuple[str, float | None, str], ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


call_info = CallInfo.of  # describe a call for the support checks and the cost model


Candidate = tuple[str, float | None, str]  # (backend, estimated fwd+bwd seconds or None, note or why not)


def rank_candidates(
    device: torch.device, why_not: Callable[[str], str | None], estimate_of: Callable[[str], tuple[float, str]]
) -> list[Candidate]:
    """Every backend as auto sees it: why it cannot run, or its (seconds, note) estimate."""
    candidates: list[Candidate] = []
    for name in BACKENDS:
        reason = why_not(name)
        if reason is None and name == "triton" and device.type != "cuda":
            reason = "the Triton interpreter (TRITON_INTERPRET=1) is for tests; auto runs triton on GPUs"
        candidates.append((name, None, reason) if reason is not None else (name, *estimate_of(name)))
    return candidates


def lowest_cost(candidates: list[Candidate], entries: int, scores: str, none_finite: tuple[str, str]) -> BackendChoice:
    """auto's pick: reference for a tiny problem (``entries`` scores, described by ``scores``),
    ``none_finite`` (name, reason) when no estimate is finite, else the lowest estimate."""
    if entries <= TINY_ENTRIES:
        reason = f"tiny problem ({scores}): the materialised path is as fast and twice differentiable"
        return BackendChoice("reference", reason, tuple(candidates))
    supported = [(t, n) for n, t, _ in candidates if t is not None and t != float("inf")]
    if not supported:
        return BackendChoice(*none_finite, tuple(candidates))
    best_t, best = min(supported)
    others = ", ".join(f"{n} {t:.3g}s" for t, n in sorted(supported) if n != best)
    reason = f"lowest estimated fwd+bwd time {best_t:.3g}s" + (f" (vs {others})" if others else "")
    return BackendChoice(best, reason, tuple(candidates))


def choice_table(header: str, choice: BackendChoice) -> str:
    """``explain``'s text: the call's header line, auto's pick, and one row per backend."""
    lines = [header, f"auto -> {choice.name}: {choice.reason}", f"{'backend':<10} {'est. s':>10}  note"]
    for name, seconds, note in choice.candidates:
        est = "-" if seconds is None else ("inf" if seconds == float("inf") else f"{seconds:.3g}")
        mark = "  <- auto" if name == choice.name else ""
        lines.append(f"{name:<10} {est:>10}  {note if seconds is not None else 'unsupported: ' + note}{mark}")
    return "\n".join(lines)


def choose_backend(info: CallInfo) -> BackendChoice:
    """auto's choice for a described call (see :func:`call_info`)."""

    def estimated(name: str) -> tuple[float, str]:
        est = estimate(name, info)
        return est.seconds, est.note

    candidates = rank_candidates(info.device, lambda name: BACKENDS[name].unsupported(info), estimated)
    # Every estimate infinite: reference still computes it, if slowly.
    none_finite = ("reference", "no backend fits the memory budget; materialising")
    return lowest_cost(candidates, info.bh * info.nq * info.nk, f"{info.bh}x{info.nq}x{info.nk} scores", none_finite)


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    activation: ActivationLike,
    *,
    has_mask: bool = False,
    has_bias: bool = False,
    causal: bool = False,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> BackendChoice:
    """The backend ``backend="auto"`` would run for these inputs, with the reason.

    Pass the real ``attn_mask``/``bias``/``v`` when you have them (a key-padding
    mask admits more backends than a per-query one); ``has_mask``/``has_bias``
    describe them when you do not (a mask is then assumed per-query).
    """
    info = call_info(
        q,
        k,
        activation,
        v=v,
        attn_mask=attn_mask,
        bias=bias,
        has_mask=has_mask,
        has_bias=has_bias,
        causal=causal,
        dropout_p=dropout_p,
    )
    return choose_backend(info)


def explain_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    activation: ActivationLike,
    **kwargs,
) -> str:
    """A table of every backend for this call: estimated fwd+bwd seconds, or why it cannot run; and the pick.

    Takes the same keyword arguments as :func:`select_backend`. With ``cu_seqlens_q=`` (and optionally
    ``cu_seqlens_k=``, ``v=``, ``causal=``) it explains a packed :func:`polyattn.attention_varlen` call.
    """
    if "cu_seqlens_q" in kwargs:
        from ..varlen import explain_varlen  # the packed front end sits above the backends

        return explain_varlen(q, k, activation, **kwargs)
    choice = select_backend(q, k, activation, **kwargs)
    info = call_info(q, k, activation, **kwargs)
    header = (
        f"attention {info.activation.spec!r}: BH={info.bh} Nq={info.nq} Nk={info.nk} d={info.d} dv={info.dv} "
        f"{info.device.type} {str(info.dtype).replace('torch.', '')} mask={info.mask} bias={info.has_bias} "
        f"causal={info.causal} dropout_p={info.dropout_p}"
    )
    return choice_table(header, choice)


def resolve_backend(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    activation: Activation,
    attn_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
) -> Backend:
    """The Backend to run: auto's pick, or the named one after checking it supports the call."""
    if name == "auto":
        choice = select_backend(
            q, k, activation, v=v, attn_mask=attn_mask, bias=bias, causal=causal, dropout_p=dropout_p
        )
        return BACKENDS[choice.name]
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    info = call_info(q, k, activation, v=v, attn_mask=attn_mask, bias=bias, causal=causal, dropout_p=dropout_p)
    why_not = backend.unsupported(info)
    if why_not is not None:
        raise BackendUnsupported(
            f"backend {name!r} cannot compute this call: {why_not}. "
            "Use backend='auto' (which picks one that can) or backend='reference'."
        )
    return backend
