"""Export a Hugging Face decoder with Engram layers: torch.export + AOTInductor.

Builds a small transformers Llama from a config (random weights, nothing is
downloaded), adds Engram layers with engram.integrations.add_engram_layers,
exports it with engram.export (dynamic batch and sequence length, the Engram
tables as runtime inputs), compiles an AOTInductor package, then greedily
decodes with the package and with eager transformers (and checks the eager
tokens against model.generate with its KV cache). Writes to --out what
examples/export_tiny_lm.py writes (model.pt2, tables.json + .npy tables,
export_metrics.json), so the C++ runner decodes it the same way:

    python examples/export_hf_decoder.py --out runs/hf_export              # ~30 s on 2 CPU cores
    examples/cpp/build/generate runs/hf_export/model.pt2 runs/hf_export/tables.json "5,9,2;7,1,3" 24

The package computes whole sequences (no KV cache: an exported program keeps
no state between calls), which is what greedy decoding without a cache does.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import engram
import engram.export as ex
from engram.integrations import add_engram_layers, engram_layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_tiny_lm import compare_decoding, export_package, time_only, write_metrics, write_tables  # noqa: E402


class CausalLMLogits(nn.Module):
    """model(input_ids) -> logits [B, T, V] of a transformers *ForCausalLM,
    without the KV cache: the one tensor output a runner reads."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=args.max_len, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=True,
    )
    lm = LlamaForCausalLM(config)
    ecfg = engram.EngramConfig(
        engram_vocab_size=[args.engram_vocab_size] * (args.max_ngram - 1), max_ngram_size=args.max_ngram,
        n_embed_per_ngram=args.engram_dim, n_head_per_ngram=args.engram_heads, layer_ids=args.engram_layer_ids,
        pad_id=config.pad_token_id, seed=args.seed,
    )
    torch.manual_seed(args.seed + 1)
    # The layers' own init (N(0, 1) table rows): untrained, the Engram branch
    # then steers the tokens, so equal tokens mean equal table lookups.
    add_engram_layers(lm, ecfg)
    return lm.eval()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64, help="max_position_embeddings, and the package's max_seq")
    p.add_argument("--engram-layers", default="1")
    p.add_argument("--engram-vocab-size", type=int, default=100003)
    p.add_argument("--engram-dim", type=int, default=32)
    p.add_argument("--engram-heads", type=int, default=4)
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--decode-batch", type=int, default=2)
    p.add_argument("--timing-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--time-only", action="store_true",
                   help="no export: time one forward pass of --out's package and of eager on its decoded ids")
    args = p.parse_args(argv)
    try:
        args.engram_layer_ids = [int(x) for x in args.engram_layers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--engram-layers={args.engram_layers!r}: expected comma-separated ints such as 1,3")
    if args.prompt_len + args.new_tokens > args.max_len:
        p.error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds --max-len={args.max_len}")
    if not 1 <= args.decode_batch <= args.max_batch:
        p.error(f"--decode-batch={args.decode_batch}: expected 1..--max-batch={args.max_batch}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        import transformers
    except ImportError:
        sys.exit("this example needs transformers: pip install transformers")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    lm = build_model(args)
    model = CausalLMLogits(lm).eval()
    if args.time_only:
        return time_only(model, args.out, "model.pt2", args.timing_repeats)
    tables = ex.table_tensors(model)
    print(f"transformers {transformers.__version__} Llama: {sum(p.numel() for p in model.parameters()):,} params, "
          f"Engram layers at blocks {sorted(engram_layers(lm))}, {len(tables)} tables of "
          f"{ex.table_bytes(tables) / 2**20:.1f} MiB")
    example = torch.randint(0, args.vocab_size, (2, args.prompt_len))
    metrics = export_package(model, example, args.max_batch, args.max_len, os.path.join(args.out, "model.pt2"))
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, args.vocab_size, (args.decode_batch, args.prompt_len), generator=gen)
    metrics.update(compare_decoding(model, metrics["path"], prompt, args.new_tokens, args.timing_repeats))
    # transformers' own greedy decoding, with the KV cache the package has
    # not; all new_tokens of them (no stop at an end-of-sequence token).
    lm.generation_config.eos_token_id = None
    with torch.no_grad():
        generated = lm.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                pad_token_id=lm.config.pad_token_id)
    metrics["generate_tokens_equal"] = generated.tolist() == metrics["eager_tokens"]
    print(f"model.generate (KV cache) tokens == eager tokens: {metrics['generate_tokens_equal']}")
    print(f"tables for the C++ runner: {write_tables(model, args.out)}")
    metrics["transformers"] = transformers.__version__
    metrics["args"] = {k: v for k, v in vars(args).items() if k != "engram_layer_ids"}
    write_metrics(args.out, metrics)
    if not metrics["generate_tokens_equal"]:
        sys.exit(f"model.generate decoded {generated.tolist()}, eager without a cache {metrics['eager_tokens']}")
    return metrics


if __name__ == "__main__":
    main()
