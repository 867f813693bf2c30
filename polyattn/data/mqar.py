"""Multi-query associative recall (MQAR), the Zoology benchmark of Arora et al. (2023), generated.

A sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys from the lower half
of the vocabulary, values from the upper half, no key repeated). The rest of the sequence is random
tokens with every key asked once more at a random place; the model must emit that key's value at
the token after it. As next-token prediction: the input is the sequence, the label at position t is
the token at t + 1 where that token answers a query, and -100 (ignored) everywhere else. Accuracy is
over the answers only.

Query places follow Zoology's generator: the query region is split into slots of two tokens, and
slot g is drawn with probability proportional to g^(a - 1) (``power_a`` = a, 0.01 by default), so
most queries come soon after the pairs and a few far away; the token after a query is random filler
(the answer is the label, not part of the input).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .errors import DatasetError
from .registry import DataBundle, in_range, int_at_least, register_dataset

__all__ = ["IGNORE_INDEX", "make_mqar", "build_mqar"]

IGNORE_INDEX = -100  # torch's cross_entropy default: positions that are not answers


def make_mqar(
    n: int, seq_len: int, vocab_size: int, num_kv_pairs: int, generator: torch.Generator, power_a: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (n, seq_len) long, labels (n, seq_len) long with -100 off the answers)."""
    half = vocab_size // 2
    context = 2 * num_kv_pairs
    slots = (seq_len - context) // 2
    if half - 1 < num_kv_pairs or slots < num_kv_pairs:
        raise DatasetError(
            f"MQAR cannot place {num_kv_pairs} key-value pairs in seq_len={seq_len} with vocab_size={vocab_size}: "
            f"it needs vocab_size >= {2 * (num_kv_pairs + 1)} and seq_len >= {4 * num_kv_pairs}; lower "
            "data.num_kv_pairs or raise data.seq_len / data.vocab_size"
        )
    # Distinct keys 1..half-1 (0 is never a key) and values half..vocab-1 per sequence.
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :num_kv_pairs] + 1
    values = torch.rand(n, vocab_size - half, generator=generator).argsort(dim=1)[:, :num_kv_pairs] + half
    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=generator)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(n, slots), num_kv_pairs, replacement=False, generator=generator)
    where = context + 2 * gaps  # the query's position; its answer is the label there
    inputs.scatter_(1, where, keys)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, where, values)
    return inputs, labels


@register_dataset(
    "mqar",
    defaults={
        "num_train": 10000,
        "num_val": 1000,
        "num_test": 0,
        "seq_len": 64,
        "vocab_size": 256,
        "num_kv_pairs": 8,
        "power_a": 0.01,
    },
    checks={
        "num_train": int_at_least(1),
        "num_val": int_at_least(1),
        "num_test": int_at_least(0),
        "seq_len": int_at_least(8),
        "vocab_size": int_at_least(8),
        "num_kv_pairs": int_at_least(1),
        "power_a": in_range(0, 1, hi_closed=True),
    },
)
def build_mqar(cfg: dict, seed: int) -> DataBundle:
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    args = (cfg["seq_len"], cfg["vocab_size"], cfg["num_kv_pairs"], g, float(cfg["power_a"]))
    train = TensorDataset(*make_mqar(cfg["num_train"], *args))
    val = TensorDataset(*make_mqar(cfg["num_val"], *args))
    test = TensorDataset(*make_mqar(cfg["num_test"], *args)) if cfg["num_test"] else None
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=cfg["vocab_size"],
        model_overrides={"vocab_size": cfg["vocab_size"], "max_len": cfg["seq_len"]},
        info={
            "dataset": "mqar",
            "train": cfg["num_train"],
            "val": cfg["num_val"],
            "seq_len": cfg["seq_len"],
            "num_kv_pairs": cfg["num_kv_pairs"],
        },
    )
