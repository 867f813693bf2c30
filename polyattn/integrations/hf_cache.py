"""Constant-memory generation for transformers models: :class:`StateCache`, a transformers ``Cache``.

A KV cache keeps every key and value and attends over all of them for each new token. Causal
x^p attention needs only, per layer and k/v head, the state ``S = sum_j phi(k_j) v_j^T`` and the
number of real keys ``N`` (:class:`polyattn.LinearState`), so a :class:`StateCache` holds those
instead, and the memory of generation stays the same whatever the context:

    >>> polyattn.hf.use(model, "x^2/sqrt(N)")
    >>> out = model.generate(ids, attention_mask=mask, cache=polyattn.hf.StateCache(model), max_new_tokens=256)
    >>> polyattn.hf.use(model, "x^2/sqrt(N)", cache="state")   # or make it generate's default cache

How the attention reaches the state. transformers' attention layers call ``cache.update(k, v)``
and hand what it returns to the attention function. A :class:`StateLayer` returns only the new
tokens' keys and values, and remembers them as *pending*. polyattn's attention function
(:func:`polyattn.integrations.hf.make_attention_forward`) asks :func:`claim` whether the keys it
received are a layer's pending ones; if so, that layer computes the attention:

- the first call (the prompt): the usual attention over the prompt, with its mask and any
  backend, then the prompt's keys are folded into the state, padded ones left out (a padded key
  is one that no row of the prompt's mask may attend);
- every later call (new tokens): ``phi(q) S`` for the earlier tokens plus ``(q k^T)^p`` among the
  new tokens, divided by the activation's divisor of N, then the new keys join the state.
  Each token costs O(F dv) per k/v head, and the query heads of a GQA group read their shared
  k/v head's state (no repeat).

The masks transformers builds for a :class:`StateCache` cover the new tokens only
(:meth:`StateLayer.get_mask_sizes`): the prompt's padding is already in N.
A layer whose pending keys were never claimed (the model was switched to another attention
implementation) raises at its next update instead of silently attending to the new tokens only.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from ..core.activations import Activation, ActivationLike, get_activation
from ..core.backends.linear import symmetric_features
from ..core.decode import LinearState
from .patch import additive_mask_to_bool

__all__ = ["CACHES", "StateCache", "StateLayer", "check_default_cache", "claim", "set_default_cache"]

CACHES = ("kv", "state")  # what polyattn.hf.use(model, spec, cache=...) accepts

_PREFIX = "polyattn:"  # the attn_implementation prefix of polyattn.integrations.hf (which imports this module)

# id(keys returned by a StateLayer.update) -> that layer, until the attention function claims them. Weak values: a
# dropped cache leaves nothing behind; while the layer lives it holds the keys, so their id cannot be reused.
_PENDING: weakref.WeakValueDictionary[int, StateLayer] = weakref.WeakValueDictionary()


def _kv_route(spec: str) -> str:
    return (
        f"{spec!r} has no finite state (only integer powers x^p factor into one); generate with the KV cache "
        "instead: leave out cache=... (transformers' DynamicCache), or polyattn.hf.use(model, spec, cache='kv')"
    )


def claim(key: torch.Tensor) -> StateLayer | None:
    """The :class:`StateLayer` whose :meth:`~StateLayer.update` returned ``key`` and is waiting for its attention."""
    layer = _PENDING.pop(id(key), None)
    if layer is None or layer._pending is None or layer._pending[0] is not key:
        return None
    return layer


class StateLayer(CacheLayerMixin):
    """One attention layer's decoding state: a :class:`polyattn.LinearState` over (batch, k/v heads).

    ``keys``/``values`` stay None: nothing per token is kept. :meth:`get_seq_length` counts the
    token slots seen, padding included, as a KV cache's length does (positions are derived from it).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.linear: LinearState | None = None
        self.seen = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"StateLayer({self.linear!r}, seen={self.seen})"

    # --- the CacheLayerMixin interface ------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Holds the new tokens' keys and values for the attention function; returns them unchanged."""
        if self._pending is not None:
            raise RuntimeError(
                "StateCache: the attention of the previous forward never read this layer's state, so the model is "
                "not computing its attention with polyattn (it would attend to the new tokens only). Keep the "
                "model on a polyattn x^p implementation (polyattn.hf.use(model, 'x^2/sqrt(N)')) while using a "
                "StateCache, or generate with the KV cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        _PENDING[id(key_states)] = self
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask covers the new tokens only, at their true positions (offset = tokens already in the state).
        return query_length, self.seen

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.linear, self.seen, self._pending = None, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.linear is not None:
            self.linear.state = self.linear.state.repeat_interleave(repeats, dim=0)
            self.linear.count = self.linear.count.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "a StateCache cannot drop tokens: its state is a sum over all of them, the keys are not kept. "
                "Assisted and prompt-lookup decoding need a KV cache (leave out cache=...)"
            )

    def offload(self) -> None:
        if self.linear is not None:
            self._move("cpu")

    def prefetch(self) -> None:
        if self.linear is not None and self.linear.state.device != self.device:
            self._move(self.device)

    # --- the state -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the state and the counts (0 before the first token)."""
        return 0 if self.linear is None else self.linear.nbytes

    def _select(self, index: torch.Tensor) -> None:
        if self.linear is not None:
            index = index.to(self.linear.state.device)
            self.linear.state = self.linear.state.index_select(0, index)
            self.linear.count = self.linear.count.index_select(0, index)

    def _move(self, device: torch.device | str) -> None:
        self.linear.state = self.linear.state.to(device, non_blocking=True)
        self.linear.count = self.linear.count.to(device, non_blocking=True)

    def attend(
        self,
        act: Activation,
        module: nn.Module,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        kwargs: dict[str, Any],
        dense: Callable[..., tuple[torch.Tensor, None]],
    ) -> tuple[torch.Tensor, None]:
        """The attention of the pending tokens, as transformers' attention functions return it: (B, T, H, dv).

        ``dense(query, key, value)`` is the usual attention over the given keys, used for the prompt.
        """
        key, value = self._pending
        self._pending = None
        if not act.is_polynomial:
            raise ValueError(f"StateCache: the model's activation {_kv_route(act.spec)}")
        for arg in ("sliding_window", "position_bias"):
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"StateCache cannot take {arg}=...: the state sums every earlier key with the same weight "
                    "rule, so it cannot drop keys out of a window or add a per-position bias; generate with the "
                    "KV cache (leave out cache=...)"
                )
        training = module.training if isinstance(module, nn.Module) else False
        if training and dropout:
            raise ValueError("StateCache is for generation: put the model in eval mode (model.eval()), no dropout")
        b, heads, t_len, d = query.shape
        kv_heads = key.shape[1]
        if heads % kv_heads:
            raise ValueError(f"query has {heads} heads and key {kv_heads}: the query heads must be a multiple")
        if self.linear is None:
            # The prompt: the usual attention (any backend, the full mask), then its keys fold into the state.
            # Without a mask every key is real: no (T, T) mask is built (4 GiB at 64k tokens).
            out = dense(query, key, value)
            real = None
            if attention_mask is not None:
                real = _per_kv_head(_keep(attention_mask, b, t_len, t_len, query.device).any(-2), kv_heads)
            self.linear = LinearState(
                act, (b, kv_heads), d, value.shape[-1], scale=scaling, dtype=query.dtype, device=query.device
            )
            self.linear.absorb(key, value, key_mask=real)
            return out
        keep = _keep(attention_mask, b, t_len, key.shape[-2], query.device)  # (B, 1 or H, T, T) bool
        new_keys = _per_kv_head(keep.any(-2), kv_heads)  # a key no row may attend is padding
        state = self.linear
        if act != state.activation or (scaling is not None and float(scaling) != state.scale):
            raise ValueError(
                f"StateCache: this state was built for {state.activation.spec!r} with scale {state.scale:g}, but the "
                f"model now computes {act.spec!r} with scale {scaling}; start a new StateCache after switching"
            )
        if (b, kv_heads) != tuple(state.state.shape[:2]):
            raise ValueError(
                f"StateCache holds a batch of {state.state.shape[0]} with {state.state.shape[1]} k/v heads, got "
                f"{b} and {kv_heads}: use one StateCache per batch of sequences"
            )
        groups = heads // kv_heads
        # Each group's query heads as rows of its k/v head: (B, Hkv, G * T, d), read against the state (B, Hkv, F, dv).
        q = query.to(state.dtype).reshape(b, kv_heads, groups * t_len, d) * state.scale
        k, v = key.to(state.dtype), value.to(state.dtype)
        p = act.power
        earlier = symmetric_features(q, p) @ state.state
        rows = _folded_rows(keep, kv_heads, groups)  # (B, Hkv or 1, G * T, T)
        within = torch.where(rows, (q @ k.transpose(-1, -2)).pow(p), 0.0) @ v
        n = state.count.unsqueeze(-1) + rows.sum(-1)  # keys each row may attend: earlier real ones and new ones
        div = act.divisor_value(n)
        out = earlier + within
        out = out / div.unsqueeze(-1) if isinstance(div, torch.Tensor) else out / div
        state.absorb(key, value, key_mask=new_keys)
        out = out.reshape(b, heads, t_len, out.shape[-1]).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None


