"""Plain statements of every engram op: the test oracle.

Hashing (spec §1-3) is written in numpy, the way the reference release
computes it on every forward; the differentiable parts are plain PyTorch.
Nothing here is fast on purpose: each line mirrors a sentence of the spec.
"""

from __future__ import annotations

import math
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


def ngram_hash_torch(
    input_ids: torch.Tensor,
    lookup: torch.Tensor,
    multipliers: Dict[int, torch.Tensor],
    head_primes: Dict[int, List[int]],
    max_ngram_size: int,
    n_head_per_ngram: int,
    pad_id: int,
) -> Dict[int, torch.Tensor]:
    """The same statement in plain PyTorch ops (runs on any device): the peer
    of the fused kernel on GPU. torch's int64 multiply wraps like numpy's and
    torch.remainder is a floor modulo."""
    x = torch.where(input_ids >= 0, lookup[input_ids.clamp_min(0)], input_ids)
    pad = int(lookup[pad_id])
    shifted = [x] + [torch.nn.functional.pad(x[:, :-k], (k, 0), value=pad) if k < x.shape[1]
                     else torch.full_like(x, pad) for k in range(1, max_ngram_size)]
    out = {}
    for layer_id, mult in multipliers.items():
        m = [int(v) for v in mult]
        heads = []
        for n in range(2, max_ngram_size + 1):
            mix = shifted[0] * m[0]
            for k in range(1, n):
                mix = torch.bitwise_xor(mix, shifted[k] * m[k])
            primes = head_primes[layer_id][(n - 2) * n_head_per_ngram: (n - 1) * n_head_per_ngram]
            heads.append(torch.remainder(mix.unsqueeze(-1), torch.tensor(primes, device=mix.device)))
        out[layer_id] = torch.cat(heads, dim=-1)
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


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows], delivered on the rows' device (engram::gather_rows)."""
    return table[rows.to(table.device)].to(rows.device)


# --------------------------------------------------------------------------
# §3-6 the whole layer in plain PyTorch modules: the test oracle of
# engram.EngramLayer and the peer of its benchmark. Parameter names and
# shapes are spec §7's, so state_dicts move between the two with strict=True.
# --------------------------------------------------------------------------

def context_gate(key, hidden, key_norm_weight, hidden_norm_weight, eps=None):
    """§5 for G branches: key, hidden [B, T, G, D] -> gate [B, T, G]."""
    d = key.shape[-1]
    nk = torch.nn.functional.rms_norm(key, (d,), None, eps) * key_norm_weight
    nq = torch.nn.functional.rms_norm(hidden, (d,), None, eps) * hidden_norm_weight
    s = (nk * nq).sum(-1) / math.sqrt(d)
    s = s.sign() * s.abs().clamp_min(1e-6).sqrt()
    return torch.sigmoid(s)


def gated_short_conv(value, gate, norm_weight, conv_weight, dilation, eps=1e-5):
    """§5-6: x = gate * value per branch ([B, T, G, D]); x + SiLU(causal
    depthwise conv over T of RMSNorm_g(x)), channel g*D + c."""
    b, t, d = value.shape
    g = gate.shape[-1]
    kernel_size = conv_weight.shape[-1]
    x = gate.unsqueeze(-1) * value.unsqueeze(2)
    u = torch.nn.functional.rms_norm(x, (d,), None, eps) * norm_weight  # [B, T, G, D]
    u = torch.nn.functional.pad(u.reshape(b, t, g * d).transpose(1, 2), ((kernel_size - 1) * dilation, 0))
    y = torch.nn.functional.conv1d(u, conv_weight.reshape(g * d, 1, kernel_size), groups=g * d, dilation=dilation)
    return x + torch.nn.functional.silu(y.transpose(1, 2)).reshape(b, t, g, d)


HASHING_CHOICES = ("numpy", "op")


class ReferenceMultiHeadEmbedding(torch.nn.Module):
    """§4: one nn.Embedding (dense gradient) of sum(sizes) rows; head k's rows start at offsets[k]."""

    def __init__(self, head_sizes: Sequence[int], head_dim: int) -> None:
        super().__init__()
        self.register_buffer("offsets", head_offsets(head_sizes))
        self.embedding = torch.nn.Embedding(sum(head_sizes), head_dim)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(hash_ids + self.offsets)


