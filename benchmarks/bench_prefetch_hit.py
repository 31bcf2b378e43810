"""One prefetched lookup of a host table on the CPU, its gather already finished: the Python and engine work a
hit puts on the model's critical path. Timed warm (back to back) and cold (after a GEMM and a sweep over 16 MiB,
as right after a model's compute, where every object the interpreter touches is a cache miss), with and without
grad. No peer: compare builds side by side (docs/benchmarks.md).

    python benchmarks/bench_prefetch_hit.py [--batch 4] [--seq 256] [--lookups 300] [--rounds 3]
"""

import argparse
import statistics
import time

import torch

import engram
from engram import CompressionTable, EngramConfig, EngramLayer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = EngramConfig(engram_vocab_size=[997, 1009], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                          layer_ids=[1])
    layer = EngramLayer(config, 1, 16, compression=CompressionTable.identity(300), table_placement="host")
    module = layer.multi_head_embedding
    ids = torch.randint(0, 300, (args.batch, args.seq))
    hash_ids = layer.hash(ids)
    square, sweep = torch.randn(1024, 1024), [torch.randn(256, 1024) for _ in range(16)]

    def median_us(cold: bool, grad: bool) -> float:
        times = []
        with engram.Prefetcher(layer) as prefetcher, torch.set_grad_enabled(grad):
            for _ in range(args.lookups):
                prefetcher.prefetch(ids)
                prefetcher.wait()
                if cold:
                    for block in sweep:
                        block.add_(1)
                    square @ square
                start = time.perf_counter_ns()
                module(hash_ids, ids)
                times.append(time.perf_counter_ns() - start)
            if prefetcher.stats.hits != args.lookups:
                raise RuntimeError(f"expected every lookup to hit, got {prefetcher.stats}")
        return statistics.median(times[args.lookups // 10:]) / 1e3

    print(f"prefetched lookup of a host table, [{args.batch}, {args.seq}] tokens, torch {torch.__version__}, "
          f"1 thread, median us of {args.lookups} per round")
    for round_ in range(args.rounds):
        print(f"  round {round_ + 1}: no grad warm {median_us(False, False):6.1f}  cold {median_us(True, False):6.1f}"
              f"   grad warm {median_us(False, True):6.1f}  cold {median_us(True, True):6.1f}")


if __name__ == "__main__":
    main()
