"""Host / mmap Engram tables with and without engram.Prefetcher, against the
table held as a plain parameter, in a toy transformer (pre-norm blocks,
Engram layers before blocks 2 and 6), one run, same weights and inputs:

  (a) device   table_placement="device": the table is a parameter beside the
               rest of the model (on the CPU: in ordinary memory).
  (b) prefetch table_placement=--placement ("mmap" or "host") with
               engram.Prefetcher: the rows of batch i+1 are gathered on worker
               threads while batch i computes.
  (c) direct   the same table, looked up when each layer runs.

Reported: tokens/s of each (median of interleaved rounds), (b) and (c)
relative to (a), the bytes of table rows a token reads (every lookup, and
after deduplicating each batch's rows), the unique-row ratio (distinct rows /
lookups per batch and layer), and the share of the gather time the prefetch
hid: 1 - (time the layers spend in their table lookup in (b), i.e. waiting on
and using the staged rows) / (that time in (c), the direct gather).

Token ids are synthetic: Zipf(s=1.1) over a 32k vocabulary (n-gram reuse like
text's, not a real stream). --train adds the backward and the fused row-wise
SGD update of the tables (the rest of the model gets gradients, no step).

    python benchmarks/bench_offload.py [--device cpu|cuda] [--layers 12] [--hidden 256] [--batch 4] [--seq 256]
        [--rows-per-head 100000] [--placement mmap|host] [--steps 8] [--rounds 3] [--threads N] [--workers 1]
        [--train]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import engram
from engram import CompressionTable, EngramConfig, EngramLayer

VOCAB = 32768
ENGRAM_BLOCKS = (2, 6)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, h):
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class ToyLM(nn.Module):
    def __init__(self, args, placement, directory=None):
        super().__init__()
        torch.manual_seed(0)  # the same weights in every placement
        cfg = EngramConfig(engram_vocab_size=[args.rows_per_head] * 2, max_ngram_size=3,
                           n_embed_per_ngram=args.engram_dim, n_head_per_ngram=8, layer_ids=list(ENGRAM_BLOCKS))
        self.embed = nn.Embedding(VOCAB, args.hidden)
        self.blocks = nn.ModuleList([Block(args.hidden, args.heads) for _ in range(args.layers)])
        self.engrams = nn.ModuleDict({
            str(l): EngramLayer(cfg, l, args.hidden, compression=CompressionTable.identity(VOCAB),
                                table_placement=placement,
                                table_path=os.path.join(directory, f"engram{l}.npy") if placement == "mmap" else None)
            for l in ENGRAM_BLOCKS
        })

    def forward(self, ids):
        h = self.embed(ids)
        for i, block in enumerate(self.blocks):
            if str(i) in self.engrams:
                h = h + self.engrams[str(i)](h, ids)
            h = block(h)
        return h


class LookupTimer:
    """Seconds the model spends inside its table lookups (MultiHeadEmbedding.forward)."""

    def __init__(self, model, device):
        self.total, self.device, self._start = 0.0, device, None
        for layer in model.engrams.values():
            layer.multi_head_embedding.register_forward_pre_hook(self._pre)
            layer.multi_head_embedding.register_forward_hook(self._post)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _pre(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        self._sync()
        self.total += time.perf_counter() - self._start


def run_pass(model, data, prefetcher, train, optimizer, device):
    """One pass over the batches; returns seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if prefetcher:
        prefetcher.prefetch(data[0])
    for i, ids in enumerate(data):
        if prefetcher and i + 1 < len(data):
            prefetcher.prefetch(data[i + 1])  # gathered while batch i computes
        with torch.set_grad_enabled(train):
            out = model(ids)
            if train:
                out.float().square().mean().backward()
                model.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=None, help="default 256 on the CPU, 1024 on a GPU")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    parser.add_argument("--engram-dim", type=int, default=256, help="n_embed_per_ngram (head_dim = this / 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows-per-head", type=int, default=100_000, help="engram_vocab_size per order")
    parser.add_argument("--placement", default="mmap", choices=["mmap", "host"])
    parser.add_argument("--steps", type=int, default=8, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=1, help="prefetch worker threads")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--table-dir", default=None, help="folder for the mmap files (default: a temp folder)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.hidden = args.hidden or (1024 if device.type == "cuda" else 256)
    args.heads = args.heads or max(1, args.hidden // 64)
    if args.threads:
        torch.set_num_threads(args.threads)

    directory = args.table_dir or tempfile.mkdtemp(prefix="engram_offload_")
    try:
        models = {
            "device": ToyLM(args, "device").to(device),
            "prefetch": ToyLM(args, args.placement, directory).to(device),
        }
        models["direct"] = models["prefetch"]  # the same host table, without the prefetcher
        table = models["device"].engrams["2"].multi_head_embedding.embedding.weight
        rng = np.random.default_rng(0)
        data = [torch.from_numpy((rng.zipf(1.1, size=(args.batch, args.seq)) - 1) % VOCAB).to(device)
                for _ in range(args.steps)]

        optimizers = {}
        if args.train:
            optimizers = {k: engram.optim.make_rowwise(m, "sgd", lr=1e-3) for k, m in
                          (("device", models["device"]), ("prefetch", models["prefetch"]))}
        timers = {name: LookupTimer(models[name], device) for name in ("device", "prefetch")}
        prefetcher = engram.Prefetcher(models["prefetch"], num_threads=args.workers)
        times = {name: [] for name in ("device", "prefetch", "direct")}
        lookup = {name: [] for name in times}
        for round_ in range(args.rounds + 1):  # round 0 warms up (page cache, allocator)
            for name in ("device", "prefetch", "direct"):
                timer = timers["device" if name == "device" else "prefetch"]
                timer.total = 0.0
                prefetcher.enabled = name == "prefetch"
                seconds = run_pass(models[name], data, prefetcher if name == "prefetch" else None, args.train,
                                   optimizers.get(name), device)
                if round_:
                    times[name].append(seconds)
                    lookup[name].append(timer.total)
        prefetcher.close()

        tokens = args.batch * args.seq * args.steps
        tps = {name: tokens / statistics.median(t) for name, t in times.items()}
        rows_head = table.shape[1]
        layer = models["device"].engrams["2"]
        k = layer.hash_sizes.shape[1]
        bytes_row = rows_head * table.element_size()
        unique = []
        for ids in data:
            for l in models["device"].engrams.values():
                rows = l.hash(ids) + l.multi_head_embedding.offsets
                unique.append(torch.unique(rows).numel() / rows.numel())
        ratio = statistics.mean(unique)
        per_token = len(ENGRAM_BLOCKS) * k * bytes_row
        gather_c, gather_b = statistics.median(lookup["direct"]), statistics.median(lookup["prefetch"])

        print(f"device {device}, torch threads {torch.get_num_threads()}, prefetch workers {args.workers}, "
              f"{'forward+backward+row-wise SGD' if args.train else 'forward (no grad)'}")
        print(f"model: {args.layers} blocks, D={args.hidden}, Engram before blocks {list(ENGRAM_BLOCKS)}, "
              f"table {table.shape[0]:,} x {rows_head} {str(table.dtype).replace('torch.', '')} "
              f"({table.numel() * table.element_size() / 2**20:.0f} MiB per layer), placement {args.placement!r}")
        print(f"batches: {args.steps} x [{args.batch}, {args.seq}] Zipf(1.1) tokens; {args.rounds} rounds")
        print(f"{'':10} {'tokens/s':>10} {'vs (a)':>8} {'lookup ms/pass':>15}")
        for label, name in (("(a) device", "device"), ("(b) prefetch", "prefetch"), ("(c) direct", "direct")):
            print(f"{label:12} {tps[name]:10.0f} {tps[name] / tps['device']:8.3f} "
                  f"{1e3 * statistics.median(lookup[name]):15.2f}")
        print(f"bytes of rows per token: {per_token} ({len(ENGRAM_BLOCKS)} layers x {k} heads x {bytes_row} B); "
              f"after per-batch dedup: {per_token * ratio:.0f}")
        print(f"unique-row ratio (distinct rows / lookups, per batch and layer): {ratio:.3f}")
        print(f"gather time hidden by the prefetch: {100 * (1 - gather_b / gather_c):.1f}% "
              f"(lookups {1e3 * gather_b:.2f} ms with vs {1e3 * gather_c:.2f} ms without, per pass)")
    finally:
        if args.table_dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
