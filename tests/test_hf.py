"""polyattn.hf: polyattn as a transformers attention implementation (GPT-2, Llama with GQA, BERT, ViT).

Every model is built from a tiny config with random weights; nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from tiny_llama import INIT, VOCAB, tiny_llama  # noqa: E402

import polyattn  # noqa: E402
import polyattn.hf  # noqa: E402
from polyattn.integrations import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLY = "x^3/sqrt(N)"
ATOL = 1e-5


# --- tiny models -----------------------------------------------------------------------------------
def gpt2(**overrides):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, initializer_range=INIT, n_embd=32, n_layer=2, n_head=4, **overrides
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        initializer_range=INIT,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def vit():
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        initializer_range=INIT,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    return transformers.ViTModel(cfg).eval()


TEXT = {"gpt2": gpt2, "llama": tiny_llama, "bert": bert}
CAUSAL = {"gpt2": gpt2, "llama": tiny_llama}


def output(model: nn.Module, impl: str, **inputs) -> torch.Tensor:
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def padded_batch(side: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 9 token slots: the first has 3 padding slots on ``side``, the second none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    pad = slice(0, 3) if side == "left" else slice(6, 9)
    mask[0, pad] = 0
    ids[0, pad] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' generate uses for left padding: counted over real tokens only."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


# --- names and registration ------------------------------------------------------------------------
def test_register_names_an_implementation_per_activation_in_both_registries():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = polyattn.hf.register("X^3 / sqrt(n)")
    assert name == "polyattn:x^3/sqrt(N)" == hf.attn_implementation_name(POLY) == hf.attn_implementation_name(name)
    assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
    assert polyattn.hf.register(POLY) == name  # idempotent
    names = polyattn.hf.register()
    assert names == [f"polyattn:{polyattn.get_activation(s).spec}" for s in hf.DEFAULT_ACTIVATIONS]
    assert set(names) <= set(hf.registered_names())
    assert polyattn.hf.register(["x/14", "x^2/N"]) == ["polyattn:x/14", "polyattn:x^2/N"]


def test_from_config_accepts_a_registered_name():
    name = polyattn.hf.register("x^3/14")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    assert model.config._attn_implementation == name
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 5))).logits).all()


@pytest.mark.parametrize("build", [gpt2, tiny_llama, bert, vit], ids=["gpt2", "llama", "bert", "vit"])
def test_use_switches_every_layer_and_changes_the_output(build):
    model = build()
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16)} if build is vit else {"input_ids": padded_batch("right")[0]}
    soft = output(model, "sdpa", **inputs)
    assert polyattn.hf.use(model, POLY) is model
    assert all(
        m.config._attn_implementation == "polyattn:x^3/sqrt(N)"
        for m in model.modules()
        if isinstance(m, transformers.PreTrainedModel)
    )
    with torch.no_grad():
        out = model(**inputs)
    poly = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(poly).all()
    assert (poly - soft).abs().max() > 1e-3  # the activation really changed


def test_use_raises_when_transformers_leaves_a_model_on_its_own_attention(monkeypatch):
    # transformers only logs a warning for a model it cannot switch: use() must not let that pass silently.
    model = gpt2()
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(RuntimeError, match=r"could not switch GPT2LMHeadModel, GPT2Model to 'polyattn:x\^3/sqrt\(N\)'"):
        polyattn.hf.use(model, POLY)


# --- softmax through polyattn is transformers' softmax ---------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", sorted(TEXT))
def test_softmax_equals_sdpa_and_eager_with_padding(arch, side):
    model = TEXT[arch]()
    ids, mask = padded_batch(side)
    real = mask.bool()  # padded positions' outputs are undefined (and differ between sdpa and eager)
    ref = output(model, "eager", input_ids=ids, attention_mask=mask)
    sdpa = output(model, "sdpa", input_ids=ids, attention_mask=mask)
    ours = output(model, polyattn.hf.register("softmax"), input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[real], sdpa[real], atol=ATOL, rtol=0)


def test_softmax_equals_sdpa_and_eager_on_vit():
    model = vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = output(model, polyattn.hf.register("softmax"), pixel_values=x)
    torch.testing.assert_close(ours, output(model, "eager", pixel_values=x), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, output(model, "sdpa", pixel_values=x), atol=ATOL, rtol=0)


# --- masking under x^3/sqrt(N) ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_no_leak_from_the_future(arch):
    model = polyattn.hf.use(CAUSAL[arch](), POLY)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 7) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :-1], b[:, :-1])  # bitwise: masked weights are exactly 0
    assert not torch.equal(a[:, -1], b[:, -1])  # the changed token itself did change


@pytest.mark.parametrize(("arch", "side"), [("gpt2", "left"), ("llama", "left"), ("bert", "right"), ("bert", "left")])
def test_no_leak_from_padding(arch, side):
    model = polyattn.hf.use(TEXT[arch](), POLY)
    ids, mask = padded_batch(side)
    changed = ids.clone()
    changed[mask == 0] = 42
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
        b = model(input_ids=changed, attention_mask=mask)
    a, b = (o.logits if hasattr(o, "logits") else o.last_hidden_state for o in (a, b))
    real = mask.bool()
    assert torch.equal(a[real], b[real])
    assert not torch.equal(a[~real], b[~real])  # the padded slots' own outputs did see the change


def test_n_is_counted_per_row_bidirectional():
    # BERT sees every real token: with N counted over the padded length the padded copy would differ.
    model = polyattn.hf.use(bert(), POLY)
    ids, mask = padded_batch("right")
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[:1, :6]).last_hidden_state
    torch.testing.assert_close(batch[0, :6], alone[0], atol=ATOL, rtol=0)


def test_n_is_counted_per_row_causal_left_padding():
    model = polyattn.hf.use(tiny_llama(), POLY)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        alone = model(input_ids=ids[:1, 3:]).logits
    torch.testing.assert_close(batch[0, 3:], alone[0], atol=ATOL, rtol=0)


def test_padding_is_ignored_without_the_mask_function_and_respected_with_it():
    """The registry pitfall: a name known to AttentionInterface only gets attention_mask=None."""
    from transformers import AttentionInterface

    bare = "polyattn-test-no-mask-function"
    AttentionInterface.register(bare, hf.make_attention_forward(POLY))
    try:
        model = bert()
        ids, mask = padded_batch("right")
        alone = output(model, polyattn.hf.register(POLY), input_ids=ids[:1, :6])[0]
        ours = output(model, polyattn.hf.register(POLY), input_ids=ids, attention_mask=mask)[0, :6]
        ignored = output(model, bare, input_ids=ids, attention_mask=mask)[0, :6]
    finally:
        AttentionInterface._global_mapping.pop(bare, None)
    torch.testing.assert_close(ours, alone, atol=ATOL, rtol=0)
    assert (ignored - alone).abs().max() > 1e-3  # the padding leaked in: what register() prevents


# --- KV cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["softmax", POLY])
@pytest.mark.parametrize(("arch", "cache"), [("gpt2", "dynamic"), ("llama", "dynamic"), ("llama", "static")])
def test_generate_with_cache_equals_full_recomputation(arch, cache, activation):
    """Left-padded batches with the default (dynamic) cache; with a static cache, an unpadded batch prefills 9
    queries against 13 key slots, where transformers' sdpa mask would be skipped for a top-left causal one."""
    # float64, so that logits equal to rounding cannot pick different tokens at a near-tie of random weights.
    model = polyattn.hf.use(CAUSAL[arch]().double(), activation)
    model.generation_config.eos_token_id = None  # Llama's default eos (2) would end or reshape the greedy path
    ids, mask = padded_batch("left")  # a left-padded batch, as generate expects
    if cache == "static":
        mask = torch.ones_like(mask)
    new = 4
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            use_cache=True,
            cache_implementation=cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        seq = gen.sequences
        assert seq.shape == (2, ids.shape[1] + new)
        full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
        full = model(input_ids=seq, attention_mask=full_mask, position_ids=positions(full_mask), use_cache=False)
    steps = full.logits[:, ids.shape[1] - 1 : -1]  # the logits that chose each new token
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), steps.float(), atol=1e-5, rtol=0)
    assert torch.equal(steps.argmax(-1), seq[:, ids.shape[1] :])


