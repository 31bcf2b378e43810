"""Typed wrappers over torch.ops.engram.*, with fake kernels and autograd.

The C++ schemas live in csrc/library.cpp; this module gives each op the
Python-side pieces torch.compile and autograd need.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _loader

_loader.load("_C")

_ops = torch.ops.engram


# --------------------------------------------------------------------------
# typed wrappers
# --------------------------------------------------------------------------


def compress_ids(input_ids: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Token ids -> canonical ids (spec §1); negative ids pass through unchanged."""
    return _ops.compress_ids(input_ids, lookup)


def ngram_hash(
    input_ids: torch.Tensor,
    lookup: torch.Tensor,
    keys: torch.Tensor,
    head_sizes: torch.Tensor,
    offsets: Optional[torch.Tensor],
    pad_id: int,
    family: str = "deepseek",
) -> torch.Tensor:
    """[B, T] token ids -> [L, B, T, K] hash ids for L layers in one pass."""
    return _ops.ngram_hash(input_ids, lookup, keys, head_sizes, offsets, pad_id, family)


def multihead_embedding(
    weight: torch.Tensor, ids: torch.Tensor, offsets: Optional[torch.Tensor] = None, sparse: bool = False
) -> torch.Tensor:
    """weight [R, Dh], ids [..., K] -> [..., K, Dh]: row ids[..., k] + offsets[k] per head."""
    return _ops.multihead_embedding(weight, ids, offsets, sparse)


# --------------------------------------------------------------------------
# fake kernels: shapes, dtypes and devices only
# --------------------------------------------------------------------------


def _same_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; expected both on the same device"
            )


@torch.library.register_fake("engram::compress_ids")
def _compress_ids_fake(input_ids, lookup):
    _same_device("compress_ids", "input_ids", input_ids, lookup=lookup)
    return torch.empty_like(input_ids, memory_format=torch.contiguous_format)


@torch.library.register_fake("engram::ngram_hash")
def _ngram_hash_fake(input_ids, lookup, keys, head_sizes, offsets, pad_id, family):
    _same_device("ngram_hash", "input_ids", input_ids, lookup=lookup, keys=keys, head_sizes=head_sizes, offsets=offsets)
    if input_ids.dim() != 2:
        raise ValueError(f"ngram_hash: input_ids must have 2 dims, got shape {list(input_ids.shape)}")
    b, t = input_ids.shape
    return input_ids.new_empty((head_sizes.shape[0], b, t, head_sizes.shape[1]))


@torch.library.register_fake("engram::multihead_embedding")
def _multihead_embedding_fake(weight, ids, offsets=None, sparse=False):
    _same_device("multihead_embedding", "weight", weight, ids=ids, offsets=offsets)
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.register_fake("engram::multihead_embedding_backward")
def _multihead_embedding_backward_fake(grad, ids, offsets, num_rows):
    _same_device("multihead_embedding_backward", "grad", grad, ids=ids, offsets=offsets)
    return grad.new_empty((num_rows, grad.shape[-1]))


# --------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------


def _embedding_setup_context(ctx, inputs, output):
    weight, ids, offsets, sparse = inputs
    ctx.save_for_backward(ids, offsets)
    ctx.num_rows = weight.shape[0]
    ctx.sparse = sparse


def _embedding_backward(ctx, grad):
    ids, offsets = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    if ctx.sparse:
        # Like nn.Embedding(sparse=True): an uncoalesced COO gradient whose
        # values are the incoming rows, one per (token, head).
        rows = ids if offsets is None else ids + offsets
        dh = grad.shape[-1]
        grad_weight = torch.sparse_coo_tensor(
            rows.reshape(1, -1), grad.reshape(-1, dh), (ctx.num_rows, dh), is_coalesced=False, check_invariants=False
        )
    else:
        grad_weight = _ops.multihead_embedding_backward(grad, ids, offsets, ctx.num_rows)
    return grad_weight, None, None, None


torch.library.register_autograd(
    "engram::multihead_embedding", _embedding_backward, setup_context=_embedding_setup_context
)
