"""Typed wrappers over torch.ops.engram.*, with autograd.

The C++ schemas live in csrc/library.cpp and the Meta kernels torch.compile
traces with in csrc/checks.cpp; this module gives each op the Python-side
pieces autograd needs, and gather_rows its fake kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _loader

_C = _loader.load("_C")

# Process-wide switches (CPU ISA level, CUDA sync checks) and
# the ENGRAM_* environment variables live in engram/_runtime.py; re-exported
# here, where they have always been.
from ._cpu_isa import cpu_isa, cpu_isa_calls, cpu_isa_levels, set_cpu_isa, use_cpu_isa  # noqa: E402,F401
from ._runtime import check_cuda_errors, cuda_sync_checks, set_cuda_sync_checks  # noqa: E402,F401

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


def gather_rows(table: torch.Tensor, rows: torch.Tensor, check: bool = True) -> torch.Tensor:
    """table [R, Dh], rows [...] int64 -> table[rows] [..., Dh] on the rows' device. On CUDA with
    a pinned host table the GPU reads the rows over UVA (zero copy); ``check=False`` neither
    reports nor reads an out-of-range row there (it reads as zeros); with check=True it is
    reported like any bad id on CUDA (see set_cuda_sync_checks)."""
    return _ops.gather_rows(table, rows, check)


# --------------------------------------------------------------------------
# fake kernels: the Meta kernels in csrc/checks.cpp (the C++ argument checks
# and the output shapes) serve torch.compile, torch.export and meta tensors
# for every op but gather_rows, here, and dedup_row_grads (engram/optim.py).
# --------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    """ATen's name of a dtype ("Long", "Int"), as the C++ checks print it."""
    return torch.empty(0, dtype=dtype, device="meta").type().rsplit(".", 1)[-1][: -len("Tensor")]


# In Python because its output is on the rows' device, which may not be the
# table's: a Meta kernel cannot say so. The checks of check_gather_rows_args
# (csrc/checks.cpp), with its messages.
@torch.library.register_fake("engram::gather_rows")
def _gather_rows_fake(table, rows, check=True):
    if table.dim() != 2:
        raise ValueError(f"gather_rows: table must have 2 dims, got shape {list(table.shape)}")
    torch._check_value(table.is_contiguous(), lambda: "gather_rows: table must be contiguous (row-major [R, Dh]), "
                       f"got strides {list(table.stride())}")
    if rows.dtype != torch.int64:
        raise TypeError(f"gather_rows: rows must be Long, got {_dtype_name(rows.dtype)}")
    return table.new_empty((*rows.shape, table.shape[1]), device=rows.device)


# --------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------


def _embedding_setup_context(ctx, inputs, output):
    weight, ids, offsets, sparse = inputs
    ctx.save_for_backward(ids, offsets)
    ctx.num_rows = weight.shape[0]
    ctx.sparse = sparse


def table_gradient(grad: torch.Tensor, ids: torch.Tensor, offsets: Optional[torch.Tensor], num_rows: int,
                   sparse: bool) -> torch.Tensor:
    """The gradient of a [num_rows, Dh] table from the lookup of ids (+ offsets)."""
    if sparse:
        # Like nn.Embedding(sparse=True): an uncoalesced COO gradient whose
        # values are the incoming rows, one per (token, head).
        rows = ids if offsets is None else ids + offsets
        dh = grad.shape[-1]
        return torch.sparse_coo_tensor(
            rows.reshape(1, -1), grad.reshape(-1, dh), (num_rows, dh), is_coalesced=False, check_invariants=False
        )
    return _ops.multihead_embedding_backward(grad, ids, offsets, num_rows)


def _embedding_backward(ctx, grad):
    ids, offsets = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return table_gradient(grad, ids, offsets, ctx.num_rows, ctx.sparse), None, None, None


torch.library.register_autograd(
    "engram::multihead_embedding", _embedding_backward, setup_context=_embedding_setup_context
)


# --------------------------------------------------------------------------
# Engram layer ops (spec §5-6): context gate and gated short convolution
# --------------------------------------------------------------------------


def context_gate(
    key: torch.Tensor,
    hidden: torch.Tensor,
    key_norm_weight: torch.Tensor,
    hidden_norm_weight: torch.Tensor,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """key, hidden [B, T, G, D], norm weights [G, D] -> gate [B, T, G] (spec §5):
    sigmoid(signed_sqrt(sum(RMSNorm(key) * RMSNorm(hidden)) / sqrt(D))) per
    branch. eps=None is the dtype's machine epsilon, like nn.RMSNorm(D)."""
    return _ops.context_gate(key, hidden, key_norm_weight, hidden_norm_weight, eps)


def gated_short_conv(
    value: torch.Tensor,
    gate: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    dilation: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """value [B, T, D], gate [B, T, G] -> [B, T, G, D] (spec §5-6): with
    x = gate * value per branch, x + SiLU(causal depthwise conv over T of
    RMSNorm_g(x)); norm_weight [G, D], conv_weight [G*D, kernel_size]."""
    return _ops.gated_short_conv(value, gate, norm_weight, conv_weight, dilation, eps)


# Both backward kernels recompute the few per-row reductions instead of saving
# intermediates: less memory, and the rows are re-read anyway.
def _context_gate_setup_context(ctx, inputs, output):
    key, hidden, key_norm_weight, hidden_norm_weight, eps = inputs
    ctx.save_for_backward(key, hidden, key_norm_weight, hidden_norm_weight)
    ctx.eps = eps


def _context_gate_backward(ctx, grad_gate):
    grads = _ops.context_gate_backward(grad_gate, *ctx.saved_tensors, ctx.eps)
    return (*grads, None)


def _gated_short_conv_setup_context(ctx, inputs, output):
    value, gate, norm_weight, conv_weight, dilation, eps = inputs
    ctx.save_for_backward(value, gate, norm_weight, conv_weight)
    ctx.dilation, ctx.eps = dilation, eps


def _gated_short_conv_backward(ctx, grad_out):
    grads = _ops.gated_short_conv_backward(grad_out, *ctx.saved_tensors, ctx.dilation, ctx.eps)
    return (*grads, None, None)


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"engram::{op}: double backward (differentiating the gradient) is not implemented")

    return backward


torch.library.register_autograd(
    "engram::context_gate", _context_gate_backward, setup_context=_context_gate_setup_context
)
torch.library.register_autograd(
    "engram::gated_short_conv", _gated_short_conv_backward, setup_context=_gated_short_conv_setup_context
)
# An explicit error instead of PyTorch's silent fallback for a backward op.
for _op in ("context_gate_backward", "gated_short_conv_backward"):
    torch.library.register_autograd(f"engram::{_op}", _no_double_backward(_op))
