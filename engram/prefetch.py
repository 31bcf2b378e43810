"""engram.Prefetcher: gathers the Engram rows of the next batch ahead of use.

Row ids depend only on the tokens, so the rows every Engram layer of a model
will read can be known before the model runs. ``Prefetcher(model)`` finds the
model's EngramLayers; ``prefetch(input_ids)`` hashes the batch for all of them
in one pass (one ``ngram_hash`` call per group of layers sharing a tokenizer
map), and queues, per layer, the deduplication of its rows and their gather
from the table into a staging buffer on the engine's worker threads
(csrc/prefetch.h). When the layer later looks up the same ids, it waits on its
own gather only, and reads the staged rows; any other ids are looked up
directly. The model's code does not change::

    with engram.Prefetcher(model) as prefetcher:
        prefetcher.prefetch(batches[0])
        for i, batch in enumerate(batches):
            out = model(batch)                     # uses the staged rows
            if i + 1 < len(batches):
                prefetcher.prefetch(batches[i + 1])  # overlaps what follows
            out.loss.backward(); optimizer.step()

Training: the table's gradient is the same as without a prefetcher (dense,
sparse, or the fused row-wise update of :func:`engram.optim.make_rowwise`).
The order with updates is defined so that no staged row is used stale:

* the fused row-wise update of a table (in backward) first waits for that
  table's gathers in flight, then records the rows it changed;
* before any ``torch.optim`` optimizer steps (a global step pre-hook while
  the prefetcher is open), the gathers of the tables it holds are waited for,
  and the rows of their sparse gradients (``make_rowwise(..., fused=False)``:
  the rows the step changes) are recorded;
* when staged rows are used, the recorded rows changed after their gather was
  submitted are read again from the table (the newest values: correct however
  the update and the gather interleaved, since the gather was waited for);
* any other change of a table (a dense optimizer's step, ``load_state_dict``,
  in-place edits) bumps the table's version counter: the staged rows are then
  gathered again. Make changes outside optimizers after ``wait()``: a gather
  running concurrently may read a half-written row (discarded, but read). Row-wise ops
  called by hand (``engram.optim.rowwise_*_update``) are neither recorded nor
  versioned: call them with no gather of that table pending.

So a batch prefetched before the previous step's update lands sees the
updated rows.

Only tables in CPU memory are prefetched (every placement on a CPU-only
machine; "host" and "mmap" on an accelerator, where the staged rows are then
copied to the device). Layers whose table is on an accelerator look up
directly.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _loader, ops
from .layer import EngramLayer, MultiHeadEmbedding

_engine = _loader.load("_engine")
_ops = torch.ops.engram

__all__ = ["Prefetcher"]


@dataclass
class _Pending:
    ticket: object  # _engine.GatherTicket
    dedup: bool  # staged holds the distinct rows (else table[ids] itself)
    key: torch.Tensor  # the layer's lookup rows [B, T, K], on the ids' device
    version: int  # table._version at submission
    epoch: int  # the prefetcher's update count of the table at submission
    own_bumps: int  # version bumps of those updates


@dataclass
class _TableLog:
    epoch: int = 0
    own_bumps: int = 0
    updates: List[tuple] = field(default_factory=list)  # (epoch after, rows)


@dataclass
class PrefetchStats:
    hits: int = 0  # lookups served from staged rows
    misses: int = 0  # lookups done directly (nothing prefetched, other ids, table elsewhere)
    patched_rows: int = 0  # staged rows read again after an update
    regathers: int = 0  # staged buffers gathered again after a change of unknown rows
    rows_looked_up: int = 0  # (token, head) lookups served from staged rows
    rows_gathered: int = 0  # distinct rows gathered for them


def _fused_optimizer(module: MultiHeadEmbedding):
    """The row-wise optimizer of make_rowwise's fused lookup, if that is what is attached."""
    from .optim import RowwiseOptimizer

    args = getattr(module.fused_lookup, "args", ())
    return args[0] if args and isinstance(args[0], RowwiseOptimizer) else None


