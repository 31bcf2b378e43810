"""EngramConfig: the hyper-parameters of the reference release (spec §2-6)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List

HASH_FAMILIES = ("deepseek", "xxh64")


def _bad(field_name: str, value, expected: str) -> ValueError:
    return ValueError(f"EngramConfig.{field_name}={value!r}: expected {expected}")


@dataclass
class EngramConfig:
    """Engram settings; the defaults are the reference release's.

    ``engram_vocab_size[n-2]`` is the minimum per-head table size for order n;
    each head takes the next distinct prime above it (spec §2).
    """

    engram_vocab_size: List[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: List[int] = field(default_factory=lambda: [1, 15])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    hash: str = "deepseek"

    def __post_init__(self) -> None:
        self.engram_vocab_size = list(self.engram_vocab_size)
        self.layer_ids = list(self.layer_ids)
        self.validate()

    # Each check names the field, the value seen and what was expected.
    def validate(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_ngram_size) or self.max_ngram_size < 2:
            raise _bad("max_ngram_size", self.max_ngram_size, "an int >= 2 (2-grams are the smallest order)")
        for name in ("n_embed_per_ngram", "n_head_per_ngram", "kernel_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise _bad(name, v, "a positive int")
        if self.n_embed_per_ngram % self.n_head_per_ngram != 0:
            raise _bad(
                "n_embed_per_ngram",
                self.n_embed_per_ngram,
                f"a multiple of n_head_per_ngram={self.n_head_per_ngram}",
            )
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise _bad(
                "engram_vocab_size",
                self.engram_vocab_size,
                f"one size per n-gram order 2..{self.max_ngram_size}, i.e. {self.max_ngram_size - 1} values",
            )
        for size in self.engram_vocab_size:
            if not is_int(size) or size < 2:
                raise _bad("engram_vocab_size", self.engram_vocab_size, "ints >= 2")
        if not self.layer_ids:
            raise _bad("layer_ids", self.layer_ids, "at least one layer id")
        if any(not is_int(i) or i < 0 for i in self.layer_ids):
            raise _bad("layer_ids", self.layer_ids, "non-negative ints")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise _bad("layer_ids", self.layer_ids, "distinct layer ids")
        if not is_int(self.pad_id) or self.pad_id < 0:
            raise _bad("pad_id", self.pad_id, "a non-negative token id")
        if not is_int(self.seed) or self.seed < 0:
            raise _bad("seed", self.seed, "a non-negative int")
        if self.hash not in HASH_FAMILIES:
            raise _bad("hash", self.hash, f"one of {HASH_FAMILIES}")

    @property
    def head_dim(self) -> int:
        """Width of one head's rows, Dh = E / H."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def num_heads_total(self) -> int:
        """K = (N-1) * H hashed lookups per token."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def replace(self, **changes) -> "EngramConfig":
        return dataclasses.replace(self, **changes)
