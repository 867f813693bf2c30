"""Does a trained MQAR model answer the same when decoded through the x^p state as through a KV cache?

``polyattn recall --check-decoding RUN_DIR`` loads a trained ``causal_lm`` run (e.g. one of
``polyattn recall``'s, ``OUT/T64/runs/...``), feeds validation sequences token by token three ways
and compares the answers (the predictions at the queried keys, the positions MQAR scores):

- ``parallel``: the model's own forward over the whole sequence (causal attention, as trained);
- ``kv-cache``: one token at a time, each attention layer keeping every key and value and
  attending over them with :func:`polyattn.attention` (how a KV cache decodes);
- ``state``: one token at a time, each attention layer keeping only its
  :class:`polyattn.LinearState` (S = sum phi(k) v^T and N), constant in the length.

The result names the answer accuracy of each, how many answers the state and the KV cache
decode differently, and the largest logit difference between them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..core.activations import get_activation
from ..core.decode import LinearState
from ..core.functional import attention
from ..data.mqar import IGNORE_INDEX
from ..models.causal_lm import CausalLM

__all__ = ["DECODE_ROUTES", "check_recall_decoding", "decode_causal_lm", "format_decoding_check"]

DECODE_ROUTES = ("parallel", "kv-cache", "state")


def decode_causal_lm(model: CausalLM, tokens: torch.Tensor, route: str) -> torch.Tensor:
    """Next-token logits (B, T, vocab) of ``model`` over ``tokens`` (B, T), computed by ``route``.

    ``route`` is one of :data:`DECODE_ROUTES`; "state" needs an x^p activation in every block.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"decode_causal_lm takes polyattn's causal_lm model, got {type(model).__name__}")
    if route not in DECODE_ROUTES:
        raise ValueError(f"route must be one of {', '.join(DECODE_ROUTES)}, got {route!r}")
    if route == "parallel":
        return model(tokens)
    if route == "state":
        for block in model.blocks:
            act = get_activation(block.attn.activation)
            if not act.is_polynomial:
                raise ValueError(
                    f"route 'state' needs an x^p activation, the model computes {act.spec!r}, which has no finite "
                    "state; compare the 'kv-cache' route instead"
                )
    b, t_len = tokens.shape
    caches: list[Any] = [None] * len(model.blocks)
    outs = []
    for t in range(t_len):
        x = model.token_embed(tokens[:, t : t + 1]) + model.pos_embed.weight[t]
        for i, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.project_qkv(block.norm1(x))  # (B, heads, 1, head_dim)
            if route == "kv-cache":
                keys, values = caches[i] if caches[i] is not None else (k[..., :0, :], v[..., :0, :])
                caches[i] = keys, values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
                # One query row after every cached key: no mask, N = t + 1.
                a = attention(q, keys, values, attn.activation, scale=attn.scale)
            else:
                if caches[i] is None:
                    caches[i] = LinearState.empty(
                        attn.activation, tuple(q.shape[:2]), q.shape[-1], scale=attn.scale, dtype=q.dtype,
                        device=q.device,
                    )  # fmt: skip
                a = caches[i].step(q, k, v)
            x = x + attn.proj(a.transpose(1, 2).reshape(b, 1, attn.dim))
            x = x + block.mlp(block.norm2(x))
        outs.append(model.head(model.norm(x)))
    return torch.cat(outs, dim=1)


def check_recall_decoding(
    run_dir: str | os.PathLike, num: int = 200, batch_size: int = 50, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Decode ``num`` validation sequences of a trained MQAR run by every route; returns the comparison."""
    from ..data.registry import build_dataset
    from ..training.trainer import load_run

    model, cfg = load_run(run_dir)
    if not isinstance(model, CausalLM) or cfg["data"]["name"] != "mqar":
        raise ValueError(
            f"{run_dir} is a {cfg['model']['name']!r} run on {cfg['data']['name']!r}: --check-decoding reads a "
            "causal_lm run trained on mqar (a polyattn recall run directory)"
        )
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    spec = get_activation(model.blocks[0].attn.activation).spec
    model = model.to(dtype)
    val = build_dataset(cfg["data"], cfg["train"]["seed"]).val
    inputs, labels = val.tensors[0][:num], val.tensors[1][:num]
    routes = [r for r in DECODE_ROUTES if r != "state" or get_activation(spec).is_polynomial]
    preds: dict[str, list[torch.Tensor]] = {r: [] for r in routes}
    logits_gap = 0.0
    with torch.no_grad():
        for i0 in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i0 : i0 + batch_size], labels[i0 : i0 + batch_size]
            answers = y != IGNORE_INDEX
            logits = {r: decode_causal_lm(model, x, r) for r in routes}
            for r in routes:
                preds[r].append(logits[r].argmax(-1)[answers])
            if "state" in logits:
                logits_gap = max(logits_gap, (logits["state"] - logits["kv-cache"]).abs().max().item())
    truth = labels[labels != IGNORE_INDEX]
    answers = {r: torch.cat(p) for r, p in preds.items()}
    result: dict[str, Any] = {
        "run_dir": str(Path(run_dir)),
        "activation": spec,
        "seq_len": int(inputs.shape[1]),
        "sequences": int(inputs.shape[0]),
        "answers": int(truth.numel()),
        "dtype": str(dtype).removeprefix("torch."),
        "accuracy": {r: (a == truth).double().mean().item() for r, a in answers.items()},
        "differ_kv_cache_vs_parallel": int((answers["kv-cache"] != answers["parallel"]).sum()),
    }
    if "state" in answers:
        result["differ_state_vs_kv_cache"] = int((answers["state"] != answers["kv-cache"]).sum())
        result["max_logit_diff_state_vs_kv_cache"] = logits_gap
    return result


def format_decoding_check(result: dict[str, Any]) -> str:
    lines = [
        f"{result['run_dir']}: {result['activation']}, {result['sequences']} validation sequences of "
        f"{result['seq_len']} tokens, {result['answers']} answers, {result['dtype']}",
        "",
        f"{'route':<10} {'answer accuracy':>16}",
    ]
    lines += [f"{r:<10} {100 * a:>15.1f}%" for r, a in result["accuracy"].items()]
    lines.append("")
    lines.append(f"answers that differ, KV cache vs parallel forward: {result['differ_kv_cache_vs_parallel']}")
    if "differ_state_vs_kv_cache" in result:
        lines.append(
            f"answers that differ, state vs KV cache: {result['differ_state_vs_kv_cache']} "
            f"(largest logit difference {result['max_logit_diff_state_vs_kv_cache']:.2e})"
        )
    else:
        lines.append(f"no state route: {result['activation']} has no finite state (x^p activations only)")
    return "\n".join(lines)