# --- training ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_training_step_gives_finite_gradients_for_every_parameter(build):
    model = polyattn.hf.use(build(), POLY).train()
    ids, mask = padded_batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_attention_dropout_applies_in_training_only():
    model = polyattn.hf.use(gpt2(attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0), POLY)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        torch.manual_seed(0)
        a = model(ids).logits
        torch.manual_seed(1)
        b = model(ids).logits
    assert not torch.equal(a, b)


# --- the attention function called directly ------------------------------------------------------------
class _Module(nn.Module):
    is_causal = True


def _qkv(heads=4, kv_heads=2, q_len=3, kv_len=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, heads, q_len, d, generator=g),
        torch.randn(2, kv_heads, kv_len, d, generator=g),
        torch.randn(2, kv_heads, kv_len, d, generator=g),
    )


def test_gqa_broadcasts_without_repeating_kv_and_regroups_per_head_masks():
    fn = hf.make_attention_forward(POLY)
    q, k, v = _qkv(q_len=7)
    out, weights = fn(_Module().eval(), q, k, v, None)
    assert weights is None and out.shape == (2, 7, 4, 8)  # (B, T, H, d), as transformers expects
    repeated = polyattn.attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), POLY, causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, repeated, atol=1e-6, rtol=0)
    # A per-head mask and bias are regrouped with the query heads: head h keeps its own.
    g = torch.Generator().manual_seed(6)
    keep, bias = torch.rand(2, 4, 7, 7, generator=g) > 0.3, torch.randn(1, 4, 7, 7, generator=g)
    out = fn(_Module(), q, k, v, keep, position_bias=bias)[0]
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = polyattn.attention(q, k4, v4, POLY, attn_mask=keep, bias=bias).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_gqa_decoding_reads_the_cache_without_copies(monkeypatch):
    # Fewer queries than keys (a KV cache): the group's query heads become rows of their k/v head, so
    # polyattn.attention gets the cache as it is: no (B, H, S, d) copy, in the HF layer or in a backend.
    fn = hf.make_attention_forward(POLY)
    q, k, v = _qkv(q_len=2, kv_len=9)
    g = torch.Generator().manual_seed(8)
    keep = torch.rand(2, 4, 2, 9, generator=g) > 0.3  # per query head, as a custom 4D mask may be
    seen = []
    real = hf.attention
    monkeypatch.setattr(hf, "attention", lambda *a, **kw: seen.append((a[0].shape, a[1].shape)) or real(*a, **kw))
    out = fn(_Module(), q, k, v, keep)[0]
    assert seen == [(torch.Size([2, 2, 4, 8]), torch.Size([2, 2, 9, 8]))]  # (B, Hkv, G * q, d), (B, Hkv, S, d)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = polyattn.attention(q, k4, v4, POLY, attn_mask=keep).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # no mask: bottom-right causal, the rows of every group head aligned alike
    causal = torch.ones(2, 9, dtype=torch.bool).tril(diagonal=7)
    ref = polyattn.attention(q, k4, v4, POLY, attn_mask=causal).transpose(1, 2)
    torch.testing.assert_close(fn(_Module(), q, k, v, None)[0], ref, atol=1e-6, rtol=0)


