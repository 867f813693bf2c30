"""``polyattn bench --decode --hf``: generation through transformers' ``generate``, KV cache against StateCache.

A small Llama-shaped model (random weights, built from a config: nothing is downloaded) reads a
prompt of L tokens and generates ``new_tokens`` more with ``model.generate``, three ways:

- ``softmax`` with transformers' KV cache (its own SDPA attention);
- ``<spec>`` with the KV cache: polyattn's attention over the cached keys (``polyattn.hf.use``);
- ``<spec>`` with :class:`polyattn.hf.StateCache`: the x^p state, whatever L.

Decoding is timed step by step from the first generated token to the last (a stopping criterion
stamps each token); tokens/s is that of the fastest step (``mean_tokens_per_s`` is kept too), and the
prompt's prefill is reported apart (``prefill_s``: the prompt plus the first token). Memory is
what the cache holds after generation, counted from its tensors, and on CUDA also the peak memory
allocated during decoding (weights and activations included).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..core.activations import get_activation
from ..training.config import int_setting, setting, settings_from_dict
from .bench_common import DTYPES as _DTYPES
from .bench_common import bench_device, run_bench_kind, sync
from .bench_decode import check_polynomial, decode_contexts, decode_specs
from .report.bench import format_hf_decode_table, plot_decode

__all__ = ["HFDecodeBenchConfig", "run_hf_decode_bench"]


@dataclass
class HFDecodeBenchConfig:
    contexts: list[int] = decode_contexts()
    activations: list[str] = decode_specs()
    layers: int = int_setting(2)
    heads: int = int_setting(4)
    kv_heads: int = int_setting(2)
    d: int = int_setting(32)
    mlp: int = int_setting(256)
    vocab: int = int_setting(256)
    batch: int = int_setting(1)
    new_tokens: int = int_setting(32, 2, ">= 2 (the first one comes with the prefill)")
    device: str = "auto"
    dtype: str = setting("float32", choices=tuple(_DTYPES))
    num_threads: int | None = int_setting(None, 0, nullable=True)
    seed: int = 0

    @staticmethod
    def from_dict(data: dict[str, Any]) -> HFDecodeBenchConfig:
        cfg = settings_from_dict(HFDecodeBenchConfig, data, "hf decode bench config")
        check_polynomial(cfg.activations, "--decode --hf (a StateCache holds x^p states)")
        if cfg.heads % cfg.kv_heads:
            raise ValueError(f"heads ({cfg.heads}) must be a multiple of kv_heads ({cfg.kv_heads})")
        return cfg


def build_model(cfg: HFDecodeBenchConfig, device: torch.device, dtype: torch.dtype):
    """The Llama-shaped model of the bench: random weights (std 0.2), RoPE, GQA, positions up to the longest L."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.heads * cfg.d,
        intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.d,
        max_position_embeddings=max(cfg.contexts) + cfg.new_tokens,
        initializer_range=0.2,
    )
    torch.manual_seed(cfg.seed)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # every run generates exactly new_tokens
    model.generation_config.pad_token_id = 0
    return model


def cache_bytes(cache: Any) -> int:
    """Bytes a transformers cache holds: a StateCache's states, or a KV cache's keys and values."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


class _StepClock:
    """A stopping criterion that never stops: it stamps the time of each generated token."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1 and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the decoding phase's peak, after the prefill
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_timed(model: Any, ids: torch.Tensor, new_tokens: int, cache: Any = None) -> dict[str, Any]:
    """One ``generate`` of ``new_tokens`` after the prompt ``ids``: decoding tokens/s, prefill time, cache bytes."""
    from transformers import StoppingCriteriaList

    device = ids.device
    clock = _StepClock(device)
    extra = {} if cache is None else {"cache": cache}
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
            return_dict_in_generate=True,
            **extra,
        )
    if len(clock.stamps) != new_tokens:
        raise RuntimeError(f"generate stopped after {len(clock.stamps)} of {new_tokens} tokens")
    steps = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=True)]
    row = {
        "prefill_s": clock.stamps[0] - t0,
        "step_times_s": steps,
        # The fastest step, as the other benches take the fastest run: on a shared machine the slow ones measure
        # the neighbours; the mean over all steps is kept too.
        "tokens_per_s": ids.shape[0] / min(steps),
        "mean_tokens_per_s": ids.shape[0] * len(steps) / sum(steps),
        "cache_bytes": cache_bytes(out.cache),
        "sequences": out.sequences,
    }
    if device.type == "cuda":
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return row


def run_hf_decode_bench(
    cfg: HFDecodeBenchConfig, out_dir: str | os.PathLike | None = None, progress: bool = True
) -> dict:
    """Generate at every context with each (activation, cache); returns the rows also written to ``out_dir``."""
    device = bench_device(cfg.device)
    measure = partial(_measure, cfg, device, progress)
    return run_bench_kind(cfg, device, measure, format_hf_decode_table, out_dir, _plot)


def _plot(results: dict, out: Path) -> list[Path]:
    return [plot_decode(results, out / "decode_hf.png", "cache_bytes", "generate: tokens/s", "cache memory (MiB)")]


def _measure(cfg: HFDecodeBenchConfig, device: torch.device, progress: bool) -> dict[str, list[dict]]:
    from tqdm.auto import tqdm

    import polyattn.hf

    model = build_model(cfg, device, _DTYPES[cfg.dtype])
    methods = [("softmax", "kv-cache")]
    methods += [(get_activation(a).spec, kind) for a in cfg.activations for kind in ("kv-cache", "state")]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cfg.contexts) * len(methods), desc="hf decode bench", disable=not progress, leave=False)
    try:
        # A short warm-up generate per method, so that no row pays for first-call setup.
        warm = torch.randint(1, cfg.vocab, (cfg.batch, 16), generator=torch.Generator().manual_seed(cfg.seed))
        for length in [None, *cfg.contexts]:
            g = torch.Generator().manual_seed(cfg.seed + (length or 0))
            ids = warm if length is None else torch.randint(1, cfg.vocab, (cfg.batch, int(length)), generator=g)
            ids = ids.to(device)
            tokens = {}
            for spec, kind in methods:
                if spec == "softmax":
                    model.set_attn_implementation("sdpa")
                else:
                    polyattn.hf.use(model, spec)
                cache = polyattn.hf.StateCache(model) if kind == "state" else None
                row = generate_timed(model, ids, 3 if length is None else cfg.new_tokens, cache)
                if length is None:
                    continue
                seq = row.pop("sequences")
                if kind == "state":  # the state decodes the same tokens as polyattn over the KV cache
                    row["same_tokens_as_kv_cache"] = bool(torch.equal(seq, tokens[spec]))
                tokens[spec] = seq
                rows.append({"context": int(length), "activation": spec, "method": kind, **row})
                bar.update(1)
    finally:
        bar.close()
    base = {r["context"]: r for r in rows if r["activation"] == "softmax"}
    for r in rows:
        r["vs_softmax"] = r["tokens_per_s"] / base[r["context"]]["tokens_per_s"]
    return {"rows": rows}
