"""Hugging Face transformers integration: polynomial attention in any model that uses ``AttentionInterface``.

transformers 5 picks a model's attention function by name (``config._attn_implementation``)
from two registries: ``AttentionInterface`` (the attention itself) and
``AttentionMaskInterface`` (the function that turns the 2D padding mask into the
4D mask the attention receives). :func:`register` puts polyattn in both, under
one name per activation, ``"polyattn:<spec>"`` (e.g. ``"polyattn:x^3/sqrt(N)"``):

    >>> import polyattn.hf
    >>> name = polyattn.hf.register("x^3/sqrt(N)")          # "polyattn:x^3/sqrt(N)"
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    >>> polyattn.hf.use(model, "x/sqrt(N)")                   # switch a built model

Registering the mask function matters: a name known only to ``AttentionInterface``
makes transformers skip mask creation and pass ``attention_mask=None``, so padding
would be silently ignored. The mask function is transformers' own SDPA one (bool,
True = may attend), which is what :func:`polyattn.attention` takes; masked weights
are exactly 0 and ``/sqrt(N)``, ``/N`` count N per row, so each padded example is
scaled by its own length.

What the attention function handles: bool and additive float 4D masks (entries at or
below -1e4 mean masked, anything else finite is an additive bias, as in
:func:`polyattn.integrations.patch.additive_mask_to_bool`); ``attention_mask=None``
with a causal module (bottom-right aligned when the query is shorter than the
keys, i.e. decoding with a KV cache); grouped-query attention without ``repeat_kv`` (broadcast
heads; when decoding, each group's query heads read as rows of its key/value head, so the cache is
never copied); ``scaling``; ``dropout`` in training mode only;
``position_bias`` (T5-style relative bias) as an additive bias; ``sliding_window``.
It refuses ``softcap`` and attention sinks (``s_aux``), which polyattn does not compute.

For x^p activations, :class:`StateCache` (:mod:`polyattn.integrations.hf_cache`) replaces the KV
cache by the fixed-size state of :class:`polyattn.LinearState`; ``use(model, spec, cache="state")``
makes it ``generate``'s default.

Padding-free packed batches (``DataCollatorWithFlattening``: one row, ``position_ids`` restarting at 0
per document, optionally the ``cu_seq_lens_*`` kwargs) run through :func:`polyattn.attention_varlen`,
as ``flash_attention_2`` runs them through ``flash_attn_varlen_func``: each document attends to itself
only and N is counted per document, so a packed step equals the padded one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
import torch.nn as nn

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        f"polyattn's Hugging Face integration needs transformers 5: pip install 'polyattn[hf]' ({e})"
    ) from e

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover - depends on the installed version
    raise ImportError(
        f"polyattn's Hugging Face integration needs transformers>=5 (it uses AttentionMaskInterface), found "
        f"{transformers.__version__}: pip install 'polyattn[hf]'"
    )

from ..core.activations import Activation, ActivationLike, get_activation
from ..core.backends.common import values_known
from ..core.functional import attention
from ..core.varlen import attention_varlen
from .hf_cache import StateCache, check_default_cache, claim, set_default_cache
from .patch import additive_mask_to_bool

__all__ = [
    "DEFAULT_ACTIVATIONS",
    "PREFIX",
    "StateCache",
    "attn_implementation_name",
    "bool_mask",
    "make_attention_forward",
    "register",
    "registered_names",
    "use",
]

PREFIX = "polyattn:"

# What register() with no argument makes available: softmax and the paper's main activations.
DEFAULT_ACTIVATIONS: tuple[str, ...] = (
    "softmax",
    "x^3/sqrt(N)",
    "x^2/sqrt(N)",
    "x/sqrt(N)",
    "x^3/14",
    "relu/N",
    "sigmoid-log(N)",
)

# Arguments transformers models may pass that polyattn cannot honour; their value None means "not used".
_REFUSED = {
    "softcap": "logit soft-capping (tanh of the scores) is not an activation polyattn computes; use 'eager'",
    "s_aux": "attention sinks add a per-head logit to softmax's denominator, which has no polynomial counterpart",
}

_REGISTERED: dict[str, Activation] = {}


def attn_implementation_name(activation: ActivationLike) -> str:
    """The ``attn_implementation`` name for ``activation``: ``"polyattn:"`` plus its canonical spec.

    Any spelling of a spec gives the same name (``"X^3 / sqrt(n)"`` -> ``"polyattn:x^3/sqrt(N)"``).
    A name is accepted back: ``attn_implementation_name("polyattn:x^3/14")`` is that name.
    Raises ValueError, listing the accepted forms, for a malformed spec.
    """
    if isinstance(activation, str) and activation.startswith(PREFIX):
        activation = activation[len(PREFIX) :]
    name = PREFIX + get_activation(activation).spec
    # transformers reads "org/repo" and "org/repo:kernel" as Hub kernels and "flash"/"sdpa" inside a name as those
    # implementations; the "polyattn:" prefix keeps every canonical spec clear of all of them.
    if "flash" in name or "sdpa" in name or "flex_attention" in name:  # pragma: no cover - no spec contains these
        raise ValueError(f"{name!r} would be read by transformers as one of its own attention implementations")
    return name


@overload
def register(activation: ActivationLike) -> str: ...
@overload
def register(activation: None = None) -> list[str]: ...
@overload
def register(activation: Iterable[ActivationLike]) -> list[str]: ...


def register(activation: ActivationLike | Iterable[ActivationLike] | None = None) -> str | list[str]:
    """Register polyattn with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    ``activation``: one spec (returns its ``attn_implementation`` name), several (returns the
    names), or None for :data:`DEFAULT_ACTIVATIONS`. Registering again is harmless. After it,
    ``from_pretrained``/``from_config(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` accept the name.
    """
    if activation is None:
        return [register(spec) for spec in DEFAULT_ACTIVATIONS]
    if not isinstance(activation, (str, Activation)):
        if isinstance(activation, Iterable):
            return [register(spec) for spec in activation]
        raise TypeError(
            f"activation must be a spec string such as 'x^3/sqrt(N)', an Activation, a list of them or None, "
            f"got {type(activation).__name__}"
        )
    name = attn_implementation_name(activation)
    act = get_activation(name[len(PREFIX) :])
    if _REGISTERED.get(name) != act or name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, make_attention_forward(act))
        AttentionMaskInterface.register(name, bool_mask)
        _REGISTERED[name] = act
    return name


def registered_names() -> list[str]:
    """The ``attn_implementation`` names :func:`register` has added, sorted."""
    return sorted(_REGISTERED)


def use(model: nn.Module, activation: ActivationLike, *, cache: str = "kv") -> nn.Module:
    """Switch every attention layer of a transformers ``model`` to ``activation``; returns ``model``.

    Registers the activation if needed, then calls ``model.set_attn_implementation``.
    ``cache``: what ``model.generate`` decodes with when not given a cache: ``"kv"``, transformers'
    own KV cache, or ``"state"``, a new :class:`StateCache` per call (x^p activations only: the
    memory stays constant in the context).
    Raises TypeError for a model that is not a transformers ``PreTrainedModel``, and
    RuntimeError naming the classes left on their old attention when transformers
    could not switch some (a model whose attention does not go through ``AttentionInterface``).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"polyattn.hf.use needs a transformers PreTrainedModel, got {type(model).__name__}; for timm or "
            "polyattn models use polyattn.patch(model, activation) instead"
        )
    check_default_cache(cache, activation)
    name = register(activation)
    model.set_attn_implementation(name)
    # transformers only logs a warning when a model cannot switch: check, so that no layer silently stays softmax.
    left = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, PreTrainedModel) and m.config._attn_implementation != name
        }
    )
    if left:
        raise RuntimeError(
            f"could not switch {', '.join(left)} to {name!r}: their attention does not go through transformers' "
            "AttentionInterface, so polyattn cannot replace it. Use a model class whose attention does (most "
            "transformers 5 models), or switch only the sub-models that can with model.set_attn_implementation({...})"
        )
    set_default_cache(model, cache)
    return model


def bool_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function of every polyattn name: transformers' bool SDPA mask.

    Returns a (batch, 1, q, kv) bool mask (True = may attend), or None where the
    attention is plain causal or plain full and the attention function infers it.
    Skipping the mask is allowed only where that inference is unambiguous (one
    query, or as many queries as keys); otherwise, e.g. prefilling a static cache,
    the mask is built.
    """
    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    if q_length is None or kv_length is None or (q_length != 1 and q_length != kv_length):
        # transformers would return None for "top-left causal" here, while None with fewer queries than keys
        # means bottom-right (decoding) to polyattn's attention function.
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def make_attention_forward(activation: ActivationLike) -> Callable[..., tuple[torch.Tensor, None]]:
    """The transformers attention function computing ``activation`` through :func:`polyattn.attention`.

    :func:`register` registers it; call this to register it under a name of your own
    (then register :func:`bool_mask` under that name in ``AttentionMaskInterface`` too).
    """
    act = get_activation(activation)

    def polyattn_attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        return _forward(act, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    polyattn_attention_forward.__qualname__ = f"polyattn_attention_forward[{act.spec}]"
    return polyattn_attention_forward


def _forward(
    act: Activation,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    _check_call(act, query, key, value, kwargs)
    state_layer = claim(key)
    if state_layer is not None:  # decoding with a StateCache: the layer attends from its state (hf_cache.py)
        return state_layer.attend(
            act, module, query, attention_mask, dropout, scaling, kwargs,
            dense=lambda q, k, v: _forward(act, module, q, k, v, attention_mask, dropout, scaling, is_causal, kwargs),
        )  # fmt: skip
    b, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(
            f"query has {heads} heads and key {kv_heads}: grouped-query attention needs the query heads to be a "
            "multiple of the key/value heads; check num_attention_heads and num_key_value_heads in the config"
        )

    packed = _packed_offsets(module, query, key, attention_mask, dropout, is_causal, kwargs)
    if packed is not None:
        return _forward_packed(act, query, key, value, packed, scaling)

    mask, bias = _split_mask(attention_mask, heads)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        _check_heads("position_bias", position_bias, heads)
        bias = position_bias if bias is None else bias + position_bias

    causal = False
    if attention_mask is None:
        causal, mask = _unmasked_causal(module, query, kv_len, is_causal, kwargs, mask)

    groups = heads // kv_heads
    if groups > 1 and not causal and q_len < kv_len:
        # Decoding with a KV cache: the G query heads of a group become G x q_len query rows of their k/v head,
        # so the backends read the (long) cache as it is, with no per-query-head copy; every row keeps its own
        # mask row, so N per row is unchanged.
        query = query.reshape(b, kv_heads, groups * q_len, query.shape[-1])
        mask, bias = _folded(mask, kv_heads, groups, q_len), _folded(bias, kv_heads, groups, q_len)
    elif groups > 1:
        # (B, H, T, d) -> (B, Hkv, G, T, d) against k/v (B, Hkv, 1, S, d): the G query heads of a group share
        # one k/v head by broadcasting, without repeat_kv's copy.
        query = query.reshape(b, kv_heads, groups, q_len, query.shape[-1])
        key, value = key.unsqueeze(2), value.unsqueeze(2)
        mask, bias = _grouped(mask, kv_heads, groups), _grouped(bias, kv_heads, groups)

    training = module.training if isinstance(module, nn.Module) else True
    out = attention(
        query,
        key,
        value,
        act,
        attn_mask=mask,
        bias=bias,
        causal=causal,
        scale=scaling,
        dropout_p=float(dropout) if training else 0.0,
    )
    out = out.reshape(out.shape[0], heads, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _check_call(
    act: Activation, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any]
) -> None:
    """Refuse the kwargs polyattn cannot honour and tensors not in transformers' (B, H, T, d) layout."""
    for arg, why in _REFUSED.items():
        if kwargs.get(arg) is not None:
            raise ValueError(
                f"polyattn attention ({act.spec}) cannot take {arg}=...: {why}. Load this model with "
                "attn_implementation='eager' or 'sdpa' instead"
            )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, heads, seq, head_dim) as transformers passes it, got {tuple(t.shape)}"
            )


def _unmasked_causal(
    module: nn.Module,
    query: torch.Tensor,
    kv_len: int,
    is_causal: bool | None,
    kwargs: dict[str, Any],
    mask: torch.Tensor | None,
) -> tuple[bool, torch.Tensor | None]:
    """(causal, mask) of a call without an attention mask: the causal flag for square attention, or an
    explicit bottom-right causal (and sliding-window) mask when the keys outnumber the queries."""
    q_len = query.shape[2]
    causal = False
    # As transformers' sdpa: an explicit is_causal wins over the module's attribute, and a mask, when
    # there is one, already holds the causal pattern.
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    window = window if window is not None and kv_len > window else None
    if window is not None and not is_causal:
        raise ValueError(
            f"sliding_window={window} without a mask is supported for causal attention only; pass the "
            "4D mask transformers builds (register() registers its mask function)"
        )
    if is_causal and q_len == kv_len and window is None:
        causal = q_len > 1
    elif is_causal:
        mask = _bottom_right_causal(q_len, kv_len, window, query.device)
    return causal, mask


# --- padding-free packed batches ------------------------------------------------------------------------
def _packed_offsets(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """(cu_seqlens_q, cu_seqlens_k, causal) of a padding-free packed row, or None for every other call.

    Packed is what transformers' ``DataCollatorWithFlattening`` makes: one row, no cache, and either the
    ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs or ``position_ids`` that restart (a new document wherever a
    position is not the previous one plus 1, transformers' own rule). The mask transformers built then
    only repeats the document boundaries; it is checked at each boundary (a mask that lets a document's
    first token see the previous document is an ordinary causal mask over one sequence, not packing).
    """
    b, _, q_len, _ = query.shape
    if b != 1 or key.shape[2] != q_len or q_len < 2 or kwargs.get("position_bias") is not None:
        return None
    training = module.training if isinstance(module, nn.Module) else True
    if training and dropout > 0:
        return None  # no packed backend drops out entries of A: the 4D mask path does
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if isinstance(cu_q, torch.Tensor):
        if not values_known(cu_q):
            return None
        cu_q = cu_q.to(device=query.device, dtype=torch.int32)
        cu_k = cu_q if not isinstance(cu_k, torch.Tensor) else cu_k.to(device=query.device, dtype=torch.int32)
    else:
        pos = kwargs.get("position_ids")
        if not isinstance(pos, torch.Tensor) or pos.numel() != q_len or not values_known(pos):
            return None
        pos = pos.reshape(-1).to(query.device)
        starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 1) != 1).reshape(-1)
        if starts.numel() < 2:
            return None  # one document: the ordinary path
        cu_q = torch.cat([starts, starts.new_tensor([q_len])]).to(torch.int32)
        if int(cu_q[0]) != 0:
            cu_q = torch.cat([cu_q.new_zeros(1), cu_q])
        cu_k = cu_q
    if cu_q.numel() < 3:
        return None
    window = kwargs.get("sliding_window")
    if window is not None and int(cu_q.diff().max()) > window:
        return None  # a window inside documents: the 4D mask transformers built holds it
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        # In a packed mask a document's first token sees itself and nothing before it; a causal mask over
        # the whole row (a padding mask was given) lets it see the earlier documents.
        rows = cu_q[:-1].long()
        rows = rows[rows < q_len]
        m = attention_mask[0, 0, rows]
        keep = m if m.dtype == torch.bool else m > -1e4
        cols = torch.arange(q_len, device=keep.device)
        before = cols[None, :] < rows[:, None]
        if bool((keep & before).any()) or not bool(keep[torch.arange(rows.numel()), rows].all()):
            return None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return cu_q, cu_k, bool(causal)


def _forward_packed(
    act: Activation,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed: tuple[torch.Tensor, torch.Tensor, bool],
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """One packed row through :func:`polyattn.attention_varlen`: each document alone, N counted per document."""
    cu_q, cu_k, causal = packed
    # (1, H, T, d) -> (T, H, d), flash-attn's packed layout; k and v keep their Hk heads (grouped-query attention).
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = attention_varlen(q, k, v, cu_q, cu_k, activation=act, causal=causal, scale=scaling)
    return out.unsqueeze(0), None


def _check_heads(name: str, t: torch.Tensor, heads: int) -> None:
    if t.dim() != 4 or t.shape[1] not in (1, heads):
        raise ValueError(
            f"{name} must have shape (batch or 1, 1 or {heads} heads, q_len, kv_len), got {tuple(t.shape)}; "
            "transformers' mask functions build this shape (polyattn.hf.register() registers one)"
        )


def _split_mask(mask: torch.Tensor | None, heads: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """transformers' 4D ``attention_mask`` as polyattn's (bool mask, additive bias)."""
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__} (flex-attention BlockMasks "
            "are not supported); load the model with a polyattn attn_implementation so its mask function builds it"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"attention_mask must be bool (True = may attend) or an additive float mask (0 = attend, large negative "
            f"= masked), got dtype {mask.dtype}; convert a 0/1 keep-mask with mask.bool()"
        )
    _check_heads("attention_mask", mask, heads)
    keep, bias = additive_mask_to_bool(mask)
    if bias is not None and values_known(bias) and not bool(torch.isfinite(bias).all()):
        raise ValueError(
            "attention_mask holds NaN or +inf: an additive mask must be 0 where attending, a large negative "
            "number (-inf, finfo.min) where masked, and finite elsewhere"
        )
    return keep, bias


def _bottom_right_causal(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(q_len, kv_len) bool mask: query i is the token at position kv_len - q_len + i (the cache holds the rest)."""
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device).unsqueeze(1) + offset
    cols = torch.arange(kv_len, device=device).unsqueeze(0)
    keep = cols <= rows
    if window is not None:
        keep &= cols > rows - window
    return keep


def _folded(t: torch.Tensor | None, kv_heads: int, groups: int, q_len: int) -> torch.Tensor | None:
    """A (B, 1 or H, Q, K) or (Q, K) mask or bias laid out for (B, Hkv, G * Q, K) scores (group heads as rows)."""
    if t is None:
        return None
    g = _grouped(t if t.dim() == 4 else t[None, None], kv_heads, groups)  # (B, Hkv or 1, G or 1, Q, K)
    g = g.expand(*g.shape[:2], groups, q_len, g.shape[-1])
    return g.reshape(g.shape[0], g.shape[1], groups * q_len, g.shape[-1])


def _grouped(t: torch.Tensor | None, kv_heads: int, groups: int) -> torch.Tensor | None:
    """A (B, 1 or H, Q, K) mask or bias laid out for (B, Hkv, G, Q, K) scores; 2D ones broadcast as they are."""
    if t is None or t.dim() < 4:
        return t
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.reshape(t.shape[0], kv_heads, groups, *t.shape[2:])