class _TableLookup(torch.autograd.Function):
    """The table lookup, from staged rows (staged[inverse]) or directly, whose
    backward is the direct lookup's: the dense or sparse table gradient, or the
    fused row-wise update, ordered against the prefetcher's gathers."""

    @staticmethod
    def forward(ctx, weight, ids, offsets, staged, module, prefetcher):
        ctx.save_for_backward(ids, offsets)
        # Not saved for backward: the fused update modifies it in place.
        ctx.table, ctx.module, ctx.prefetcher = weight, module, prefetcher
        # staged: None (look up now), [expanded] or [rows, inverse]; in a list
        # so that autograd does not take it for an input.
        if staged is None:
            return ops.multihead_embedding(weight, ids, offsets)
        if len(staged) == 1:
            return staged[0].view(*ids.shape, weight.shape[1])
        return ops.multihead_embedding(*staged)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        ids, offsets = ctx.saved_tensors
        module, table = ctx.module, ctx.table
        grad = grad.to(table.device)  # staged rows may have been read on an accelerator
        none = (None,) * 5
        optimizer = _fused_optimizer(module)
        if optimizer is not None:
            rows, row_grads = _ops.dedup_row_grads(grad, ids, offsets, table.shape[0])
            ctx.prefetcher._update_table(table, lambda: optimizer.update(table, rows, row_grads), rows)
            return (None, *none)
        if module.sparse:  # as engram.ops' backward of multihead_embedding
            dh = grad.shape[-1]
            grad_weight = torch.sparse_coo_tensor(
                (ids + offsets).reshape(1, -1), grad.reshape(-1, dh), tuple(table.shape), is_coalesced=False,
                check_invariants=False,
            )
        else:
            grad_weight = _ops.multihead_embedding_backward(grad, ids, offsets, table.shape[0])
        return (grad_weight, *none)


