"""polyattn.hf.StateCache: transformers generation from the x^p state, against generation with the KV cache.

Tiny GPT-2 (absolute positions) and Llama (RoPE, GQA) from configs, weights std 0.2 so that polynomial
attention is far from negligible; left-padded batches as generate expects them.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_llama import VOCAB, tiny_llama  # noqa: E402

import polyattn.hf  # noqa: E402
from polyattn.integrations import hf_cache  # noqa: E402


def gpt2(positions: int = 64):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=positions, initializer_range=0.2, n_embd=32, n_layer=2, n_head=4
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


CAUSAL = {"gpt2": gpt2, "llama": tiny_llama}


def model_for(arch: str, spec: str, dtype=torch.float64):
    model = polyattn.hf.use(CAUSAL[arch]().to(dtype), spec)
    model.generation_config.eos_token_id = None  # greedy paths run to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def left_padded(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 slots: the first with 3 slots of left padding, the second with none."""
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


def generate(model, ids, mask, cache=None, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    extra = {} if cache is None else {"cache": cache}
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **extra, **kwargs
        )


# --- equal to the KV cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["x/sqrt(N)", "x^2/sqrt(N)", "x^3/sqrt(N)"])
@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_forward_from_the_state_equals_the_kv_cache_in_float64(arch, spec):
    """Prefill a left-padded batch, then feed tokens one and three at a time: logits to 1e-10 of the KV cache."""
    model = model_for(arch, spec)
    ids, mask = left_padded()
    more = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name, cache in (("kv", transformers.DynamicCache()), ("state", polyattn.hf.StateCache(model))):
        m, outs = mask, []
        with torch.no_grad():
            for chunk in (ids, more[:, :1], more[:, 1:]):
                m = m if chunk is ids else torch.cat([m, torch.ones_like(chunk)], dim=1)
                pos = (m.cumsum(-1) - 1).clamp_min(0)[:, -chunk.shape[1] :]
                outs.append(model(input_ids=chunk, attention_mask=m, position_ids=pos, cache=cache).logits)
        logits[name] = torch.cat(outs, dim=1)
    real = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1).bool()  # padded rows' outputs are undefined
    torch.testing.assert_close(logits["state"][real], logits["kv"][real], rtol=0, atol=1e-10)


@pytest.mark.parametrize("spec", ["x/sqrt(N)", "x^2/sqrt(N)", "x^3/sqrt(N)"])
@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_greedy_generate_equals_the_kv_cache_past_the_prompt_length(arch, spec):
    model = model_for(arch, spec)
    ids, mask = left_padded()
    new = 14  # more new tokens than the prompt has
    kv = generate(model, ids, mask, max_new_tokens=new, do_sample=False)
    cache = polyattn.hf.StateCache(model)
    st = generate(model, ids, mask, cache=cache, max_new_tokens=new, do_sample=False)
    assert st.sequences.shape == (2, 9 + new) and torch.equal(st.sequences, kv.sequences)
    torch.testing.assert_close(torch.stack(st.logits), torch.stack(kv.logits), rtol=0, atol=1e-6)
    # N counts the real keys only: the padded row's state holds 3 keys fewer (the last token is not fed back).
    count = cache.layers[0].linear.count  # (batch, k/v heads)
    assert count.tolist() == [[6.0 + new - 1] * count.shape[1], [9.0 + new - 1] * count.shape[1]]


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_float32_generate_is_within_1e_5_of_the_kv_cache(arch):
    model = model_for(arch, "x^2/sqrt(N)", torch.float32)
    ids, mask = left_padded()
    kv = generate(model, ids, mask, max_new_tokens=8, do_sample=False)
    st = generate(model, ids, mask, cache=polyattn.hf.StateCache(model), max_new_tokens=8, do_sample=False)
    assert torch.equal(st.sequences, kv.sequences)
    torch.testing.assert_close(torch.stack(st.logits), torch.stack(kv.logits), rtol=0, atol=1e-5)


def test_sampling_and_beam_search_pick_the_kv_caches_tokens():
    model = model_for("llama", "x^2/sqrt(N)")
    ids, mask = left_padded()
    for kwargs in ({"do_sample": True, "top_k": 0, "temperature": 1.5}, {"num_beams": 3, "do_sample": False}):
        kv = generate(model, ids, mask, seed=5, max_new_tokens=10, **kwargs)
        st = generate(model, ids, mask, cache=polyattn.hf.StateCache(model), seed=5, max_new_tokens=10, **kwargs)
        assert torch.equal(st.sequences, kv.sequences), kwargs


