"""The table lookup of an Engram layer, and the one place its backward is chosen.

A lookup reads rows from the table now, or takes rows a prefetcher staged
ahead of time. Its backward chooses, by the module's explicit state:

1. ``module.table_optimizer`` with ``fused_backward``: the row-wise update of
   the looked-up rows, run through the module's update listeners (a
   prefetcher orders it against its gathers); on CUDA with the padded row
   sums (``dedup_row_grads_padded``: rows of -1 at the end), so no host sync;
2. ``module.sparse``: a sparse COO table gradient (as nn.Embedding(sparse=True));
3. otherwise the dense table gradient op.

Plain lookups (no fused optimizer, no staged rows) go through the
``engram::multihead_embedding`` op and its registered autograd, which
torch.compile traces; both end in :func:`engram.ops.table_gradient`.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import ops

_ops = torch.ops.engram


def staged_rows(staged: List[torch.Tensor]) -> torch.Tensor:
    """The lookup's output from a prefetcher's staged rows: [table[ids]]
    (expanded, already shaped ids.shape + [Dh]) or [rows, inverse]
    (deduplicated: rows[inverse])."""
    if len(staged) == 1:
        return staged[0]
    return ops.multihead_embedding(*staged)


class _TableLookup(torch.autograd.Function):
    """An autograd.Function rather than the op's registered autograd: the
    fused update needs the optimizer and the module's listeners, not just
    tensors."""

    @staticmethod
    def forward(ctx, weight, ids, offsets, module, staged):
        ctx.save_for_backward(ids, offsets)
        # The table itself, not saved for backward: the fused update modifies
        # it in place, which saved tensors do not allow.
        ctx.table, ctx.module = weight, module
        if staged is None:
            return ops.multihead_embedding(weight, ids, offsets)
        return staged_rows(staged)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        ids, offsets = ctx.saved_tensors
        module, table = ctx.module, ctx.table
        none = (None,) * 4
        if grad.device != table.device:  # staged rows may have been read on an accelerator
            grad = grad.to(table.device)
        optimizer = module.table_optimizer
        if optimizer is not None and optimizer.fused_backward:
            if table.is_cuda:
                # Sized by the entries, padded with rows of -1 that the update
                # skips: no host sync for the row count, so the step can be
                # captured in a CUDA graph.
                rows, row_grads = _ops.dedup_row_grads_padded(grad, ids, offsets, table.shape[0])
            else:
                rows, row_grads = _ops.dedup_row_grads(grad, ids, offsets, table.shape[0])
            module.run_table_update(lambda: optimizer.update(table, rows, row_grads), rows)
            return (None, *none)
        return (ops.table_gradient(grad, ids, offsets, table.shape[0], module.sparse), *none)


@torch.compiler.disable
def _table_lookup(weight, ids, offsets, module, staged):
    return _TableLookup.apply(weight, ids, offsets, module, staged)


def lookup(module, weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
           staged: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """module's rows for ids (+ offsets), from the table or from `staged`."""
    fused = module.table_optimizer is not None and module.table_optimizer.fused_backward
    if torch.is_grad_enabled() and weight.requires_grad and (fused or staged is not None):
        return _table_lookup(weight, ids, offsets, module, staged)
    if staged is not None:  # no graph to record: the staged rows are the output
        return staged_rows(staged)
    return ops.multihead_embedding(weight, ids, offsets, module.sparse)
