"""Quickstart: hash a sentence with the reference configuration and show what
each Engram layer looks up.

    python examples/quickstart.py

No tokenizer download: a word-level toy vocabulary is built from the sentence,
with a compression table that folds case the way spec §1 folds a real
tokenizer's "The"/"the"/" the".
"""

import torch

import engram


def main() -> None:
    sentence = "The Great Wall of China is long . the great wall of china is old ."
    words = sentence.split()
    vocab = ["<unk>", "<s>", "<pad>"] + sorted(set(words))
    token_id = {w: i for i, w in enumerate(vocab)}

    # Canonical ids by first appearance of the lower-cased key (spec §1).
    canonical = {}
    lookup = [canonical.setdefault(w.lower(), len(canonical)) for w in vocab]
    compression = engram.CompressionTable(torch.tensor(lookup))

    config = engram.EngramConfig()  # reference defaults: N=3, 8 heads, layers [1, 15]
    hasher = engram.NgramHasher(config, compression)
    input_ids = torch.tensor([[token_id[w] for w in words]])
    print(config)
    print(hasher)
    print(compression)

    rows = hasher.hash(input_ids, with_offsets=True)  # {layer: [B, T, K]} absolute table rows
    H = config.n_head_per_ngram
    for layer_id in config.layer_ids:
        n_rows = hasher.table_rows(layer_id)
        table_bytes = n_rows * config.head_dim * 2  # bf16
        print(f"\nlayer {layer_id}: {n_rows:,} rows x {config.head_dim} = {table_bytes / 2**30:.2f} GiB in bf16")
        print(f"  {'token':<8} {'2-gram':<18} rows (heads 0,1)      {'3-gram':<24} rows (heads 0,1)")
        for t, word in enumerate(words):
            padded = ["<pad>"] * 2 + words  # positions before t = 0 hash as the pad id
            bigram = " ".join(padded[t + 1: t + 3])
            trigram = " ".join(padded[t: t + 3])
            r = rows[layer_id][0, t].tolist()
            print(f"  {word:<8} {bigram:<18} {r[0]:>9,} {r[1]:>10,}   {trigram:<24} {r[H]:>10,} {r[H + 1]:>10,}")
    same = torch.equal(rows[1][0, 3], rows[1][0, 11])  # both 2- and 3-gram heads
    print(f"\n'Great Wall of' and 'great wall of' look up the same rows: {same} (case folded by the compression table)")


if __name__ == "__main__":
    main()