class Prefetcher:
    """Prefetches the Engram rows of ``model``'s layers on ``num_threads``
    worker threads (default: one per layer, at most half the CPU cores, at
    least one). Use as a context manager or call :meth:`close`.

    ``dedup``: gather each distinct row once and expand at use (what an
    accelerator wants: fewer bytes cross the link), or gather the lookup's
    output itself (what a CPU consumer wants: nothing left to do at use).
    Default (None): dedup for layers on an accelerator only. ``max_pending``:
    how many prefetched batches each layer keeps (a prefetch beyond drops the
    oldest unused one), so batch i+1 can be prefetched before batch i is used.

    ``stats`` counts hits, misses and the rows moved. ``enabled = False``
    makes every lookup direct (the prefetched rows are then ignored)."""

    def __init__(self, model: nn.Module, num_threads: Optional[int] = None, dedup: Optional[bool] = None,
                 max_pending: int = 2) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Prefetcher: model must be an nn.Module, got {type(model).__name__}")
        self.layers: List[EngramLayer] = [m for m in model.modules() if isinstance(m, EngramLayer)]
        if not self.layers:
            raise ValueError(f"Prefetcher: {type(model).__name__} holds no EngramLayer")
        for layer in self.layers:
            if layer.multi_head_embedding.prefetch_lookup is not None:
                raise ValueError("Prefetcher: a layer of this model already has a Prefetcher; close() it first")
        if num_threads is None:
            num_threads = max(1, min(len(self.layers), (os.cpu_count() or 2) // 2))
        if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
            raise ValueError(f"Prefetcher: num_threads={num_threads!r}, expected a positive int")
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ValueError(f"Prefetcher: max_pending={max_pending!r}, expected a positive int")
        if dedup not in (None, True, False):
            raise ValueError(f"Prefetcher: dedup={dedup!r}, expected None, True or False")
        self.dedup, self.max_pending = dedup, max_pending
        self._pool = _engine.GatherPool(num_threads)
        self._pending: Dict[MultiHeadEmbedding, List[_Pending]] = {}
        self._logs: Dict[int, _TableLog] = {}
        self._groups = self._group_layers()
        self._stacked: Dict[tuple, tuple] = {}
        self.stats = PrefetchStats()
        self.enabled = True
        self._closed = False
        ref = weakref.ref(self)

        def lookup(module, hash_ids):
            prefetcher = ref()
            if prefetcher is None or prefetcher._closed:
                return module.direct_forward(hash_ids)
            return prefetcher._lookup(module, hash_ids)

        self._hook = lookup
        for layer in self.layers:
            layer.multi_head_embedding.prefetch_lookup = lookup

        def before_step(optimizer, args, kwargs):
            prefetcher = ref()
            if prefetcher is not None and not prefetcher._closed:
                prefetcher._before_step(optimizer)

        self._step_hook = register_optimizer_step_pre_hook(before_step)

    # ---- hashing all layers at once ---------------------------------------
    def _group_layers(self) -> List[List[EngramLayer]]:
        """Layers whose hashes one ngram_hash call computes: same family, pad,
        order, head count and tokenizer map."""
        groups: List[List[EngramLayer]] = []
        for layer in self.layers:
            for group in groups:
                first = group[0]
                if (
                    first.config.hash == layer.config.hash
                    and first.config.pad_id == layer.config.pad_id
                    and first.hash_keys.shape == layer.hash_keys.shape
                    and first.hash_sizes.shape == layer.hash_sizes.shape
                    and first.hash_lookup.shape == layer.hash_lookup.shape
                    and torch.equal(first.hash_lookup.cpu(), layer.hash_lookup.cpu())
                ):
                    group.append(layer)
                    break
            else:
                groups.append([layer])
        return groups

    def _stacked_params(self, index: int, device: torch.device):
        key = (index, device)
        if key not in self._stacked:
            group = self._groups[index]
            self._stacked[key] = (
                group[0].hash_lookup.to(device),
                torch.cat([l.hash_keys for l in group]).to(device),
                torch.cat([l.hash_sizes for l in group]).to(device),
                torch.stack([l.multi_head_embedding.offsets for l in group]).to(device),
            )
        return self._stacked[key]

    # ---- public API ----------------------------------------------------------
    def prefetch(self, input_ids: torch.Tensor) -> None:
        """Queues the gathers of the rows every layer will look up for
        ``input_ids`` [B, T]; returns at once. Each layer keeps the last
        ``max_pending`` prefetched batches not used yet (older ones are dropped)."""
        self._check_open()
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"Prefetcher.prefetch: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        for index, group in enumerate(self._groups):
            lookup, keys, sizes, offsets = self._stacked_params(index, input_ids.device)
            rows = ops.ngram_hash(input_ids, lookup, keys, sizes, offsets, group[0].config.pad_id,
                                  group[0].config.hash)  # [L, B, T, K], table rows
            rows_cpu = rows.cpu()
            for i, layer in enumerate(group):
                module = layer.multi_head_embedding
                table = module.embedding.weight
                if table.device.type != "cpu":
                    continue  # on an accelerator: looked up directly
                log = self._log(table)
                dedup = self.dedup if self.dedup is not None else input_ids.device.type != "cpu"
                ticket = self._pool.submit(table.detach(), rows_cpu[i], table.is_pinned(), dedup)
                queue = self._pending.setdefault(module, [])
                queue.append(_Pending(ticket, dedup, rows[i], table._version, log.epoch, log.own_bumps))
                del queue[: -self.max_pending]

    def wait(self) -> None:
        """Blocks until every queued gather finished (errors are raised when
        the rows are used)."""
        for queue in list(self._pending.values()):
            for pending in queue:
                _wait_quietly(pending.ticket)

    def close(self) -> None:
        """Cancels queued gathers, joins the workers and detaches from the
        layers (they look up directly again). Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._step_hook.remove()
        self._pool.close()
        self._pending.clear()
        for layer in self.layers:
            if layer.multi_head_embedding.prefetch_lookup is self._hook:
                layer.multi_head_embedding.prefetch_lookup = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ---- internals -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Prefetcher: closed")

    def _log(self, table: torch.Tensor) -> _TableLog:
        return self._logs.setdefault(id(table), _TableLog())

    def _update_table(self, table: torch.Tensor, update, rows: torch.Tensor) -> None:
        """Runs a row-wise update of `table` after its gathers in flight and records the rows it changed."""
        for pending in self._pending_of(table):
            _wait_quietly(pending.ticket)
        before = table._version
        update()
        log = self._log(table)
        log.epoch += 1
        log.own_bumps += table._version - before
        if self._pending_of(table):
            log.updates.append((log.epoch, rows))

    def _before_step(self, optimizer) -> None:
        """An optimizer is about to step: no gather of its tables may run
        while it writes them, and the rows of sparse gradients will change."""
        tables = {id(l.multi_head_embedding.embedding.weight) for l in self.layers}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in tables:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    self._update_table(p, lambda: None, p.grad._indices()[0])
                else:  # a dense step bumps the version counter: gathered again
                    for pending in self._pending_of(p):
                        _wait_quietly(pending.ticket)

    def _pending_of(self, table) -> List[_Pending]:
        return [p for m, queue in self._pending.items() if m.embedding.weight is table for p in queue]

    def _lookup(self, module: MultiHeadEmbedding, hash_ids: torch.Tensor) -> torch.Tensor:
        weight = module.embedding.weight
        fused = module.fused_lookup is not None
        if (fused and _fused_optimizer(module) is None) or weight.device.type != "cpu":
            self.stats.misses += 1
            return module.direct_forward(hash_ids)
        offsets = module.offsets.to(weight.device)
        ids = hash_ids.to(weight.device)
        staged = None
        queue = self._pending.get(module, []) if self.enabled else []
        key = None
        for index, pending in enumerate(queue):
            if pending.key.shape == hash_ids.shape:
                key = hash_ids + module.offsets if key is None else key
                if torch.equal(pending.key, key):
                    del queue[index]
                    rows, data, inverse = pending.ticket.wait()  # raises a worker's error here
                    data = self._refresh(weight, pending, rows, data)
                    staged = [data, inverse] if pending.dedup else [data]
                    self.stats.hits += 1
                    self.stats.rows_looked_up += hash_ids.numel()
                    self.stats.rows_gathered += rows.numel() if pending.dedup else hash_ids.numel()
                    self._trim(weight)
                    break
        if staged is None:
            self.stats.misses += 1
        if staged is None and not (torch.is_grad_enabled() and weight.requires_grad):
            out = ops.multihead_embedding(weight, ids, offsets)
        else:
            if staged is not None and hash_ids.device != weight.device:  # host table, layer on an accelerator
                staged = [t.to(hash_ids.device, non_blocking=True) for t in staged]
            out = _TableLookup.apply(weight, ids, offsets, staged, module, self)
        return out.to(hash_ids.device, non_blocking=True)

    def _refresh(self, weight, pending: _Pending, rows, staged):
        """Staged rows as the table holds them now (see the module docstring)."""
        log = self._log(weight)
        foreign = (weight._version - pending.version) - (log.own_bumps - pending.own_bumps)
        table = weight.detach()
        ids = rows if pending.dedup else pending.key.to(table.device)
        if foreign != 0:
            self.stats.regathers += 1
            return table[ids]
        changed = [r for epoch, r in log.updates if epoch > pending.epoch]
        if not changed:
            return staged
        changed = torch.cat(changed).to(table.device)
        if pending.dedup:  # rows sorted: find the changed ones
            pos = torch.searchsorted(rows, changed)
            hit = pos < rows.numel()
            hit[hit.clone()] = rows[pos[hit]] == changed[hit]
            pos = pos[hit]
            staged[pos] = table[rows[pos]]
        else:
            pos = torch.isin(ids, changed)
            staged[pos] = table[ids[pos]]
            pos = ids[pos]
        self.stats.patched_rows += int(torch.unique(pos).numel())
        return staged

    def _trim(self, weight) -> None:
        """Drops the update records no pending gather of this table needs."""
        log = self._log(weight)
        epochs = [p.epoch for p in self._pending_of(weight)]
        oldest = min(epochs) if epochs else log.epoch
        log.updates = [(e, r) for e, r in log.updates if e > oldest]


def _wait_quietly(ticket) -> None:
    try:
        ticket.wait()
    except Exception:  # reported when the rows are used
        pass
