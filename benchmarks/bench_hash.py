"""Tokens/s of NgramHasher.hash (fused kernel) vs the numpy formulation of the
reference release (engram.reference.ngram_hash) and the same statement in
plain PyTorch ops (engram.reference.ngram_hash_torch), same inputs, one run.

    python benchmarks/bench_hash.py [--batch 8] [--seq 4096] [--family deepseek] [--device cpu|cuda]
    python benchmarks/bench_hash.py --levels [--threads 1,2]   # every CPU ISA level, per thread count

--levels times the CPU hash at each ISA level this CPU runs (engram.ops.use_cpu_isa)
and thread count, against the numpy reference at the same thread count, and prints
ns per id next to the memory-write floor: the output's bytes divided by the
bandwidth of a copy of the same size (torch copy_, same threads).
"""

import argparse
import platform

import numpy as np
import torch
from torch.utils.benchmark import Timer

import engram
from engram import CompressionTable, EngramConfig, NgramHasher
from engram import reference as ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=129280, help="tokenizer vocabulary (DeepSeek-V3: 129280)")
    parser.add_argument("--family", choices=["deepseek", "xxh64"], default="deepseek")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the numpy peer always runs on the CPU)")
    parser.add_argument("--levels", action="store_true", help="every CPU ISA level and --threads, with the write floor")
    parser.add_argument("--threads", default="1,2", help="thread counts for --levels")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = EngramConfig(hash=args.family)  # reference defaults: N=3, H=8, layers [1, 15]
    table = CompressionTable.identity(args.vocab)
    hasher = NgramHasher(cfg, table)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    tokens = ids.numel()
    device = torch.device(args.device)
    ids_dev = ids.to(device)

    # The reference computes its parameters once and hashes in numpy per forward.
    lookup = table.lookup.numpy()
    primes = ref.layer_head_primes(cfg.engram_vocab_size, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.layer_ids)
    mult = ref.layer_multipliers(table.num_canonical, cfg.max_ngram_size, cfg.seed, cfg.layer_ids)
    ids_np = ids.numpy()

    def reference_hash():
        if args.family == "deepseek":
            return ref.ngram_hash(ids_np, lookup, mult, primes, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.pad_id)
        return ref.ngram_hash_xxh64(
            ids_np, lookup, cfg.seed, cfg.layer_ids, primes, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.pad_id
        )

    mult_dev = {l: torch.from_numpy(m).to(device) for l, m in mult.items()}
    lookup_dev = table.lookup.to(device)

    def torch_hash():
        return ref.ngram_hash_torch(ids_dev, lookup_dev, mult_dev, primes, cfg.max_ngram_size, cfg.n_head_per_ngram,
                                    cfg.pad_id)

    # Same ids, checked before timing.
    ours, theirs = {l: v.cpu() for l, v in hasher.hash(ids_dev).items()}, None
    if args.family == "deepseek" or tokens <= 4096:
        theirs = reference_hash()
        for l in cfg.layer_ids:
            assert np.array_equal(ours[l].numpy(), theirs[l]), f"layer {l}: ids differ from the reference"

    print(f"engram n-gram hashing: B={args.batch} T={args.seq} layers={cfg.layer_ids} N={cfg.max_ngram_size} "
          f"H={cfg.n_head_per_ngram} family={args.family}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"engram CPU ISA level {engram.cpu_isa()} (ENGRAM_CPU_ISA)")
    if args.family == "deepseek":
        want = torch_hash()
        for l in cfg.layer_ids:
            assert torch.equal(want[l].cpu(), ours[l]), f"layer {l}: plain-PyTorch ids differ"

    def timed(fn):  # Timer synchronizes CUDA around each measurement
        # Timer defaults to one thread; measure with the threads torch uses.
        timer = Timer("f()", globals={"f": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=args.min_run_time).median

    if args.levels:
        return per_level(args, hasher, ids, reference_hash, timed)

    rows = [(f"NgramHasher.hash (engram, fused, {device.type})", timed(lambda: hasher.hash(ids_dev)))]
    if args.family == "deepseek":
        rows.append(("numpy reference (reference.ngram_hash, cpu)", timed(reference_hash)))
        rows.append((f"plain PyTorch ops (reference.ngram_hash_torch, {device.type})", timed(torch_hash)))
    width = max(len(name) for name, _ in rows)
    for name, sec in rows:
        print(f"  {name:<{width}}  {sec * 1e3:9.3f} ms  {tokens / sec / 1e6:8.2f} M tokens/s")
    for name, sec in rows[1:]:
        print(f"  speed-up vs {name.split(' (')[0]}: {sec / rows[0][1]:.1f}x")


def per_level(args, hasher, ids, reference_hash, timed) -> None:
    from engram import ops

    out = hasher.hash(ids)
    n_ids = sum(v.numel() for v in out.values())
    out_bytes = n_ids * 8
    src, dst = torch.randint(0, 100, (n_ids,)), torch.empty(n_ids, dtype=torch.int64)
    print(f"ids per call {n_ids}, output {out_bytes / 2**20:.1f} MiB")
    print(f"{'level':<8} {'threads':>7} {'engram ms':>10} {'numpy ms':>9} {'ratio':>7} {'ns/id':>7} "
          f"{'copy GB/s':>9} {'floor ns/id':>11} {'to floor':>8}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        copy_s = timed(lambda: dst.copy_(src))
        floor_ns = copy_s / n_ids * 1e9
        for level in ops.cpu_isa_levels():
            with ops.use_cpu_isa(level):
                ours = timed(lambda: hasher.hash(ids))
            theirs = timed(reference_hash)
            print(f"{level:<8} {threads:>7} {ours * 1e3:>10.3f} {theirs * 1e3:>9.3f} {theirs / ours:>6.1f}x "
                  f"{ours / n_ids * 1e9:>7.3f} {out_bytes / copy_s / 1e9:>9.1f} {floor_ns:>11.3f} "
                  f"{ours / copy_s:>7.2f}x")


if __name__ == "__main__":
    main()
