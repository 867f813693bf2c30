"""polyattn.hf on padding-free packed batches (DataCollatorWithFlattening): the same loss and gradients as padding."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_llama import VOCAB, tiny_llama  # noqa: E402

import polyattn  # noqa: E402
import polyattn.hf  # noqa: E402
from polyattn.core import varlen  # noqa: E402
from polyattn.integrations import hf  # noqa: E402

LENGTHS = [5, 9, 1, 6]


def llama():
    return tiny_llama().double().train()


def documents():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def padded_batch(docs):
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def step(model, batch):
    """transformers' causal LM loss (next-token cross-entropy, -100 ignored), kept in float64."""
    model.zero_grad()
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def varlen_calls(monkeypatch):
    calls = []
    real = varlen.attention_varlen

    def spy(*args, **kwargs):
        calls.append(args[3].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "attention_varlen", spy)
    return calls


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("activation", ["x^3/sqrt(N)", "softmax", "sigmoid-log(N)"])
def test_packed_training_step_equals_padded(activation, flash_kwargs, varlen_calls):
    docs = documents()
    model = polyattn.hf.use(llama(), activation)
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    packed = collator([{"input_ids": d} for d in docs])
    assert packed["input_ids"].shape == (1, sum(LENGTHS))
    loss_packed, grads_packed = step(model, packed)
    assert varlen_calls and varlen_calls[0] == [0, 5, 14, 15, 21]  # every layer took the packed path
    varlen_calls.clear()
    loss_padded, grads_padded = step(model, padded_batch(docs))
    assert not varlen_calls
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-10, atol=1e-10)
    for name, g in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], g, rtol=1e-8, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_packed_differs_from_one_long_sequence(varlen_calls):
    # Without the document boundaries (one sequence of 21 tokens) the loss changes: the test above can fail.
    docs = documents()
    model = polyattn.hf.use(llama(), "x^3/sqrt(N)")
    packed = transformers.DataCollatorWithFlattening()([{"input_ids": d} for d in docs])
    loss_packed, _ = step(model, packed)
    joined = dict(packed, position_ids=torch.arange(sum(LENGTHS))[None])
    loss_joined, _ = step(model, joined)
    assert len(varlen_calls) == 2  # only the packed call
    assert not torch.allclose(loss_packed, loss_joined, rtol=1e-4)


def test_a_padding_mask_over_the_row_is_followed_instead_of_position_ids(varlen_calls):
    # As flash_attention_2: a 2D mask of ones is no mask (the packed path), while a mask with padding
    # makes transformers build one causal mask over the row, which polyattn then follows.
    docs = documents()
    model = polyattn.hf.use(llama(), "x^3/sqrt(N)").eval()
    packed = transformers.DataCollatorWithFlattening()([{"input_ids": d} for d in docs])
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    with torch.no_grad():
        ones = model(**inputs, attention_mask=torch.ones(1, 21, dtype=torch.long)).logits
        assert len(varlen_calls) == 2
        torch.testing.assert_close(ones, model(**inputs).logits, rtol=0, atol=0)
        varlen_calls.clear()
        mask = torch.ones(1, 21, dtype=torch.long)
        mask[0, -2:] = 0
        model(**inputs, attention_mask=mask)
    assert not varlen_calls
