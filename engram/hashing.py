"""NgramHasher: hash parameters of spec §2 and the fused hash of spec §3."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from . import _loader, ops
from .compression import CompressionTable
from .config import EngramConfig

_engine = _loader.load("_engine")


class NgramHasher:
    """Derives each layer's multipliers, prime head sizes and offsets, and
    hashes token ids for every configured layer in one fused C++ pass."""

    def __init__(self, config: EngramConfig, compression: CompressionTable) -> None:
        if not isinstance(config, EngramConfig):
            raise TypeError(f"NgramHasher: config must be an EngramConfig, got {type(config).__name__}")
        if not isinstance(compression, CompressionTable):
            raise TypeError(
                f"NgramHasher: compression must be a CompressionTable, got {type(compression).__name__} "
                "(use CompressionTable.identity(vocab_size) for a model without a tokenizer map)"
            )
        if config.pad_id >= compression.vocab_size:
            raise ValueError(
                f"NgramHasher: config.pad_id={config.pad_id} is outside the tokenizer vocabulary of "
                f"{compression.vocab_size} ids"
            )
        self.config = config
        self.compression = compression
        self.layer_ids: List[int] = list(config.layer_ids)
        self.pad = int(compression.lookup[config.pad_id])

        n = config.max_ngram_size
        v = compression.num_canonical
        # Spec §2: odd multipliers below M_max = (2^63-1) // V', drawn per layer.
        half = max(1, ((2**63 - 1) // v) // 2)
        self._multipliers = {}
        for layer_id in self.layer_ids:
            rng = np.random.default_rng(config.seed + 10007 * layer_id)
            r = rng.integers(low=0, high=half, size=(n,), dtype=np.int64)
            self._multipliers[layer_id] = torch.from_numpy(r * 2 + 1)

        primes = _engine.head_primes(config.engram_vocab_size, config.n_head_per_ngram, len(self.layer_ids))
        self._head_sizes = {l: torch.tensor(p, dtype=torch.int64, device="cpu") for l, p in zip(self.layer_ids, primes)}
        self._offsets = {l: torch.cumsum(s, 0) - s for l, s in self._head_sizes.items()}

        self._xxh64_seeds = {
            l: torch.tensor(
                [_engine.xxh64_ngram_seed(config.seed, l, order) for order in range(2, n + 1)], dtype=torch.uint64, device="cpu"
            ).view(torch.int64)
            for l in self.layer_ids
        }
        self._device_params: Dict[torch.device, tuple] = {}

    # ---- parameters -----------------------------------------------------
    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self._head_sizes:
            raise KeyError(f"NgramHasher: layer_id={layer_id!r} is not an Engram layer; configured: {self.layer_ids}")

    def multipliers(self, layer_id: int) -> torch.Tensor:
        """The N odd int64 multipliers of one layer."""
        self._check_layer(layer_id)
        return self._multipliers[layer_id].clone()

    def head_sizes(self, layer_id: int) -> List[int]:
        """K = (N-1)*H distinct primes, order-major then head."""
        self._check_layer(layer_id)
        return self._head_sizes[layer_id].tolist()

    def offsets(self, layer_id: int) -> torch.Tensor:
        """Exclusive prefix sum of the head sizes: each head's first row."""
        self._check_layer(layer_id)
        return self._offsets[layer_id].clone()

    def table_rows(self, layer_id: int) -> int:
        """Rows of the layer's embedding table: the sum of its head sizes."""
        self._check_layer(layer_id)
        return int(self._head_sizes[layer_id].sum())

    def xxh64_seeds(self, layer_id: int) -> torch.Tensor:
        """Per-order seeds of the xxh64 family (orders 2..N), as int64 bit patterns."""
        self._check_layer(layer_id)
        return self._xxh64_seeds[layer_id].clone()

    # ---- hashing --------------------------------------------------------
    def _params(self, device: torch.device, layer_ids: List[int]):
        key = (device, tuple(layer_ids))
        if key not in self._device_params:
            if self.config.hash == "deepseek":
                keys = torch.stack([self._multipliers[l] for l in layer_ids])
            else:
                keys = torch.stack([self._xxh64_seeds[l] for l in layer_ids])
            sizes = torch.stack([self._head_sizes[l] for l in layer_ids])
            offsets = torch.stack([self._offsets[l] for l in layer_ids])
            self._device_params[key] = tuple(
                t.to(device) for t in (self.compression.lookup, keys, sizes, offsets)
            )
        return self._device_params[key]

    def hash_stacked(self, input_ids: torch.Tensor, layer_ids=None, with_offsets: bool = False) -> torch.Tensor:
        """[B, T] token ids -> [L, B, T, K] hash ids for `layer_ids` (default: all)."""
        layer_ids = self.layer_ids if layer_ids is None else list(layer_ids)
        for l in layer_ids:
            self._check_layer(l)
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"NgramHasher.hash: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        lookup, keys, sizes, offsets = self._params(input_ids.device, layer_ids)
        return ops.ngram_hash(
            input_ids, lookup, keys, sizes, offsets if with_offsets else None, self.config.pad_id, self.config.hash
        )

    def hash(self, input_ids: torch.Tensor, with_offsets: bool = False) -> Dict[int, torch.Tensor]:
        """{layer_id: int64 [B, T, K]} hash ids (spec §3); table rows if with_offsets."""
        stacked = self.hash_stacked(input_ids, with_offsets=with_offsets)
        return {l: stacked[i] for i, l in enumerate(self.layer_ids)}

    def __repr__(self) -> str:
        rows = ", ".join(f"{l}: {self.table_rows(l):,}" for l in self.layer_ids)
        return (
            f"NgramHasher(hash={self.config.hash!r}, N={self.config.max_ngram_size}, "
            f"H={self.config.n_head_per_ngram}, V'={self.compression.num_canonical}, rows={{{rows}}})"
        )