def test_a_second_generate_continues_from_the_same_cache_as_with_the_kv_cache():
    """The last generated token and 3 new ones enter the state in one call of 4 queries (causal among them)."""
    model = model_for("llama", "x^2/sqrt(N)")
    ids, mask = left_padded()
    turns = {}
    for name in ("kv", "state"):
        cache = transformers.DynamicCache() if name == "kv" else polyattn.hf.StateCache(model)
        first = generate(model, ids, mask, cache=cache, max_new_tokens=4, do_sample=False).sequences
        more = torch.cat([first, torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(9))], 1)
        mask2 = torch.cat([mask, torch.ones(2, more.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        turns[name] = generate(model, more, mask2, cache=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(turns["state"].sequences, turns["kv"].sequences)
    torch.testing.assert_close(torch.stack(turns["state"].logits), torch.stack(turns["kv"].logits), rtol=0, atol=1e-6)


def test_past_key_values_is_accepted_as_the_old_name_of_cache():
    model = model_for("gpt2", "x/sqrt(N)")
    ids, mask = left_padded()
    cache = polyattn.hf.StateCache(model)
    with torch.no_grad(), pytest.warns(FutureWarning, match="past_key_values"):
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3)
    assert torch.equal(out, generate(model, ids, mask, max_new_tokens=3).sequences)
    assert cache.get_seq_length() == 9 + 2 and cache.nbytes > 0


def test_an_unpadded_prompt_enters_the_state_without_a_prompt_sized_mask(monkeypatch):
    built = []
    keep = hf_cache._keep
    monkeypatch.setattr(
        hf_cache, "_keep", lambda mask, *a: built.append(tuple(keep(mask, *a).shape[-2:])) or keep(mask, *a)
    )
    model = model_for("llama", "x^2/sqrt(N)")
    ids = left_padded()[0][1:]
    kv = generate(model, ids, None, max_new_tokens=3, do_sample=False)
    st = generate(model, ids, None, cache=polyattn.hf.StateCache(model), max_new_tokens=3, do_sample=False)
    assert torch.equal(st.sequences, kv.sequences)
    assert set(built) == {(1, 1)}  # the two new tokens' own masks, per layer: nothing of the prompt's size


# --- constant memory -------------------------------------------------------------------------------------
def test_the_cache_bytes_do_not_grow_with_the_generated_tokens():
    model = model_for("llama", "x^2/sqrt(N)", torch.float32)
    ids, mask = left_padded()
    sizes = {}
    for new in (16, 512):
        cache = polyattn.hf.StateCache(model)
        out = generate(model, ids, mask, cache=cache, max_new_tokens=new, do_sample=False)
        assert out.sequences.shape[1] == 9 + new and cache.get_seq_length() == 9 + new - 1
        sizes[new] = cache.nbytes
    # 2 layers x (batch 2 x 2 k/v heads) x (F = C(9, 2) = 36 features x dv 8 + 1 count) x 4 bytes
    assert sizes[16] == sizes[512] == 2 * 2 * 2 * (36 * 8 + 1) * 4


# --- use(..., cache="state") -------------------------------------------------------------------------------
def test_use_with_cache_state_makes_it_the_default_of_generate_and_kv_undoes_it():
    model = model_for("llama", "x^2/sqrt(N)")
    ids, mask = left_padded()
    kv = generate(model, ids, mask, max_new_tokens=5, do_sample=False)
    assert type(kv.cache) is transformers.DynamicCache
    polyattn.hf.use(model, "x^2/sqrt(N)", cache="state")
    st = generate(model, ids, mask, max_new_tokens=5, do_sample=False)
    assert isinstance(st.cache, polyattn.hf.StateCache) and torch.equal(st.sequences, kv.sequences)
    mine = transformers.DynamicCache()  # the caller's own cache wins
    assert generate(model, ids, mask, cache=mine, max_new_tokens=2).cache is mine
    polyattn.hf.use(model, "x^2/sqrt(N)")  # cache="kv"
    assert "generate" not in model.__dict__
    assert type(generate(model, ids, mask, max_new_tokens=2).cache) is transformers.DynamicCache


# --- refusals ----------------------------------------------------------------------------------------------
def test_softmax_other_activations_and_other_implementations_are_refused_naming_the_kv_cache():
    model = tiny_llama()
    with pytest.raises(ValueError, match="uses 'sdpa'.*polyattn.hf.use"):
        polyattn.hf.StateCache(model)
    for spec in ("softmax", "relu/N", "sigmoid-log(N)"):
        polyattn.hf.use(model, spec)
        with pytest.raises(ValueError, match="no finite state.*KV cache"):
            polyattn.hf.StateCache(model)
        with pytest.raises(ValueError, match="cache='state'.*no finite state.*KV cache"):
            polyattn.hf.use(model, spec, cache="state")
    with pytest.raises(ValueError, match="cache must be one of 'kv', 'state'"):
        polyattn.hf.use(model, "x^2/sqrt(N)", cache="linear")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        polyattn.hf.StateCache(torch.nn.Linear(2, 2))
    windowed = transformers.MistralConfig(num_hidden_layers=1, sliding_window=16)
    windowed._attn_implementation = polyattn.hf.register("x^2/sqrt(N)")
    with pytest.raises(ValueError, match="sliding_window=16.*KV cache"):
        polyattn.hf.StateCache(windowed)


def test_switching_the_model_away_from_polyattn_mid_generation_is_caught():
    model = model_for("gpt2", "x^2/sqrt(N)")
    ids, mask = left_padded()
    cache = polyattn.hf.StateCache(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
        model.set_attn_implementation("sdpa")  # its attention never reads the state
        model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 10, dtype=torch.long), cache=cache)
        with pytest.raises(RuntimeError, match="never read this layer's state"):
            model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 11, dtype=torch.long), cache=cache)


def test_a_state_cannot_be_cropped_but_can_be_reordered():
    model = model_for("gpt2", "x/sqrt(N)")
    ids, mask = left_padded()
    cache = polyattn.hf.StateCache(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
    with pytest.raises(ValueError, match="cannot drop tokens.*KV cache"):
        cache.crop(-1)
    cache.crop(0)  # nothing to drop: allowed
    before = cache.layers[1].linear.state.clone()
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.layers[1].linear.state, before[[1, 1]])
    assert isinstance(hf_cache.claim(torch.zeros(1)), type(None))
