"""Host / mmap Engram tables with and without engram.Prefetcher, against the
table held as a plain parameter, in a toy transformer (pre-norm blocks,
Engram layers before blocks 2 and 6), one run, same weights and inputs:

  (a) device   table_placement="device": the table is a parameter beside the
               rest of the model (on the CPU: in ordinary memory).
  (b) prefetch table_placement=--placement ("mmap" or "host") with
               engram.Prefetcher: the rows of batch i+1 are gathered while
               batch i computes. On CUDA, per --gpu-path: "staged" (worker
               threads into pinned staging, copied at use) and/or
               "zero-copy" (a kernel reads the pinned host rows over UVA on
               a side stream; host placement only).
  (c) direct   the same table, looked up when each layer runs.

Reported: tokens/s of each (median of interleaved rounds), (b) and (c)
relative to (a), the bytes of table rows a token reads (every lookup, and
after deduplicating each batch's rows), the unique-row ratio (distinct rows /
lookups per batch and layer), and on the CPU the share of the gather time the
prefetch hid:

    1 - (time (b) spends on the critical path for the rows: in the layers'
         table lookups, i.e. waiting on and using the staged rows, plus in the
         prefetch() calls, which hash and queue the next batch)
        / (time (c) spends in its table lookups, the direct gather).

(On CUDA the lookups are asynchronous, so this split is not measured: compare
the tokens/s of (b) and (a).)

Hot-row cache: the hit rate (share of the (token, head) lookups whose row the
cache holds) of engram.Prefetcher(hot_rows=...) on a real token stream: the
Python standard library's source (found with sysconfig, nothing downloaded),
tokenized with a byte-level BPE trained on it here (`tokenizers`), fed in
consecutive [batch, seq] windows through the model's Engram lookups, for cache
sizes of --hot-sizes of each table's rows; counted after the first refresh.

Token ids of the timed passes are synthetic: Zipf(s=1.1) over a 32k vocabulary.
--train adds the backward and the fused row-wise SGD update of the tables (the
rest of the model gets gradients, no step).

--sparse-table-gib G: instead, an mmap table of G GiB per layer in a sparse
file (zeros; only the pages read are ever materialised), forward only, without
(a): a table as large as the disk and RAM allow, or larger than both.

    python benchmarks/bench_offload.py [--device cpu|cuda] [--layers 12] [--hidden 256] [--batch 4] [--seq 256]
        [--rows-per-head 100000] [--placement mmap|host] [--steps 8] [--rounds 3] [--threads N] [--workers 1]
        [--train] [--gpu-path both|staged|zero-copy] [--hot-sizes 0.01,0.05,0.1] [--hit-batches 200]
        [--sparse-table-gib G]
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
    """Seconds the model spends inside its table lookups (MultiHeadEmbedding.forward),
    CPU only (on CUDA the lookups are asynchronous; syncing around them would
    serialise what the prefetcher overlaps)."""

    def __init__(self, model, device):
        self.total, self._start = 0.0, None
        if device.type != "cpu":
            return
        for layer in model.engrams.values():
            layer.multi_head_embedding.register_forward_pre_hook(self._pre)
            layer.multi_head_embedding.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        self.total += time.perf_counter() - self._start


def run_pass(model, data, prefetcher, train, optimizer, device, timer=None):
    """One pass over the batches; returns seconds. Adds the time of the
    prefetch() calls (on the critical path: they hash and queue) to timer."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def prefetch(ids):
        begin = time.perf_counter()
        prefetcher.prefetch(ids)
        if timer is not None:
            timer.total += time.perf_counter() - begin

    sync()
    start = time.perf_counter()
    if prefetcher:
        prefetch(data[0])
    for i, ids in enumerate(data):
        if prefetcher and i + 1 < len(data):
            prefetch(data[i + 1])  # gathered while batch i computes
        with torch.set_grad_enabled(train):
            out = model(ids)
            if train:
                out.float().square().mean().backward()
                model.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def real_token_stream(tokens_needed: int, vocab: int, max_mb: float):
    """Token ids of the Python standard library's source, BPE-tokenized (see collisions.py)."""
    from collisions import stdlib_text, train_tokenizer

    text = stdlib_text(max_mb)
    tok = train_tokenizer(text, vocab)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.int64)
    return ids[:tokens_needed], len(text)