class ReferenceShortConv(torch.nn.Module):
    """§6: per-branch RMSNorm (eps 1e-5), depthwise causal dilated nn.Conv1d, SiLU."""

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        self.kernel_size, self.dilation = kernel_size, dilation
        self.conv = torch.nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        self.norms = torch.nn.ModuleList([torch.nn.RMSNorm(hidden_size, eps=1e-5) for _ in range(hc_mult)])

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        b, t, g, d = value.shape
        u = torch.cat([self.norms[i](value[:, :, i, :]) for i in range(g)], dim=-1)  # channel i*D + c
        u = torch.nn.functional.pad(u.transpose(1, 2), ((self.kernel_size - 1) * self.dilation, 0))  # zero history
        y = self.conv(u).transpose(1, 2)
        return torch.nn.functional.silu(y).reshape(b, t, g, d)


class EngramLayerReference(torch.nn.Module):
    """Spec §3-6 as written: hash, look up, gate per branch, short conv, residual.

    hashing="numpy" hashes with the numpy statement above on every call, as
    the reference release does; hashing="op" uses the fused engram.ops.ngram_hash
    (same ids) so that only the torch part is compared. Submodules are built in
    the order of engram.EngramLayer, so one seed gives both the same weights.
    """

    def __init__(
        self,
        config,
        layer_id: int,
        hidden_size: int,
        hc_mult: int = 1,
        compression=None,
        hashing: str = "numpy",
    ) -> None:
        super().__init__()
        from .compression import CompressionTable

        if hashing not in HASHING_CHOICES:
            raise ValueError(f"EngramLayerReference: hashing={hashing!r}, expected one of {HASHING_CHOICES}")
        if compression is None:
            from .layer import DEFAULT_VOCAB_SIZE

            compression = CompressionTable.identity(DEFAULT_VOCAB_SIZE)
        self.config, self.layer_id, self.hashing = config, layer_id, hashing
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        n, h = config.max_ngram_size, config.n_head_per_ngram
        self.lookup = compression.lookup.numpy()
        self.head_primes = layer_head_primes(config.engram_vocab_size, n, h, config.layer_ids)[layer_id]
        self.multipliers = layer_multipliers(compression.num_canonical, n, config.seed, [layer_id])[layer_id]

        engram_dim = (n - 1) * config.n_embed_per_ngram
        self.multi_head_embedding = ReferenceMultiHeadEmbedding(self.head_primes, config.head_dim)
        self.short_conv = ReferenceShortConv(hidden_size, hc_mult, config.kernel_size, dilation=n)
        self.value_proj = torch.nn.Linear(engram_dim, hidden_size)
        self.key_projs = torch.nn.ModuleList([torch.nn.Linear(engram_dim, hidden_size) for _ in range(hc_mult)])
        self.norm1 = torch.nn.ModuleList([torch.nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.norm2 = torch.nn.ModuleList([torch.nn.RMSNorm(hidden_size) for _ in range(hc_mult)])

    def hash(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, K] hash ids (spec §3), without offsets."""
        cfg = self.config
        if self.hashing == "op":
            from . import ops

            keys = torch.from_numpy(self.multipliers) if cfg.hash == "deepseek" else self._xxh64_keys()
            return ops.ngram_hash(
                input_ids, torch.from_numpy(self.lookup).to(input_ids.device), keys[None].to(input_ids.device),
                torch.tensor([self.head_primes], device=input_ids.device), None, cfg.pad_id, cfg.hash,
            )[0]
        ids = input_ids.cpu().numpy()
        primes = {self.layer_id: self.head_primes}
        if cfg.hash == "deepseek":
            hashed = ngram_hash(ids, self.lookup, {self.layer_id: self.multipliers}, primes, cfg.max_ngram_size,
                                cfg.n_head_per_ngram, cfg.pad_id)
        else:
            hashed = ngram_hash_xxh64(ids, self.lookup, cfg.seed, [self.layer_id], primes, cfg.max_ngram_size,
                                      cfg.n_head_per_ngram, cfg.pad_id)
        return torch.from_numpy(hashed[self.layer_id]).to(input_ids.device)

    def _xxh64_keys(self) -> torch.Tensor:
        seeds = [xxh64_seed(self.config.seed, self.layer_id, n) for n in range(2, self.config.max_ngram_size + 1)]
        return torch.tensor(np.array(seeds, dtype=np.uint64).view(np.int64))

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        squeeze = hidden_states.dim() == 3
        if squeeze:
            hidden_states = hidden_states.unsqueeze(2)
        b, t = input_ids.shape
        d = self.hidden_size
        # §4: [B, T, K, Dh] -> [B, T, (N-1)*E]
        e = self.multi_head_embedding(self.hash(input_ids)).reshape(b, t, -1).to(hidden_states.dtype)
        # §5
        gates = []
        for g in range(self.hc_mult):
            nk = self.norm1[g](self.key_projs[g](e))
            nq = self.norm2[g](hidden_states[:, :, g, :])
            s = (nk * nq).sum(-1) / math.sqrt(d)
            s = s.sign() * s.abs().clamp_min(1e-6).sqrt()
            gates.append(torch.sigmoid(s))
        value = torch.stack(gates, dim=2).unsqueeze(-1) * self.value_proj(e).unsqueeze(2)  # [B, T, G, D]
        # §6
        out = value + self.short_conv(value)
        return out.squeeze(2) if squeeze else out


# --------------------------------------------------------------------------
# Row-wise table optimizers (engram.optim), in float64
# --------------------------------------------------------------------------
#
# Each function returns new float64 tensors; only the rows `rows` change.
# The rules are written in their textbook form, not in the kernels' order of
# operations, so the two agree to rounding only.


def dedup_row_grads(grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor | None, num_rows: int):
    """(touched rows, sorted ascending; the float64 sum of each row's gradients)."""
    flat = (ids if offsets is None else ids + offsets).reshape(-1)
    dh = grad.shape[-1]
    sums = torch.zeros(num_rows, dh, dtype=torch.float64).index_add_(0, flat, grad.reshape(-1, dh).double())
    rows = torch.unique(flat)
    return rows, sums[rows]


def dedup_row_grads_padded(grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor | None, num_rows: int):
    """dedup_row_grads padded to ids.numel() rows: rows of -1, zero sums."""
    rows, sums = dedup_row_grads(grad, ids, offsets, num_rows)
    entries, u = ids.numel(), rows.numel()
    padded_rows = torch.full((entries,), -1, dtype=torch.int64)
    padded_sums = torch.zeros(entries, grad.shape[-1], dtype=torch.float64)
    padded_rows[:u], padded_sums[:u] = rows, sums
    return padded_rows, padded_sums


def rowwise_sgd(weight, rows, row_grads, lr: float, weight_decay: float = 0.0) -> torch.Tensor:
    w = weight.double().clone()
    g = row_grads.double() + weight_decay * w[rows]
    w[rows] = w[rows] - lr * g
    return w


def rowwise_adagrad(weight, sum_sq, rows, row_grads, lr: float, eps: float, weight_decay: float = 0.0):
    """FBGEMM's row-wise Adagrad: one accumulator per row, fed the mean of g^2."""
    w, acc = weight.double().clone(), sum_sq.double().clone()
    g = row_grads.double() + weight_decay * w[rows]
    acc[rows] = acc[rows] + (g * g).mean(dim=1)
    w[rows] = w[rows] - lr * g / (acc[rows].sqrt() + eps)[:, None]
    return w, acc


def rowwise_adam(weight, exp_avg, exp_avg_sq, rows, row_grads, lr: float, betas, eps: float, weight_decay: float,
                 decoupled: bool, step: int):
    """Adam on the touched rows only (torch.optim.SparseAdam's semantics, plus
    weight decay): moments m, v of the rows; bias corrections from the global
    step; eps added to sqrt(v) before the bias correction of the denominator.
    Adam's L2 weight decay adds wd * w to g; AdamW scales w by 1 - lr * wd."""
    beta1, beta2 = betas
    w, m, v = weight.double().clone(), exp_avg.double().clone(), exp_avg_sq.double().clone()
    g = row_grads.double()
    if decoupled:
        w[rows] = w[rows] * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w[rows]
    m[rows] = beta1 * m[rows] + (1 - beta1) * g
    v[rows] = beta2 * v[rows] + (1 - beta2) * g * g
    bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
    w[rows] = w[rows] - lr * math.sqrt(bias_correction2) / bias_correction1 * m[rows] / (v[rows].sqrt() + eps)
    return w, m, v