class StateCache(Cache):
    """A transformers ``Cache`` holding, per layer, the x^p state and counts instead of keys and values.

    ``model`` (a ``PreTrainedModel`` or its config) must compute its attention with a polyattn x^p
    activation (``polyattn.hf.use(model, "x^2/sqrt(N)")``); softmax and other activations are refused,
    as are sliding-window layers and encoder-decoder models. Pass it to ``generate`` as ``cache=``
    (``past_key_values=`` also works, with transformers' deprecation warning). Like a KV cache, it
    serves one batch of sequences and can be passed back to continue them (a later ``generate`` with
    the longer ids). Beam search is supported (``reorder_cache``); assisted decoding, which rolls back
    tokens (``crop``), is not.
    """

    def __init__(self, model: PreTrainedModel | PretrainedConfig) -> None:
        if isinstance(model, PreTrainedModel):
            config = model.config
        elif isinstance(model, PretrainedConfig):
            config = model
        else:
            raise TypeError(
                f"StateCache(model) takes a transformers PreTrainedModel (or its config), got {type(model).__name__}"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                "StateCache serves decoder-only models; an encoder-decoder model's cross-attention needs its "
                "keys: generate with the KV cache"
            )
        text = config.get_text_config(decoder=True)
        impl = text._attn_implementation or ""
        if not impl.startswith(_PREFIX):
            raise ValueError(
                f"StateCache needs a model computing its attention with polyattn, but this one uses {impl!r}: switch "
                "it first with polyattn.hf.use(model, 'x^2/sqrt(N)') (or load it with attn_implementation="
                "polyattn.hf.register('x^2/sqrt(N)'))"
            )
        act = get_activation(impl[len(_PREFIX) :])
        if not act.is_polynomial:
            raise ValueError(f"StateCache: {_kv_route(act.spec)}")
        types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"} or getattr(text, "sliding_window", None) is not None:
            raise ValueError(
                f"StateCache needs full causal attention in every layer, got layer types {sorted(types)} and "
                f"sliding_window={getattr(text, 'sliding_window', None)}: a window drops old keys, which a summed "
                "state cannot; generate with the KV cache"
            )
        self.activation = act
        super().__init__(layers=[StateLayer() for _ in range(text.num_hidden_layers)])

    def __repr__(self) -> str:
        return f"StateCache({self.activation.spec!r}, layers={len(self.layers)}, bytes={self.nbytes})"

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's state and counts: constant in the number of tokens."""
        return sum(layer.nbytes for layer in self.layers)


