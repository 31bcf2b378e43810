"""Collision rate of both hash families on real text.

Corpus: the Python standard library's own source (no download), tokenized
with a byte-level BPE trained here with `tokenizers`. For each n-gram order
and head, a distinct n-gram "collides" when another distinct n-gram of the
same order lands in the same row. Printed next to the rate a perfectly
uniform hash would give, 1 - (1 - 1/p)^(D - 1), for D distinct n-grams in p
rows; the share of n-grams that collide in *every* head of their order (no
clean lookup at all); and the share that another n-gram matches in all heads
at once (aliased: the model cannot tell the two apart).

    python benchmarks/collisions.py [--max-mb 12] [--vocab 32000] [--rows 646400]
"""

import argparse
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from engram import CompressionTable, EngramConfig, NgramHasher


def stdlib_text(max_mb: float) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    chunks, size = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        size += len(text)
        if size > max_mb * 1e6:
            break
    return "".join(chunks)


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "<pad>"], show_progress=False)
    lines = text.splitlines()
    tok.train_from_iterator((lines[i: i + 1000] for i in range(0, len(lines), 1000)), trainer=trainer)
    return tok


def ngram_keys(ids: np.ndarray, n: int, pad: int) -> np.ndarray:
    """Distinct n-grams (newest token first) as rows of an int64 array."""
    cols = [ids] + [np.concatenate([np.full(k, pad), ids[:-k]]) for k in range(1, n)]
    return np.unique(np.stack(cols, axis=1), axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mb", type=float, default=12.0, help="megabytes of stdlib source to read")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=129280 * 5, help="minimum rows per head (reference: 646400)")
    args = parser.parse_args()

    t0 = time.time()
    text = stdlib_text(args.max_mb)
    tok = train_tokenizer(text, args.vocab)
    ids = np.array(tok.encode(text).ids, dtype=np.int64)
    print(f"corpus: {len(text) / 1e6:.1f} MB of stdlib source, {len(ids):,} tokens, BPE vocab {tok.get_vocab_size()} "
          f"({time.time() - t0:.0f} s to tokenize)")

    table = CompressionTable.identity(tok.get_vocab_size())
    print(f"{'family':<9} {'order':>5} {'distinct':>11} {'rows/head':>10} {'collide/head':>13} {'uniform':>9} "
          f"{'every head':>11} {'aliased':>9}")
    for family in ["deepseek", "xxh64"]:
        cfg = EngramConfig(hash=family, engram_vocab_size=[args.rows, args.rows], layer_ids=[1])
        hasher = NgramHasher(cfg, table)
        H = cfg.n_head_per_ngram
        sizes = hasher.head_sizes(1)
        for n in range(2, cfg.max_ngram_size + 1):
            grams = ngram_keys(ids, n, int(table.lookup[cfg.pad_id]))
            # Hash each distinct n-gram once: its tokens, oldest first, as a sequence whose last position is it.
            seqs = torch.from_numpy(np.ascontiguousarray(grams[:, ::-1]))
            heads = hasher.hash(seqs)[1][:, -1, (n - 2) * H: (n - 1) * H].numpy()  # [D, H]
            d = len(grams)
            rates, collided_all = [], np.ones(d, dtype=bool)
            for j in range(H):
                _, inverse, counts = np.unique(heads[:, j], return_inverse=True, return_counts=True)
                shared = counts[inverse] > 1
                rates.append(shared.mean())
                collided_all &= shared
            _, counts = np.unique(heads, axis=0, return_counts=True)
            aliased = (counts[counts > 1]).sum() / d
            p = sizes[(n - 2) * H]
            uniform = 1 - (1 - 1 / p) ** (d - 1)
            print(f"{family:<9} {n:>5} {d:>11,} {p:>10,} {np.mean(rates):>12.2%} {uniform:>9.2%} {collided_all.mean():>11.4%} {aliased:>9.5%}")


if __name__ == "__main__":
    main()
