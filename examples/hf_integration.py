"""Engram layers in a Hugging Face transformers model, without editing its code.

Builds a small Llama from a config (no download), adds Engram layers at blocks
1 and 3 with engram.integrations.add_engram_layers, trains it briefly on the
Python standard library's source, generates with the KV cache, then saves with
save_pretrained and reloads with engram.integrations.load_pretrained.

    pip install transformers
    python examples/hf_integration.py --out runs/hf       # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import engram
from engram.integrations import add_engram_layers, engram_layers, load_pretrained

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny_lm import (  # noqa: E402  (the corpus and tokenizer helpers of the tiny-LM example)
    SPECIAL_TOKENS,
    build_compression,
    encode_stream,
    random_batch,
    read_texts,
    stdlib_files,
    train_tokenizer,
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the saved model")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--files", type=int, default=60, help="stdlib files to train on")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.steps < 1 or args.files < 2:
        p.error("--steps must be >= 1 and --files >= 2")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        sys.exit("this example needs transformers: pip install transformers")
    torch.manual_seed(0)
    device = torch.device(args.device)

    # A tokenizer, its canonical-id compression (spec §1) and a token stream.
    texts = read_texts(stdlib_files(max_files=args.files))
    tok = train_tokenizer(texts, vocab_size=2048)
    compression, _ = build_compression(tok)
    stream = encode_stream(tok, texts)
    print(f"{len(texts)} files, {stream.numel():,} tokens, {compression}")

    # Any decoder works; this one is built from a config, so nothing is downloaded.
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=SPECIAL_TOKENS.index("<pad>"), tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ecfg = engram.EngramConfig(
        engram_vocab_size=[10007, 10007], n_embed_per_ngram=64, n_head_per_ngram=4, layer_ids=[1, 3],
        pad_id=config.pad_token_id,
    )
    add_engram_layers(model, ecfg, compression=compression)  # blocks 1 and 3 now start with an Engram layer
    for layer in engram_layers(model).values():
        # A model trained from scratch has a residual stream at initializer_range
        # scale; rows at that scale (not the reference's N(0, 1)) and a silent
        # short conv keep the fresh layers from swamping it (see train_tiny_lm.py).
        torch.nn.init.normal_(layer.multi_head_embedding.embedding.weight, std=config.initializer_range)
        torch.nn.init.zeros_(layer.short_conv.conv.weight)
    model.to(device)
    print(f"Engram layers at blocks {sorted(engram_layers(model))}; {sum(p.numel() for p in model.parameters()):,} params")

    # Plain training: the layers get input_ids through hooks, nothing else changes.
    tables = [l.multi_head_embedding.embedding.weight for l in engram_layers(model).values()]
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    opts = [torch.optim.AdamW(dense, lr=3e-3), torch.optim.Adam(tables, lr=1.5e-2)]  # tables: higher lr, no decay
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        batch = random_batch(stream, 8, 96, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    # generate() with the KV cache: the layers keep the few past tokens and
    # block inputs their n-gram hash and short conv need.
    model.eval()
    prompt = torch.tensor([tok.encode("    def __init__(self").ids], device=device)
    cached = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=config.pad_token_id)
    uncached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False,
                              pad_token_id=config.pad_token_id)
    print("generated (after a minute of training, expect repetitive code):", repr(tok.decode(cached[0].tolist())))
    print("same tokens with and without the KV cache:", torch.equal(cached, uncached))

    # save_pretrained keeps the Engram weights, the compression table and the
    # Engram settings (config.engram); load_pretrained rebuilds all of it.
    model.save_pretrained(args.out)
    reloaded = load_pretrained(LlamaForCausalLM, args.out).to(device)
    with torch.no_grad():
        same = torch.equal(model(prompt).logits, reloaded(prompt).logits)
    print(f"saved to {args.out}; reloaded outputs equal: {same}")


if __name__ == "__main__":
    main()