def test_no_mask_with_a_cache_is_bottom_right_causal():
    fn = hf.make_attention_forward(POLY)
    q, k, v = _qkv(heads=2, kv_heads=2, q_len=3, kv_len=7)
    keep = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)  # query i is position 4 + i
    ref = polyattn.attention(q, k, v, POLY, attn_mask=keep).transpose(1, 2)
    torch.testing.assert_close(fn(_Module(), q, k, v, None)[0], ref, atol=1e-6, rtol=0)
    window = keep & ~torch.ones(3, 7, dtype=torch.bool).tril(diagonal=1)  # the last 3 positions
    ref = polyattn.attention(q, k, v, POLY, attn_mask=window).transpose(1, 2)
    torch.testing.assert_close(fn(_Module(), q, k, v, None, sliding_window=3)[0], ref, atol=1e-6, rtol=0)
    full = polyattn.attention(q, k, v, POLY).transpose(1, 2)
    torch.testing.assert_close(fn(_Module(), q, k, v, None, is_causal=False)[0], full, atol=1e-6, rtol=0)


def test_dropout_is_applied_only_to_modules_in_training_mode():
    fn = hf.make_attention_forward(POLY)
    q, k, v = _qkv(heads=2, kv_heads=2, q_len=7, kv_len=7)
    plain = fn(_Module(), q, k, v, None)[0]
    assert torch.equal(fn(_Module().eval(), q, k, v, None, dropout=0.5)[0], plain)
    assert not torch.equal(fn(_Module().train(), q, k, v, None, dropout=0.5)[0], plain)


