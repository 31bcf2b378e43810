"""engram.integrations: Engram layers in Hugging Face decoders, and gate recording."""

from __future__ import annotations

import inspect

import pytest
import torch

import engram
from engram.integrations import (
    add_engram_layers,
    engram_gates,
    engram_layers,
    load_pretrained,
    record_gates,
    remove_engram_layers,
)

transformers = pytest.importorskip("transformers")

VOCAB = 300
PAD = 2


def small_engram_config(**changes) -> engram.EngramConfig:
    base = dict(engram_vocab_size=[997, 997], n_embed_per_ngram=32, n_head_per_ngram=4, layer_ids=[1, 3], pad_id=PAD)
    base.update(changes)
    return engram.EngramConfig(**base)


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=True,
        )
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128, pad_token_id=PAD, bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(cfg)


def with_engram(kind: str, compression=None, seed: int = 0):
    model = build(kind, seed)
    torch.manual_seed(seed + 1)
    add_engram_layers(model, small_engram_config(), compression=compression)
    # Fresh layers barely move the residual stream; train a few steps so that
    # the Engram path shapes the outputs the checks below compare.
    train(model, steps=8)
    return model.eval()


def train(model, steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 24), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


KINDS = ["llama", "gpt2"]


@pytest.fixture(scope="module", params=KINDS)
def trained(request):
    return request.param, with_engram(request.param)


