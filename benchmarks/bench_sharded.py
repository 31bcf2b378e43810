"""Sharded Engram tables (engram.distributed) on this machine, over gloo.

Runs one training step loop of an EngramLayer with row-sharded tables on 1, 2
and 3 CPU processes (this script relaunches itself per rank) and reports per
step:

* bytes each rank sends to other ranks in the table exchange (counts, ids,
  rows, row gradients) against the minimum: the rows it needs from other
  ranks times the row bytes, both directions (rows in, gradients out);
* step time (forward + backward + fused row-wise Adam) at a fixed global
  batch split over the ranks;

then a model of the exchange at the paper's scale (8 and 64 GPUs) next to
the compute time of a block, with every assumption printed.

    python3 benchmarks/bench_sharded.py [--steps 20] [--worlds 1,2,3] [--idle-ms 0]

and the same loop with engram.Prefetcher (batch i+1 prefetched during batch
i): the lookup's time with and without, i.e. the share of it hidden.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def worker(args) -> None:
    import torch.distributed as dist

    import engram
    from engram import distributed as ed
    from engram.optim import make_rowwise

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["ENGRAM_RDV"], rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    cfg = engram.EngramConfig(engram_vocab_size=[args.rows_per_head] * 2, n_embed_per_ngram=args.dim,
                              n_head_per_ngram=args.heads, layer_ids=[0])
    layer = engram.EngramLayer(cfg, 0, args.hidden, compression=engram.CompressionTable.identity(args.vocab))
    ed.shard_tables(layer)
    make_rowwise(layer, "adam", lr=1e-3)
    shard = ed.sharded_tables(layer)[0]
    row_bytes = shard.embedding.weight.shape[1] * shard.embedding.weight.element_size()

    sent = {"bytes": 0}
    plain = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        per_row = input[0].numel() * input.element_size() if input.dim() > 1 else input.element_size()
        splits = input_split_sizes or [input.shape[0] // world] * world
        sent["bytes"] += sum(s for r, s in enumerate(splits) if r != rank) * per_row
        return plain(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting

    # The lookup's own time (the exchange on the step's critical path), measured in its forward.
    lookup_times = []
    direct = shard.forward

    def timed_forward(*a, **kw):
        dist.barrier()  # the lookup's own time, not the wait for a slower rank to arrive
        start = time.perf_counter()
        out = direct(*a, **kw)
        lookup_times.append(time.perf_counter() - start)
        return out

    shard.forward = timed_forward

    def run(prefetcher):
        g = torch.Generator().manual_seed(1)
        local = args.batch // world
        batches = [(torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)[rank * local:(rank + 1) * local],
                    torch.randn(local, args.seq, args.hidden, generator=g)) for _ in range(args.steps + 2)]
        minimum, times = 0, []
        lookup_times.clear()
        if prefetcher is not None:
            prefetcher.prefetch(batches[0][0])
        for step, (ids, hidden) in enumerate(batches):
            if step == 2:  # the first two warm up
                sent["bytes"] = 0
                lookup_times.clear()
            if step >= 2:
                rows = torch.unique(layer.hash(ids) + shard.offsets)
                remote = ((rows < shard.row_start) | (rows >= shard.row_stop)).sum().item()
                minimum += 2 * remote * row_bytes
            dist.barrier()
            start = time.perf_counter()
            if prefetcher is not None and step + 1 < len(batches):  # batch i+1 during batch i
                prefetcher.prefetch(batches[step + 1][0])
            if args.idle_ms:  # earlier layers computing on an accelerator: the host is idle meanwhile
                time.sleep(args.idle_ms / 1e3)
            layer(hidden, ids).pow(2).mean().backward()
            dist.barrier()
            if step >= 2:
                times.append(time.perf_counter() - start)
        if prefetcher is not None:
            prefetcher.wait()
        return sorted(times)[len(times) // 2], sorted(lookup_times)[len(lookup_times) // 2], sent["bytes"], minimum

    step_s, lookup_s, sent_bytes, minimum = run(None)
    with engram.Prefetcher(layer) as prefetcher:
        pf_step_s, pf_lookup_s, pf_sent, _ = run(prefetcher)
        hits = prefetcher.stats.hits
    result = {"rank": rank, "world": world, "sent": sent_bytes / args.steps, "minimum": minimum / args.steps,
              "step_s": step_s, "lookup_s": lookup_s, "prefetch_step_s": pf_step_s, "prefetch_lookup_s": pf_lookup_s,
              "prefetch_sent": pf_sent / args.steps, "prefetch_hits": hits,
              "local_rows": shard.row_stop - shard.row_start, "rows": shard.num_rows, "row_bytes": row_bytes}
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)


def launch(world: int, argv) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   WORLD_SIZE=str(world), ENGRAM_RDV=os.path.join(tmp, "rdv"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", *argv], env=dict(env, RANK=str(r)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        results = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise SystemExit(f"bench_sharded: {world} ranks did not finish in 600 s")
            lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                raise SystemExit(f"bench_sharded: a rank failed:\n{out}")
            results.append(json.loads(lines[0][7:]))
        return results


def paper_model(args) -> None:
    """Exchange time per step at the paper's scale against a block's compute."""
    tokens = args.paper_tokens_per_gpu
    lookups = 16  # (N-1) * H = 2 * 8 heads per token (the reference configuration)
    row_bytes = args.paper_row_width // lookups * 2  # bf16 rows of 1280 / 16 = 80 values
    print("\nModel at the paper's scale (per GPU, per Engram layer and step; assumptions, not measurements):")
    print(f"  tokens per GPU {tokens}, {lookups} lookups per token, {row_bytes} B rows (bf16, width "
          f"{args.paper_row_width} / {lookups}), every lookup a distinct row (upper bound; n-grams are Zipfian),")
    print(f"  ids 8 B per row, NVLink {args.nvlink_gbs} GB/s and InfiniBand {args.ib_gbs} GB/s per GPU per "
          f"direction, block compute {args.block_flops_per_token:.2e} FLOP/token x 3 (fwd+bwd) at "
          f"{args.tflops} TFLOP/s")
    compute = 3 * args.block_flops_per_token * tokens / (args.tflops * 1e12)
    print(f"\n  | GPUs | remote share | bytes out per direction | exchange time (fwd rows + bwd grads) | "
          f"block compute |")
    print("  |---:|---:|---:|---:|---:|")
    for gpus, per_node in ((8, 8), (64, 8)):
        remote = (gpus - 1) / gpus
        out_bytes = tokens * lookups * remote * (row_bytes + 8)
        intra = (per_node - 1) / (gpus - 1)  # share of the remote rows on the same node
        # ids + rows forward, grads backward; the slower link bounds each phase.
        seconds = 0.0
        for share, gbs in ((intra, args.nvlink_gbs), (1 - intra, args.ib_gbs)):
            seconds = max(seconds, 2 * out_bytes * share / (gbs * 1e9))
        print(f"  | {gpus} | {remote:.3f} | {out_bytes / 1e6:.2f} MB | {seconds * 1e3:.3f} ms | "
              f"{compute * 1e3:.2f} ms |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worlds", default="1,2,3")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=12, help="global batch (sequences), split over the ranks")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rows-per-head", type=int, default=50021)
    p.add_argument("--dim", type=int, default=128, help="n_embed_per_ngram")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--idle-ms", type=float, default=0.0,
                   help="sleep this long per step before the forward, as a host waits on accelerator compute "
                        "(0: none; on this CPU-only machine the ranks' compute leaves no idle core otherwise)")
    p.add_argument("--paper-tokens-per-gpu", type=int, default=16384)
    p.add_argument("--paper-row-width", type=int, default=1280)
    p.add_argument("--nvlink-gbs", type=float, default=450.0)
    p.add_argument("--ib-gbs", type=float, default=50.0)
    p.add_argument("--block-flops-per-token", type=float, default=2 * 0.13e9,
                   help="forward FLOPs per token of one block (2 x its active parameters; default ~0.13 B)")
    p.add_argument("--tflops", type=float, default=400.0)
    args, rest = p.parse_known_args(argv)
    if args.worker:
        worker(args)
        return
    forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    print(f"bench_sharded: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; global batch "
          f"{args.batch} x {args.seq} tokens, table {4 * args.rows_per_head}+ rows of {args.dim // args.heads} "
          f"float32, gloo")
    print("\n| processes | step time (median) | sent per rank per step | minimum | sent / minimum |")
    print("|---:|---:|---:|---:|---:|")
    runs = {}
    for world in (int(w) for w in args.worlds.split(",")):
        results = runs[world] = launch(world, forward)
        step = max(r["step_s"] for r in results)
        sent = sum(r["sent"] for r in results) / world
        minimum = sum(r["minimum"] for r in results) / world
        ratio = f"{sent / minimum:.3f}" if minimum else "n/a (one rank: nothing is remote)"
        print(f"| {world} | {step * 1e3:.1f} ms | {sent / 1e3:.1f} KB | {minimum / 1e3:.1f} KB | {ratio} |")
    print("\nengram.Prefetcher (batch i+1's id exchange and remote gather issued during batch i, on the "
          "prefetcher's own process group); lookup = the sharded table's forward after a barrier (medians, slowest "
          "rank), "
          "hidden share = 1 - prefetched / direct lookup:")
    print("\n| processes | lookup direct | lookup prefetched | hidden share | step direct | step prefetched | "
          "hits |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for world, results in runs.items():
        if world < 2:
            continue
        direct = max(r["lookup_s"] for r in results)
        staged = max(r["prefetch_lookup_s"] for r in results)
        print(f"| {world} | {direct * 1e3:.2f} ms | {staged * 1e3:.2f} ms | {1 - staged / direct:.2f} | "
              f"{max(r['step_s'] for r in results) * 1e3:.1f} ms | "
              f"{max(r['prefetch_step_s'] for r in results) * 1e3:.1f} ms | "
              f"{min(r['prefetch_hits'] for r in results)}/{args.steps + 2} |")
    paper_model(args)


if __name__ == "__main__":
    main()