def _keep(mask: torch.Tensor | None, b: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """The pending tokens' (B or 1, 1 or H, T, T) bool mask: transformers' one, or causal without one."""
    if mask is None:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()[None, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        raise ValueError(
            f"StateCache expects the (batch, 1 or heads, {q_len}, {kv_len}) mask of the new tokens, got "
            f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}: build the model's masks with polyattn's "
            "mask function (polyattn.hf.register)"
        )
    if mask.dtype != torch.bool:
        keep, bias = additive_mask_to_bool(mask)
        if bias is not None:
            raise ValueError(
                "StateCache cannot take an additive bias in the attention mask: it would have to weigh each "
                "earlier key, which the summed state no longer holds"
            )
        mask = keep
    return mask


def _per_kv_head(key_mask: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, 1 or H, T) real-key flags as (B, Hkv, T): real for a k/v head if any of its query heads sees it."""
    b, h, t = key_mask.shape
    if h == 1:
        return key_mask.expand(b, kv_heads, t)
    return key_mask.reshape(b, kv_heads, h // kv_heads, t).any(2)


def _folded_rows(keep: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """A (B, 1 or H, T, T) mask laid out for (B, Hkv, G * T, T) rows, matching the folded queries."""
    b, h, t, k = keep.shape
    if h == 1:
        return keep.unsqueeze(2).expand(b, 1, groups, t, k).reshape(b, 1, groups * t, k)
    return keep.reshape(b, kv_heads, groups * t, k)


# --- generate's default cache (polyattn.hf.use(..., cache=...)) ---------------------------------------
def check_default_cache(cache: str, activation: ActivationLike) -> None:
    """Raises ValueError for a ``cache`` that is not in :data:`CACHES`, or "state" with a non-x^p activation."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(map(repr, CACHES))}, got {cache!r}")
    if cache == "state":
        named = isinstance(activation, str) and activation.startswith(_PREFIX)
        act = get_activation(activation[len(_PREFIX) :] if named else activation)
        if not act.is_polynomial:
            raise ValueError(f"cache='state': {_kv_route(act.spec)}")


def set_default_cache(model: PreTrainedModel, cache: str) -> None:
    """Make ``model.generate`` build a :class:`StateCache` per call (``"state"``), or undo it (``"kv"``)."""
    if cache == "state":
        StateCache(model)  # refuses models it cannot serve now rather than at the first generate
        # An instance attribute shadows the class's generate for this model only.
        model.__dict__["generate"] = types.MethodType(_generate_with_state_cache, model)
    elif getattr(model.__dict__.get("generate"), "__func__", None) is _generate_with_state_cache:
        del model.__dict__["generate"]


@functools.wraps(GenerationMixin.generate)
def _generate_with_state_cache(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
    config = kwargs.get("generation_config") or self.generation_config
    chosen = (
        kwargs.get("cache") is not None
        or kwargs.get("past_key_values") is not None
        or kwargs.get("cache_implementation", config.cache_implementation) is not None
        or kwargs.get("use_cache", config.use_cache) is False
    )
    if not chosen:  # the caller's own choice of cache (or of none) wins
        kwargs["cache"] = StateCache(self)
    return type(self).generate(self, *args, **kwargs)
