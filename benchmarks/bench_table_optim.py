"""One training step of an Engram table alone: the backward of the lookup plus
the optimizer update, for the reference table (one layer: 16 heads, 10.34 M x
64 rows, float32) and 16k tokens x 16 heads.

  dense     nn.Embedding, dense gradient + torch.optim.Adam (default settings:
            the for-loop implementation on the CPU)
  dense-f   the same with torch.optim.Adam(fused=True), the fastest dense Adam
  sparse    nn.Embedding(sparse=True) + torch.optim.SparseAdam
  engram    engram.optim.make_rowwise(..., "adam"): dedup, per-row sums and
            the row-wise Adam update inside the lookup's backward (no .grad)

Ids: per head, Zipf-distributed ranks (exponent --zipf, n-grams are Zipfian)
hashed to rows, and uniform rows; both are printed, with U, the distinct rows
a step touches.

Time: the median (and best) of --steps timed steps after --warmup steps. The
lookup's forward runs before the clock starts; a step is backward + step() +
zero_grad(set_to_none=True), as a training loop runs them. Each method runs in
its own process, one after another.

Peak extra memory: on the CPU, the growth of the resident set during one step
(after the warm-up, so the optimizer state already exists), measured as in
bench_layer.py, in a second process: the peak RSS (VmHWM) is reset through
/proc/self/clear_refs, and the process runs with MALLOC_MMAP_THRESHOLD_=65536
so that freed blocks go back to the OS and the RSS follows live allocations. On CUDA,
max_memory_allocated() during the step minus the allocation before it.
"Persistent" is what the method keeps between steps besides the table (the
optimizer state). The dense methods need about 4-6 table sizes of memory
(15 GiB on the CPU at the reference size); a method that does not fit in the
available memory is skipped.

    python benchmarks/bench_table_optim.py [--device cuda] [--rows N] [--tokens 16384] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import engram
from engram import optim
from engram.layer import MultiHeadEmbedding

METHODS = {
    "dense": "nn.Embedding + Adam",
    "dense-f": "nn.Embedding + Adam(fused)",
    "sparse": "nn.Embedding(sparse) + SparseAdam",
    "engram": "engram row-wise Adam, fused",
}
# Table-sized tensors each method holds at its peak on the CPU (table, state,
# gradient, temporaries), to skip what does not fit.
TABLE_COPIES = {"dense": 6.2, "dense-f": 4.2, "sparse": 3.3, "engram": 3.3}


def reference_head_sizes(rows):
    """The 16 head sizes of the reference's first Engram layer, or 16 equal
    heads of rows/16 when --rows is given."""
    if rows is None:
        cfg = engram.EngramConfig()
        hasher = engram.NgramHasher(cfg, engram.CompressionTable.identity(engram.layer.DEFAULT_VOCAB_SIZE))
        return list(hasher.head_sizes(cfg.layer_ids[0]))
    return [rows // 16 + (1 if i < rows % 16 else 0) for i in range(16)]


def make_ids(sizes, tokens, dist, zipf, seed=0):
    """[tokens, K] ids per head (without offsets)."""
    rng = np.random.default_rng(seed)
    cols = []
    for k, size in enumerate(sizes):
        if dist == "uniform":
            cols.append(rng.integers(0, size, tokens))
        else:
            ranks = rng.zipf(zipf, tokens)  # >= 1, heavy-tailed: rank 1 is the most frequent n-gram
            # A hash spreads the n-grams over the head's rows.
            cols.append((ranks.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(k)) % np.uint64(size))
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def run_method(args, method, dist):
    """Runs in the child process: returns a dict of measurements."""
    device = torch.device(args.device)
    sizes = reference_head_sizes(args.rows)
    num_rows, dim = sum(sizes), args.dim
    ids = make_ids(sizes, args.tokens, dist, args.zipf).to(device)
    offsets = torch.tensor(np.cumsum([0] + sizes[:-1]), dtype=torch.int64, device=device)
    flat_ids = ids + offsets
    grad_out = torch.randn(args.tokens, len(sizes), dim, device=device)
    unique_rows = int(torch.unique(flat_ids).numel())

    if method == "engram":
        # The layer's lookup module, with the table swapped in (no N(0, 1) init
        # of 10 M rows; every page is touched before measuring).
        module = MultiHeadEmbedding([1] * len(sizes), dim).to(device)
        module.offsets.copy_(offsets)
        module.embedding = torch.nn.Embedding(num_rows, dim, _weight=torch.empty(num_rows, dim, device=device).uniform_(-1, 1))
        weight = module.embedding.weight
        opt = optim.make_rowwise(module, "adam", lr=1e-3)

        def forward():
            return module(ids)
    else:
        weight = torch.nn.Parameter(torch.empty(num_rows, dim, device=device).uniform_(-1, 1))
        sparse = method == "sparse"
        if sparse:
            opt = torch.optim.SparseAdam([weight], lr=1e-3)
        else:
            opt = torch.optim.Adam([weight], lr=1e-3, fused=method == "dense-f")

        def forward():
            return F.embedding(flat_ids, weight, sparse=sparse)

    def step(out):
        out.backward(grad_out)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step(forward())
    sync()
    times = []
    for _ in range(args.steps):
        out = forward()
        sync()
        t0 = time.perf_counter()
        step(out)
        sync()
        times.append(time.perf_counter() - t0)

    if not args.peak:
        return {"times": times, "rows": num_rows, "unique_rows": unique_rows, "table_mib": num_rows * dim * 4 / 2**20}

    # Peak extra memory of one more step.
    out = forward()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(out)
        sync()
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kib("VmRSS")
            step(out)
            peak = (_status_kib("VmHWM") - before) / 1024
        except OSError:
            peak = None
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"peak_mib": peak, "state_mib": state / 2**20}


def available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def in_subprocess(args, method, dist):
    """Times the method in one fresh process, then measures its peak in another:
    the malloc setting the RSS measurement needs (every freed block back to
    the OS) makes every temporary fault its pages in again, which is no way to
    time anything."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", f"{method}:{dist}", "--device", args.device,
            "--tokens", str(args.tokens), "--dim", str(args.dim), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--zipf", str(args.zipf), "--threads", str(args.threads)]
    if args.rows is not None:
        argv += ["--rows", str(args.rows)]
    result = {}
    for extra, env in (([], dict(os.environ)), (["--peak"], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))):
        if extra and args.device == "cpu" and args.steps > 1:
            extra += ["--steps", "1"]  # the peak run needs no timing
        done = subprocess.run(argv + extra, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=None, help="table rows (default: the reference layer's, 10.34 M)")
    p.add_argument("--dim", type=int, default=64, help="row width Dh")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (each looks up 16 rows)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the n-gram ranks (> 1)")
    p.add_argument("--dists", default="zipf,uniform")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        method, dist = args.child.split(":")
        print(json.dumps(run_method(args, method, dist)))
        return

    sizes = reference_head_sizes(args.rows)
    table_gib = sum(sizes) * args.dim * 4 / 2**30
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"Engram table step (backward of the lookup + update): table {sum(sizes):,} x {args.dim} float32 "
          f"({table_gib:.2f} GiB), {args.tokens:,} tokens x {len(sizes)} heads = {args.tokens * len(sizes):,} "
          f"lookups; {device_name}, torch {torch.__version__}, {args.threads} threads")
    methods = args.methods.split(",")
    for dist in args.dists.split(","):
        results = {}
        for method in methods:
            need = TABLE_COPIES[method] * table_gib
            free = available_gib()
            if args.device == "cpu" and free is not None and need > 0.9 * free:
                results[method] = {"error": f"skipped: needs ~{need:.1f} GiB, {free:.1f} GiB available"}
                continue
            results[method] = in_subprocess(args, method, dist)
        ok = {m: r for m, r in results.items() if "error" not in r}
        any_result = next(iter(ok.values()), None)
        label = f"Zipf(s={args.zipf})" if dist == "zipf" else "uniform"
        if any_result:
            u, n = any_result["unique_rows"], args.tokens * len(sizes)
            label += f": {u:,} distinct rows of {n:,} lookups ({u / n:.0%}), {u / sum(sizes):.2%} of the table"
        print(f"\n{label}")
        print(f"  {'':<34} {'step: median (best)':>22} {'peak extra':>12} {'% table':>8} {'persistent':>11}")
        for method in methods:
            r = results[method]
            if "error" in r:
                print(f"  {METHODS[method]:<34} {r['error']}")
                continue
            med, best = statistics.median(r["times"]) * 1e3, min(r["times"]) * 1e3
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
            share = "" if r["peak_mib"] is None else f"{r['peak_mib'] / r['table_mib']:.1%}"
            print(f"  {METHODS[method]:<34} {med:>9.1f} ({best:>7.1f}) ms {peak:>12} {share:>8} "
                  f"{r['state_mib']:>7.0f} MiB")
        if "engram" in ok:
            ours = statistics.median(ok["engram"]["times"])
            for method in ("dense", "dense-f", "sparse"):
                if method in ok:
                    ratio = statistics.median(ok[method]["times"]) / ours
                    print(f"  engram is {ratio:.1f}x faster than {METHODS[method]}")


if __name__ == "__main__":
    main()