def hot_row_hit_rates(model, device, args):
    """[(share of rows cached, lookup hit rate)] of the Prefetcher's hot-row
    cache on a real token stream, through the model's own Engram lookups."""
    from engram.prefetch import PrefetchStats

    per_batch = args.batch * args.seq
    stream, chars = real_token_stream(per_batch * args.hit_batches, min(32000, VOCAB), args.corpus_mb)
    batches = [stream[i * per_batch:(i + 1) * per_batch].view(args.batch, args.seq).to(device)
               for i in range(stream.numel() // per_batch)]
    rates = []
    for share in args.hot_sizes:
        with engram.Prefetcher(model, hot_rows=share, hot_refresh=args.hot_refresh) as prefetcher:
            for i, ids in enumerate(batches):
                if i == args.hot_refresh:  # count from the first batch the cache serves
                    prefetcher.stats = PrefetchStats()
                prefetcher.prefetch(ids)
                with torch.no_grad():
                    for layer in model.engrams.values():
                        layer.multi_head_embedding(layer.hash(ids))
            stats = prefetcher.stats
        rates.append((share, stats.cache_hits / max(1, stats.cache_lookups)))
    return rates, len(batches), chars


def sparse_tables(args, directory):
    """Pre-creates sparse .npy files of about --sparse-table-gib GiB per layer
    (numpy's open_memmap seeks to the end: no data written); the layers then
    reopen them as they are, with no initialisation pass."""
    heads = 16  # 8 heads per order x orders 2 and 3
    row_bytes = (args.engram_dim // 8) * 4
    args.rows_per_head = int(args.sparse_table_gib * 2**30 / (heads * row_bytes))
    cfg = EngramConfig(engram_vocab_size=[args.rows_per_head] * 2, max_ngram_size=3,
                       n_embed_per_ngram=args.engram_dim, n_head_per_ngram=8, layer_ids=list(ENGRAM_BLOCKS))
    hasher = engram.NgramHasher(cfg, CompressionTable.identity(VOCAB))
    for l in ENGRAM_BLOCKS:
        rows = sum(hasher.head_sizes(l))
        np.lib.format.open_memmap(os.path.join(directory, f"engram{l}.npy"), mode="w+", dtype=np.float32,
                                  shape=(rows, args.engram_dim // 8)).flush()


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
    parser.add_argument("--gpu-path", default="both", choices=["both", "staged", "zero-copy"],
                        help="CUDA: how host rows reach the GPU in (b) (zero-copy needs --placement host)")
    parser.add_argument("--hot-sizes", default="0.01,0.05,0.1",
                        help="hot-row cache sizes as shares of each table's rows ('' skips the hit rates)")
    parser.add_argument("--hot-refresh", type=int, default=16, help="batches per LFU window / cache refresh")
    parser.add_argument("--hit-batches", type=int, default=200, help="real-text batches for the hit rates")
    parser.add_argument("--corpus-mb", type=float, default=2.0, help="MB of stdlib source to tokenize")
    parser.add_argument("--sparse-table-gib", type=float, default=None,
                        help="mmap tables of this many GiB each in sparse files, forward only, no (a)")
    args = parser.parse_args()
    if args.layers <= max(ENGRAM_BLOCKS):  # else no Engram layer runs and the ratios divide by zero
        parser.error(f"--layers {args.layers}: the Engram layers sit before blocks {list(ENGRAM_BLOCKS)}, "
                     f"so at least {max(ENGRAM_BLOCKS) + 1} blocks are needed")
    device = torch.device(args.device)
    args.hidden = args.hidden or (1024 if device.type == "cuda" else 256)
    args.heads = args.heads or max(1, args.hidden // 64)
    args.hot_sizes = [float(x) for x in args.hot_sizes.split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sparse_table_gib:
        # Forward only (no writes into the zeros), no hit rates (shares of billions of rows).
        args.placement, args.train, args.hot_sizes = "mmap", False, []
    paths = ["staged"]
    if device.type == "cuda":
        paths = {"both": ["staged", "zero-copy"], "staged": ["staged"], "zero-copy": ["zero-copy"]}[args.gpu_path]
        if args.placement != "host":
            paths = ["staged"]  # zero-copy reads pinned memory only

    directory = args.table_dir or tempfile.mkdtemp(prefix="engram_offload_")
    try:
        begin = time.perf_counter()
        if args.sparse_table_gib:
            sparse_tables(args, directory)
        models = {"prefetch": ToyLM(args, args.placement, directory).to(device)}
        if not args.sparse_table_gib:
            models["device"] = ToyLM(args, "device").to(device)
        models["direct"] = models["prefetch"]  # the same host table, without the prefetcher
        setup_s = time.perf_counter() - begin
        table = models["prefetch"].engrams["2"].multi_head_embedding.embedding.weight
        rng = np.random.default_rng(0)
        data = [torch.from_numpy((rng.zipf(1.1, size=(args.batch, args.seq)) - 1) % VOCAB).to(device)
                for _ in range(args.steps)]

        optimizers = {}
        if args.train:
            optimizers = {k: engram.optim.make_rowwise(m, "sgd", lr=1e-3) for k, m in models.items()
                          if k != "direct"}
        timers = {name: LookupTimer(models[name], device) for name in models if name != "direct"}
        prefetchers = {path: engram.Prefetcher(models["prefetch"], num_threads=args.workers, transfer=path)
                       if i == 0 else None for i, path in enumerate(paths)}
        runs = ([] if args.sparse_table_gib else ["device"]) + [f"prefetch:{p}" for p in paths] + ["direct"]
        times = {name: [] for name in runs}
        lookup = {name: [] for name in runs}
        for round_ in range(args.rounds + 1):  # round 0 warms up (page cache, allocator)
            for name in runs:
                kind, _, path = name.partition(":")
                prefetcher = None
                if kind == "prefetch":
                    # One Prefetcher at a time per model: swap for this path.
                    for other in list(prefetchers):
                        if other != path and prefetchers[other] is not None:
                            prefetchers[other].close()
                            prefetchers[other] = None
                    if prefetchers[path] is None:
                        prefetchers[path] = engram.Prefetcher(models["prefetch"], num_threads=args.workers,
                                                              transfer=path)
                    prefetcher = prefetchers[path]
                timer = timers["device" if kind == "device" else "prefetch"]
                timer.total = 0.0
                for p in prefetchers.values():
                    if p is not None:
                        p.enabled = kind == "prefetch"
                seconds = run_pass(models[kind], data, prefetcher, args.train, optimizers.get(kind), device,
                                   timer)
                if round_:
                    times[name].append(seconds)
                    lookup[name].append(timer.total)
        for p in prefetchers.values():
            if p is not None:
                p.close()
        timed_s = time.perf_counter() - begin - setup_s

        tokens = args.batch * args.seq * args.steps
        tps = {name: tokens / statistics.median(t) for name, t in times.items()}
        base = tps.get("device")
        rows_head = table.shape[1]
        layer = models["prefetch"].engrams["2"]
        k = layer.hash_sizes.shape[1]
        bytes_row = rows_head * table.element_size()
        unique = []
        for ids in data:
            for l in models["prefetch"].engrams.values():
                rows = l.hash(ids) + l.multi_head_embedding.offsets
                unique.append(torch.unique(rows).numel() / rows.numel())
        ratio = statistics.mean(unique)
        per_token = len(ENGRAM_BLOCKS) * k * bytes_row

        print(f"device {device}, torch threads {torch.get_num_threads()}, prefetch workers {args.workers}, "
              f"{'forward+backward+row-wise SGD' if args.train else 'forward (no grad)'}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"model: {args.layers} blocks, D={args.hidden}, Engram before blocks {list(ENGRAM_BLOCKS)}, "
              f"table {table.shape[0]:,} x {rows_head} {str(table.dtype).replace('torch.', '')} "
              f"({table.numel() * table.element_size() / 2**30:.3f} GiB per layer"
              f"{', sparse file' if args.sparse_table_gib else ''}), placement {args.placement!r}")
        print(f"batches: {args.steps} x [{args.batch}, {args.seq}] Zipf(1.1) tokens; {args.rounds} rounds; "
              f"setup {setup_s:.1f} s, timed passes {timed_s:.1f} s")
        print(f"{'':22} {'tokens/s':>10} {'vs (a)':>8} {'lookup ms/pass':>15}")
        for name in runs:
            kind, _, path = name.partition(":")
            label = {"device": "(a) device", "prefetch": f"(b) prefetch {path if device.type == 'cuda' else ''}",
                     "direct": "(c) direct"}[kind]
            rel = f"{tps[name] / base:8.3f}" if base else f"{'-':>8}"
            ms = f"{1e3 * statistics.median(lookup[name]):15.2f}" if device.type == "cpu" else f"{'-':>15}"
            print(f"{label:22} {tps[name]:10.0f} {rel} {ms}")
        print(f"bytes of rows per token: {per_token} ({len(ENGRAM_BLOCKS)} layers x {k} heads x {bytes_row} B); "
              f"after per-batch dedup: {per_token * ratio:.0f}")
        print(f"unique-row ratio (distinct rows / lookups, per batch and layer): {ratio:.3f}")
        if device.type == "cpu":
            gather_c, gather_b = statistics.median(lookup["direct"]), statistics.median(lookup["prefetch:staged"])
            print(f"gather time hidden by the prefetch: {100 * (1 - gather_b / gather_c):.1f}% "
                  f"(critical path {1e3 * gather_b:.2f} ms with (lookups + prefetch calls) vs "
                  f"{1e3 * gather_c:.2f} ms without (lookups), per pass)")
        if args.hot_sizes:
            begin = time.perf_counter()
            rates, count, chars = hot_row_hit_rates(models["prefetch"], device, args)
            print(f"hot-row cache hit rate (lookups served by the cache; {count} batches of real text: "
                  f"{chars / 1e6:.1f} MB of stdlib source, byte-level BPE, LFU window {args.hot_refresh} "
                  f"batches; {time.perf_counter() - begin:.1f} s):")
            for share, rate in rates:
                print(f"  cache {100 * share:5.1f}% of rows ({int(share * table.shape[0]):,} per table): "
                      f"{100 * rate:.1f}%")
    finally:
        if args.table_dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
