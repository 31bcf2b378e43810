"""CompressionTable: tokenizer id -> canonical id (spec §1)."""

from __future__ import annotations

from typing import Dict

import torch


class CompressionTable:
    """The canonical-id map of one tokenizer vocabulary.

    ``lookup[t]`` is the canonical id of token ``t``. Build one from a Hugging
    Face tokenizer with :func:`engram.tokenizer.build_compression`, or use
    :meth:`identity` for a model without a tokenizer map.

    Not an ``nn.Module`` on purpose: an ``EngramLayer`` holds one without adding
    it to its state_dict, so reference checkpoints load with ``strict=True``.
    """

    def __init__(self, lookup) -> None:
        # device=: a list stays on the CPU under a `with torch.device(...)` block
        lookup = lookup if isinstance(lookup, torch.Tensor) else torch.as_tensor(lookup, device="cpu")
        if lookup.dtype != torch.int64:
            raise ValueError(f"CompressionTable: lookup must be int64, got {lookup.dtype}")
        if lookup.dim() != 1 or lookup.numel() == 0:
            raise ValueError(
                f"CompressionTable: lookup must be a non-empty 1-D tensor, got shape {list(lookup.shape)}"
            )
        lookup = lookup.detach().to("cpu").contiguous()
        low, high = int(lookup.min()), int(lookup.max())
        if low < 0:
            raise ValueError(f"CompressionTable: lookup holds negative canonical id {low}; expected ids >= 0")
        # V' = max + 1: equal to the number of distinct keys for a table built by
        # spec §1 (ids by first appearance), and safe for the multiplier bound.
        num_canonical = high + 1
        self._lookup = lookup
        self._num_canonical = num_canonical

    @classmethod
    def identity(cls, vocab_size: int) -> "CompressionTable":
        """Every token is its own canonical id."""
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"CompressionTable.identity: vocab_size={vocab_size!r}, expected a positive int")
        return cls(torch.arange(vocab_size, dtype=torch.int64, device="cpu"))

    @property
    def lookup(self) -> torch.Tensor:
        return self._lookup

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer vocabulary the table maps from."""
        return self._lookup.numel()

    @property
    def num_canonical(self) -> int:
        """V': the number of distinct canonical ids."""
        return self._num_canonical

    def apply(self, ids: torch.Tensor) -> torch.Tensor:
        """Map token ids to canonical ids (negative ids pass through, as in the reference)."""
        from . import ops

        return ops.compress_ids(ids, self._lookup.to(ids.device))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"lookup": self._lookup.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        other = CompressionTable(state["lookup"])
        self._lookup, self._num_canonical = other._lookup, other._num_canonical

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor]) -> "CompressionTable":
        return cls(state["lookup"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CompressionTable) and torch.equal(self._lookup, other._lookup)

    def __repr__(self) -> str:
        saved = 1.0 - self.num_canonical / self.vocab_size
        return (
            f"CompressionTable(vocab_size={self.vocab_size}, num_canonical={self.num_canonical}, "
            f"reduction={saved:.1%})"
        )