def test_additive_float_masks_become_bool_masks_and_biases():
    fn = hf.make_attention_forward(POLY)
    q, k, v = _qkv(heads=2, kv_heads=2, q_len=7, kv_len=7)
    keep = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(4)) > 0.3
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    by_bool = fn(_Module(), q, k, v, keep)[0]
    torch.testing.assert_close(fn(_Module(), q, k, v, additive)[0], by_bool, atol=0, rtol=0)
    bias = torch.randn(keep.shape, generator=torch.Generator().manual_seed(5))
    ref = polyattn.attention(q, k, v, POLY, attn_mask=keep, bias=bias).transpose(1, 2)
    torch.testing.assert_close(fn(_Module(), q, k, v, additive + bias)[0], ref, atol=1e-6, rtol=0)


def test_bad_inputs_raise_errors_that_name_the_problem():
    with pytest.raises(ValueError, match=r"bad activation spec 'x\^3/foo'"):
        polyattn.hf.register("x^3/foo")
    with pytest.raises(ValueError, match="bad activation spec"):
        polyattn.hf.use(gpt2(), "cube")
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel, got Linear.*polyattn.patch"):
        polyattn.hf.use(nn.Linear(2, 2), POLY)
    with pytest.raises(TypeError, match="spec string"):
        polyattn.hf.register(3)  # type: ignore[call-overload]

    fn = hf.make_attention_forward(POLY)
    q, k, v = _qkv(heads=4, kv_heads=4, q_len=7, kv_len=7)
    with pytest.raises(TypeError, match=r"got dtype torch.int64; convert a 0/1 keep-mask with mask.bool\(\)"):
        fn(_Module(), q, k, v, torch.ones(2, 1, 7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch or 1, 1 or 4 heads"):
        fn(_Module(), q, k, v, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        fn(_Module(), q, k, v, torch.full((2, 1, 7, 7), float("nan")))
    with pytest.raises(ValueError, match="cannot take softcap"):
        fn(_Module(), q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        fn(_Module(), q, k[:, :3], v[:, :3], None)


def test_import_polyattn_does_not_import_transformers_and_polyattn_hf_names_the_extra():
    code = (
        "import sys, polyattn\n"
        "print('transformers' in sys.modules)\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    import polyattn.hf\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded, error = out.stdout.strip().splitlines()
    assert loaded == "False"
    assert "pip install 'polyattn[hf]'" in error
