"""Plain statements of every engram op: the test oracle.

Hashing (spec §1-3) is written in numpy, the way the reference release
computes it on every forward; the differentiable parts are plain PyTorch.
Nothing here is fast on purpose: each line mirrors a sentence of the spec.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

# --------------------------------------------------------------------------
# §1 canonical ids
# --------------------------------------------------------------------------


def compress_ids(ids: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """ids >= 0 map through lookup; negative ids pass through unchanged."""
    ids = np.asarray(ids, dtype=np.int64)
    out = ids.copy()
    valid = ids >= 0
    out[valid] = lookup[ids[valid]]
    return out


# --------------------------------------------------------------------------
# §2 hash parameters
# --------------------------------------------------------------------------


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def layer_multipliers(num_canonical: int, max_ngram_size: int, seed: int, layer_ids: Sequence[int]) -> Dict[int, np.ndarray]:
    m_max = (2**63 - 1) // num_canonical
    half = max(1, m_max // 2)
    out = {}
    for layer_id in layer_ids:
        rng = np.random.default_rng(seed + 10007 * layer_id)
        r = rng.integers(low=0, high=half, size=(max_ngram_size,), dtype=np.int64)
        out[layer_id] = r * 2 + 1
    return out


def layer_head_primes(engram_vocab_size: Sequence[int], max_ngram_size: int, n_head_per_ngram: int, layer_ids: Sequence[int]) -> Dict[int, List[int]]:
    seen = set()
    out = {}
    for layer_id in layer_ids:
        primes = []
        for n in range(2, max_ngram_size + 1):
            start = engram_vocab_size[n - 2] - 1
            for _ in range(n_head_per_ngram):
                p = start + 1
                while not is_prime(p) or p in seen:
                    p += 1
                seen.add(p)
                primes.append(p)
                start = p
        out[layer_id] = primes
    return out


# --------------------------------------------------------------------------
# §3 multi-head n-gram hashing, as the reference release does it per forward
# --------------------------------------------------------------------------


def shift(x: np.ndarray, k: int, pad: int) -> np.ndarray:
    if k == 0:
        return x
    b, t = x.shape
    out = np.full((b, t), pad, dtype=np.int64)
    if k < t:
        out[:, k:] = x[:, : t - k]
    return out


def ngram_hash(
    input_ids: np.ndarray,
    lookup: np.ndarray,
    multipliers: Dict[int, np.ndarray],
    head_primes: Dict[int, List[int]],
    max_ngram_size: int,
    n_head_per_ngram: int,
    pad_id: int,
) -> Dict[int, np.ndarray]:
    """{layer_id: int64 [B, T, K]} without offsets (spec §3)."""
    x = compress_ids(np.asarray(input_ids), lookup)
    pad = int(lookup[pad_id])
    shifted = [shift(x, k, pad) for k in range(max_ngram_size)]
    out = {}
    for layer_id, mult in multipliers.items():
        heads = []
        primes = head_primes[layer_id]
        for n in range(2, max_ngram_size + 1):
            mix = shifted[0] * mult[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifted[k] * mult[k])
            for j in range(n_head_per_ngram):
                p = primes[(n - 2) * n_head_per_ngram + j]
                heads.append(np.mod(mix, np.int64(p)))
        out[layer_id] = np.stack(heads, axis=-1)
    return out


# --------------------------------------------------------------------------
# xxh64 family (ours, see README): XXH64 over the n little-endian int64
# canonical ids s_0 .. s_{n-1} (newest first), seeded per (seed, layer, order)
# --------------------------------------------------------------------------


def xxh64_seed(seed: int, layer_id: int, order: int) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(np.array([seed, layer_id, order], dtype="<i8").tobytes(), seed=0)


def ngram_hash_xxh64(
    input_ids: np.ndarray,
    lookup: np.ndarray,
    seed: int,
    layer_ids: Sequence[int],
    head_primes: Dict[int, List[int]],
    max_ngram_size: int,
    n_head_per_ngram: int,
    pad_id: int,
) -> Dict[int, np.ndarray]:
    import xxhash

    x = compress_ids(np.asarray(input_ids), lookup)
    pad = int(lookup[pad_id])
    shifted = np.stack([shift(x, k, pad) for k in range(max_ngram_size)], axis=-1).astype("<i8")
    b, t = x.shape
    out = {}
    for layer_id in layer_ids:
        primes = head_primes[layer_id]
        res = np.zeros((b, t, (max_ngram_size - 1) * n_head_per_ngram), dtype=np.int64)
        for n in range(2, max_ngram_size + 1):
            s = xxh64_seed(seed, layer_id, n)
            for bi in range(b):
                for ti in range(t):
                    h = xxhash.xxh64_intdigest(shifted[bi, ti, :n].tobytes(), seed=s)
                    for j in range(n_head_per_ngram):
                        k = (n - 2) * n_head_per_ngram + j
                        res[bi, ti, k] = h % primes[k]
        out[layer_id] = res
    return out


# --------------------------------------------------------------------------
# §4 multi-head embedding
# --------------------------------------------------------------------------


def head_offsets(sizes: Sequence[int]) -> torch.Tensor:
    sizes = torch.as_tensor(list(sizes), dtype=torch.int64)
    return torch.cumsum(sizes, 0) - sizes


def multihead_embedding(weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """[..., K] hash ids -> [..., K, Dh] rows, via nn.functional.embedding."""
    rows = ids if offsets is None else ids + offsets
    return torch.nn.functional.embedding(rows, weight)
