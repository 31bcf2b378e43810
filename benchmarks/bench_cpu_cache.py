"""What engram's private CPU block cache gains in a whole training step of
the main job (examples/train_tiny_lm.py's model and sizes) with row-wise
table training, the recommended path, where no dense table gradient exists.

The cache is switched on and off in interleaved rounds of one process, so
both sides see the same machine load. It also prints the bytes the cache
holds after a step (engram.empty_cpu_cache()'s return): what it can save.

    python benchmarks/bench_cpu_cache.py [--steps 10 --rounds 5 --table-optim rowwise-adam]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import engram  # noqa: E402
import train_tiny_lm as tiny  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per round and setting")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--table-optim", default="rowwise-adam", choices=tuple(tiny.TABLE_OPTIMS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    defaults = tiny.parse_args(["--out", "unused", "--table-optim", args.table_optim,
                                "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)])
    torch.manual_seed(0)
    vocab = defaults.vocab_size  # the main job's BPE size; tokens are random here (no tokenizer training)
    model = tiny.TinyLM(vocab, defaults.d_model, defaults.layers, defaults.heads, defaults.seq_len)
    layer_ids = [int(x) for x in defaults.engram_layers.split(",")]
    config = engram.EngramConfig(engram_vocab_size=[defaults.engram_vocab_size] * (defaults.max_ngram - 1),
                                 max_ngram_size=defaults.max_ngram, n_embed_per_ngram=defaults.engram_dim,
                                 n_head_per_ngram=defaults.engram_heads, layer_ids=layer_ids, pad_id=0)
    model.add_engram(config, engram.CompressionTable.identity(vocab))
    opts = tiny.make_optimizers(model, defaults)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=gen)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()

    for _ in range(3):
        step()  # warm-up: allocator, kept blocks, thread pools
    times = {True: [], False: []}
    kept = 0
    for r in range(args.rounds):
        for enabled in ((True, False) if r % 2 == 0 else (False, True)):
            engram.set_cpu_cache_enabled(enabled)
            step()  # the first step after a switch refills (or not) the cache
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[enabled].append((time.perf_counter() - start) / args.steps)
            if enabled:
                kept = max(kept, engram.empty_cpu_cache())
                step()  # refill what was just emptied before the next timed round
        print(f"round {r + 1}/{args.rounds}: cache on {times[True][-1] * 1e3:.1f} ms/step, "
              f"off {times[False][-1] * 1e3:.1f} ms/step", flush=True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"\nmain job's model, {args.table_optim}, batch {args.batch_size} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"median step: cache on {on * 1e3:.1f} ms, off {off * 1e3:.1f} ms; gain {100 * (off - on) / off:+.1f}%")
    print(f"bytes the cache held after a step: {kept:,}")


if __name__ == "__main__":
    main()