# ---- structure ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_layers_sit_in_the_chosen_blocks(kind):
    model = build(kind)
    add_engram_layers(model, small_engram_config())
    layers = engram_layers(model)
    assert sorted(layers) == [1, 3]
    assert all(isinstance(l, engram.EngramLayer) and l.layer_id == i for i, l in layers.items())
    keys = [k for k in model.state_dict() if ".engram." in k]
    prefix = "model.layers" if kind == "llama" else "transformer.h"
    assert f"{prefix}.1.engram.multi_head_embedding.embedding.weight" in keys
    assert f"{prefix}.3.engram.key_projs.0.weight" in keys
    assert not any(f"{prefix}.0.engram" in k or f"{prefix}.2.engram" in k for k in keys)
    assert "engram_compression.lookup" in model.state_dict()
    assert model.config.engram["layer_ids"] == [1, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_and_reaches_the_tables(kind):
    model = build(kind)
    add_engram_layers(model, small_engram_config())
    losses = train(model, steps=6)
    assert losses[-1] < losses[0] - 0.5
    table = engram_layers(model)[1].multi_head_embedding.embedding.weight
    model.zero_grad()
    ids = torch.randint(3, VOCAB, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_engram_changes_the_outputs_and_remove_restores_them():
    plain = build("llama")
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        before = plain(ids).logits
    model = build("llama")
    add_engram_layers(model, small_engram_config())
    with torch.no_grad():
        with_layers = model(ids).logits
    assert not torch.allclose(before, with_layers)
    removed = remove_engram_layers(model)
    assert sorted(removed) == [1, 3]
    assert not any("engram" in k for k in model.state_dict())
    assert not hasattr(model.config, "engram")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    add_engram_layers(model, small_engram_config())  # and it can be added again
    assert sorted(engram_layers(model)) == [1, 3]


# ---- incremental decoding ---------------------------------------------------


def cache_argument(model):
    """The argument the backbone's forward takes its KV cache under (transformers
    renamed past_key_values to cache during 5.x)."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def test_cached_steps_equal_the_full_forward(trained):
    kind, model = trained
    name = cache_argument(model)
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        # Prefill 11 tokens, then feed chunks of 1 and 3 tokens through the cache.
        out = model(ids[:, :11], use_cache=True)
        pieces, cache, pos = [out.logits], out.cache if hasattr(out, "cache") else out.past_key_values, 11
        for step in (1, 3, 1, 1, 3, 10):
            out = model(ids[:, pos : pos + step], **{name: cache}, use_cache=True)
            pieces.append(out.logits)
            pos += step
    assert pos == ids.shape[1]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_feeding_new_tokens_without_history_would_differ(trained):
    # Guards the check above: the layers really read earlier tokens.
    kind, model = trained
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    layer = engram_layers(model)[1]
    hidden = torch.randn(1, 12, layer.hidden_size)
    with torch.no_grad():
        whole = layer(hidden, ids)[:, -1]
        alone = layer(hidden[:, -1:], ids[:, -1:])[:, -1]
    assert not torch.allclose(whole, alone, atol=1e-3)


def greedy_loop(model, prompt, new_tokens):
    x = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


def test_generate_with_cache_matches_without_and_a_manual_loop(trained):
    kind, model = trained
    prompt = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=15, do_sample=False, pad_token_id=PAD)
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (3, 22)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_loop(model, prompt, 15))


def test_generate_beam_search_with_cache(trained):
    # Beam search reorders the cache's rows each step; the hooks follow them.
    kind, model = trained
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_generate_left_padded_batch(trained):
    kind, model = trained
    gen = torch.Generator().manual_seed(9)
    prompt = torch.randint(3, VOCAB, (2, 8), generator=gen)
    mask = torch.ones_like(prompt)
    prompt[0, :3], mask[0, :3] = PAD, 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_a_cache_the_layers_did_not_see_is_an_error(trained):
    kind, model = trained
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        model(ids[:, :4])  # a fresh sequence resets the Engram context
        with pytest.raises(RuntimeError, match="cache of 10 tokens"):
            model(ids[:, -1:], **{cache_argument(model): cache}, use_cache=True)


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_a_cache_under_either_name_decodes_right_or_fails_loudly(trained, argument):
    # A transformers version may ignore a cache passed under the name it does
    # not take (5.0-5.17 ignore `cache`). Then the call must raise, never
    # return logits that differ from the full forward.
    kind, model = trained
    ids = torch.randint(3, VOCAB, (2, 14), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        try:
            step = model(ids[:, 10:], **{argument: cache}, use_cache=True).logits
        except RuntimeError as err:
            assert argument != cache_argument(model), f"the declared argument {argument!r} was refused: {err}"
            assert f"KV cache passed to the model as '{argument}'" in str(err) or (
                f"ignored the KV cache passed as '{argument}'" in str(err)
            ), str(err)
            return
    torch.testing.assert_close(step, full[:, 10:], rtol=1e-4, atol=1e-4)


# ---- save / load ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_and_load_pretrained(kind, tmp_path):
    lookup = torch.arange(VOCAB, dtype=torch.int64) // 2  # a non-identity compression
    model = with_engram(kind, compression=engram.CompressionTable(lookup))
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(type(model), str(tmp_path))
    assert not loaded.training
    assert sorted(engram_layers(loaded)) == [1, 3]
    assert engram_layers(loaded)[3].compression == engram.CompressionTable(lookup)
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    prompt = ids[:, :5]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(prompt, **kw), loaded.generate(prompt, **kw))


def test_state_dict_round_trip(tmp_path):
    model = with_engram("llama")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = build("llama", seed=123)
    add_engram_layers(fresh, small_engram_config())
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"), strict=True)
    fresh.eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_load_pretrained_rejects_a_plain_checkpoint(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no Engram settings"):
        load_pretrained(transformers.LlamaForCausalLM, str(tmp_path))


# ---- bad arguments ----------------------------------------------------------


def test_bad_arguments():
    cfg = small_engram_config()
    with pytest.raises(ValueError, match="not in config.layer_ids"):
        add_engram_layers(build("llama"), cfg, layer_ids=[2])
    with pytest.raises(ValueError, match="outside the model's 4 blocks"):
        add_engram_layers(build("llama"), small_engram_config(layer_ids=[1, 7]))
    with pytest.raises(ValueError, match="EngramConfig"):
        add_engram_layers(build("llama"), {"layer_ids": [1]})
    with pytest.raises(ValueError, match="CompressionTable"):
        add_engram_layers(build("llama"), cfg, compression=torch.arange(VOCAB))
    with pytest.raises(ValueError, match="blocks"):
        add_engram_layers(build("llama"), cfg, blocks="model.nonexistent")
    model = add_engram_layers(build("llama"), cfg)
    with pytest.raises(ValueError, match="already has Engram layers"):
        add_engram_layers(model, cfg)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 5, 64))
    with pytest.raises(ValueError, match="no Engram layers"):
        remove_engram_layers(build("llama"))


def test_explicit_blocks_path():
    model = build("gpt2")
    add_engram_layers(model, small_engram_config(), blocks="h")
    assert sorted(engram_layers(model)) == [1, 3]


# ---- gates --------------------------------------------------------------------


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_engram_gates_reproduce_the_layer_output(hc_mult):
    # If EngramLayer's gate changes, this catches engram_gates drifting from it.
    torch.manual_seed(0)
    cfg = small_engram_config()
    layer = engram.EngramLayer(cfg, 1, 48, hc_mult=hc_mult, compression=engram.CompressionTable.identity(VOCAB))
    hidden = torch.randn(2, 11, hc_mult, 48)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        gate = engram_gates(layer, hidden, ids)
        assert gate.shape == (2, 11, hc_mult)
        assert bool(((gate > 0) & (gate < 1)).all())
        e = layer.multi_head_embedding(layer.hash(ids)).reshape(2, 11, -1)
        value = gate.unsqueeze(-1) * layer.value_proj(e).unsqueeze(2)  # [B, T, G, D]
        # Spec §6 from the parameters: per-branch RMSNorm, causal depthwise
        # conv (kernel 4, dilation N), SiLU, plus the gated value.
        conv = layer.short_conv.conv
        u = torch.cat([layer.short_conv.norms[g](value[:, :, g]) for g in range(hc_mult)], -1).transpose(1, 2)
        u = torch.nn.functional.pad(u, ((conv.kernel_size[0] - 1) * conv.dilation[0], 0))
        y = torch.nn.functional.conv1d(u, conv.weight, dilation=conv.dilation, groups=conv.groups)
        expected = value + torch.nn.functional.silu(y.transpose(1, 2)).reshape(value.shape)
        out = layer(hidden, ids)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_record_gates_on_an_hf_model(trained):
    kind, model = trained
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad(), record_gates(model) as gates:
        model(ids)
    assert sorted(gates) == [1, 3]
    assert all(g.shape == (2, 9, 1) for g in gates.values())
    plain = record_gates(build("llama"))  # a context manager: it checks the model on entry
    with pytest.raises(ValueError, match="no EngramLayer"):
        plain.__enter__()
