"""The transformers tests' model: a 2-layer Llama with grouped-query attention, seeded, in seconds."""

from __future__ import annotations

VOCAB = 100
# Large enough for x^3 attention to matter: at transformers' default 0.02 the scores are so small
# that every activation looks alike.
INIT = 0.2


def tiny_llama():
    """A seeded ``LlamaForCausalLM`` in eval mode: 4 query heads over 2 k/v heads (2 query heads per
    k/v head), width 32, positions up to 64."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        initializer_range=INIT,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()
