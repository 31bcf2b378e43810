"""EngramLayer: the full Engram module (spec §3-7)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .compression import CompressionTable
from .config import EngramConfig
from .hashing import NgramHasher

# Vocabulary of the reference release's tokenizer (DeepSeek-V3); used for the
# identity compression when a layer is built without a CompressionTable.
DEFAULT_VOCAB_SIZE = 129280


class MultiHeadEmbedding(nn.Module):
    """K hashed heads in one table of sum(sizes) rows (spec §4)."""

    # Set on an instance by engram.optim.make_rowwise: fused_lookup(weight,
    # hash_ids, offsets) looks the rows up and updates the table in backward.
    fused_lookup = None

    def __init__(self, head_sizes, head_dim: int) -> None:
        super().__init__()
        sizes = torch.as_tensor(list(head_sizes), dtype=torch.int64)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes)
        self.embedding = nn.Embedding(int(sizes.sum()), head_dim)
        self.sparse = False

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        if self.fused_lookup is not None:
            return self.fused_lookup(self.embedding.weight, hash_ids, self.offsets)
        return ops.multihead_embedding(self.embedding.weight, hash_ids, self.offsets, self.sparse)


class ShortConv(nn.Module):
    """Per-branch RMSNorm, depthwise causal dilated conv over T, SiLU, plus the
    gated value as residual (spec §5-6), in one fused op."""

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.kernel_size, self.dilation = kernel_size, dilation
        # Kept as nn.Conv1d / nn.RMSNorm for the reference parameter names and
        # initialisation; forward reads their weights.
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=1e-5) for _ in range(hc_mult)])

    def forward(self, value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """value [B, T, D] (shared by the branches), gate [B, T, G] -> [B, T, G, D]:
        x + SiLU(conv(RMSNorm(x))) with x[:, :, g] = gate[:, :, g] * value."""
        norm_weight = torch.stack([norm.weight for norm in self.norms])
        conv_weight = self.conv.weight.flatten(1)  # [G*D, 1, K] -> [G*D, K]
        return ops.gated_short_conv(value, gate, norm_weight, conv_weight, self.dilation, self.norms[0].eps)


class EngramLayer(nn.Module):
    """One Engram layer: hash the last 2..N tokens, look the rows up, gate them
    against each residual branch and return the update for the residual stream.

    forward(hidden_states [B, T, G, D] (or [B, T, D] when G = 1), input_ids [B, T])
    returns a tensor shaped like hidden_states; the caller adds it.
    """

    def __init__(
        self,
        config: EngramConfig,
        layer_id: int,
        hidden_size: int,
        hc_mult: int = 1,
        compression: Optional[CompressionTable] = None,
    ) -> None:
        super().__init__()
        if layer_id not in config.layer_ids:
            raise ValueError(f"EngramLayer: layer_id={layer_id} is not in config.layer_ids={config.layer_ids}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"EngramLayer: hidden_size={hidden_size!r}, expected a positive int")
        if not isinstance(hc_mult, int) or hc_mult < 1:
            raise ValueError(f"EngramLayer: hc_mult={hc_mult!r}, expected a positive int")
        if compression is None:
            compression = CompressionTable.identity(DEFAULT_VOCAB_SIZE)
        self.config, self.layer_id = config, layer_id
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.compression = compression
        self.hasher = NgramHasher(config, compression)

        n = config.max_ngram_size
        engram_dim = (n - 1) * config.n_embed_per_ngram
        self.multi_head_embedding = MultiHeadEmbedding(self.hasher.head_sizes(layer_id), config.head_dim)
        self.short_conv = ShortConv(hidden_size, hc_mult, config.kernel_size, dilation=n)
        self.value_proj = nn.Linear(engram_dim, hidden_size)
        self.key_projs = nn.ModuleList([nn.Linear(engram_dim, hidden_size) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])

        # Hash parameters of this layer as non-persistent buffers: .to(device)
        # moves them, state_dict keys stay spec §7's, and forward calls the op
        # directly (no Python-side cache for torch.compile to trip over).
        keys = self.hasher.multipliers(layer_id) if config.hash == "deepseek" else self.hasher.xxh64_seeds(layer_id)
        self.register_buffer("hash_lookup", compression.lookup.clone(), persistent=False)
        self.register_buffer("hash_keys", keys[None], persistent=False)
        self.register_buffer("hash_sizes", torch.tensor([self.hasher.head_sizes(layer_id)]), persistent=False)

    def hash(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, K] hash ids of this layer (without offsets)."""
        return ops.ngram_hash(
            input_ids, self.hash_lookup, self.hash_keys, self.hash_sizes, None, self.config.pad_id, self.config.hash
        )[0]

    def fused_projection_weights(self):
        """value_proj and every key_proj as one [(G+1)*D, (N-1)*E] weight and bias:
        one GEMM instead of G+1 over the same input."""
        linears = [self.value_proj, *self.key_projs]
        return torch.cat([l.weight for l in linears]), torch.cat([l.bias for l in linears])

    def _check_inputs(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns hidden_states as [B, T, G, D]; raises on shapes or dtypes that do not fit."""
        if hidden_states.dim() == 3:
            if self.hc_mult != 1:
                raise ValueError(
                    f"EngramLayer: hidden_states has shape {list(hidden_states.shape)} but hc_mult={self.hc_mult}; "
                    "expected [B, T, G, D]"
                )
            hidden_states = hidden_states.unsqueeze(2)
        if hidden_states.dim() != 4 or hidden_states.shape[2:] != (self.hc_mult, self.hidden_size):
            raise ValueError(
                f"EngramLayer: hidden_states has shape {list(hidden_states.shape)}; expected "
                f"[B, T, {self.hc_mult}, {self.hidden_size}]"
                + (f" or [B, T, {self.hidden_size}]" if self.hc_mult == 1 else "")
            )
        if input_ids.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"EngramLayer: input_ids has shape {list(input_ids.shape)}; expected [B, T] = "
                f"{list(hidden_states.shape[:2])} to match hidden_states"
            )
        weight_dtype = self.value_proj.weight.dtype
        if hidden_states.dtype != weight_dtype:
            raise TypeError(
                f"EngramLayer: hidden_states is {hidden_states.dtype} but the layer's weights are {weight_dtype}; "
                "expected one dtype (convert the layer with .to(dtype))"
            )
        return hidden_states

    def _value_and_gate(self, hidden_states: torch.Tensor, input_ids: torch.Tensor):
        """Spec §4-5 on [B, T, G, D] hidden states: the shared value [B, T, D] and the gate [B, T, G]."""
        b, t = input_ids.shape
        d, g = self.hidden_size, self.hc_mult
        e = self.multi_head_embedding(self.hash(input_ids)).reshape(b, t, -1).to(hidden_states.dtype)
        weight, bias = self.fused_projection_weights()
        value, keys = nn.functional.linear(e, weight, bias).split([d, g * d], dim=-1)
        gate = ops.context_gate(
            keys.unflatten(-1, (g, d)),
            hidden_states,
            torch.stack([norm.weight for norm in self.norm1]),
            torch.stack([norm.weight for norm in self.norm2]),
            self.norm1[0].eps,
        )
        return value, gate

    def gate(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The context gate alone, [B, T, G] values in (0, 1): how much of the
        looked-up n-gram memory each token lets into each residual branch."""
        hidden_states = self._check_inputs(hidden_states, input_ids)
        return self._value_and_gate(hidden_states, input_ids)[1]

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        squeeze = hidden_states.dim() == 3
        hidden_states = self._check_inputs(hidden_states, input_ids)
        value, gate = self._value_and_gate(hidden_states, input_ids)
        out = self.short_conv(value, gate)  # gate * value + SiLU(conv(...)), [B, T, G, D]
        return out.squeeze(2) if squeeze else out

    def extra_repr(self) -> str:
        w = self.multi_head_embedding.embedding.weight
        return (
            f"layer_id={self.layer_id}, rows={w.shape[0]:,}, head_dim={w.shape[1]}, "
            f"table_bytes={w.numel() * w.element_size():,}, hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, "
            f"hash={self.config.hash!r}"
        )
