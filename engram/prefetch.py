"""engram.Prefetcher: gathers the Engram rows of the next batch ahead of use.

Row ids depend only on the tokens, so ``prefetch(input_ids)`` can queue, per layer, the hashing of the batch
and the gather of its rows on the engine's worker threads (csrc/prefetch/). Every batch sits in the engine's
one queue per layer (LayerQueues); the layer's lookup takes its own batch from there and waits on it alone::

    with engram.Prefetcher(model) as prefetcher:
        prefetcher.prefetch(batches[0])
        for i, batch in enumerate(batches):
            out = model(batch)                     # uses the staged rows
            if i + 1 < len(batches):
                prefetcher.prefetch(batches[i + 1])  # overlaps what follows
            out.loss.backward(); optimizer.step()

Gradients are as without a prefetcher and no staged row is used stale (docs/design.md, "Table placements and
the prefetcher"). Only tables in CPU memory are prefetched; others are looked up directly.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from operator import attrgetter
from typing import List, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _loader, hot_rows as _hot, zero_copy
from .layer import EngramLayer
from .layer_specs import LayerSpecs
from .update_log import TableUpdates

_engine = _loader.load("_engine")
Take = _engine.Take

__all__ = ["Prefetcher"]


@dataclass
class PrefetchStats:
    hits: int = 0  # lookups served from staged rows
    misses: int = 0  # lookups done directly (nothing prefetched, other ids, table elsewhere)
    patched_rows: int = 0  # staged rows read again after an update, at use
    patched_batches: int = 0  # staged batches whose updated rows a worker read again (fused row-wise updates)
    regathers: int = 0  # staged buffers gathered again after a change of unknown rows
    rows_looked_up: int = 0  # (token, head) lookups served from staged rows
    rows_gathered: int = 0  # distinct rows gathered for them
    cache_lookups: int = 0  # (token, head) lookups of prefetches that had a hot-row cache
    cache_hits: int = 0  # of those, the ones whose row the cache held
    cache_refreshes: int = 0  # hot-row sets chosen again from the counts


class Prefetcher:
    """Prefetches the Engram rows of ``model``'s layers on ``num_threads`` workers (default: one per layer, at
    most half the cores, at least one). Use as a context manager or call :meth:`close`.

    ``dedup``: gather each distinct row once and expand at use (for an accelerator: fewer bytes cross the
    link), or gather the lookup's output itself (for a CPU consumer). Default (None): dedup on an accelerator.
    ``max_pending``: batches each layer keeps (a prefetch beyond drops the oldest).
    ``hot_rows``: a hot-row cache per table (engram/hot_rows.py), in rows (int) or as a share of the table
    (float in (0, 1]); 0 (default): none. The hot set (LFU, counts halved every ``hot_refresh`` batches)
    never changes a result.
    ``transfer`` (CUDA): "staged" (default: pinned staging buffers copied at use) or "zero-copy" (a kernel
    reads a pinned "host" table over UVA on a side stream, engram/zero_copy.py; no dedup, no cache).
    ``worker_nice`` (Linux): workers run as SCHED_BATCH threads, nice raised by this much (default 5), so
    gathers take idle CPU time first; -1: ordinary threads.

    ``stats`` counts hits, misses, rows moved and cache hits; ``enabled = False`` makes every lookup direct;
    :meth:`refresh` after changing a layer's tensors in a way its hooks do not see."""

    def __init__(self, model: nn.Module, num_threads: Optional[int] = None, dedup: Optional[bool] = None,
                 max_pending: int = 2, hot_rows=0, hot_refresh: int = 16, transfer: str = "staged",
                 worker_nice: int = 5) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Prefetcher: model must be an nn.Module, got {type(model).__name__}")
        self.layers: List[EngramLayer] = [m for m in model.modules() if isinstance(m, EngramLayer)]
        if not self.layers:
            raise ValueError(f"Prefetcher: {type(model).__name__} holds no EngramLayer")
        self._modules = [layer.multi_head_embedding for layer in self.layers]
        if any(m.row_source is not None for m in self._modules):
            raise ValueError("Prefetcher: a layer of this model already has a Prefetcher; close() it first")
        num_threads = max(1, min(len(self.layers), (os.cpu_count() or 2) // 2)) if num_threads is None else num_threads

        def positive(v, low=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        for name, value, ok, expected in (
            ("num_threads", num_threads, positive(num_threads), "a positive int"),
            ("max_pending", max_pending, positive(max_pending), "a positive int"),
            ("dedup", dedup, dedup in (None, True, False), "None, True or False"),
            ("hot_rows", hot_rows, positive(hot_rows, 0) or (isinstance(hot_rows, float) and 0 < hot_rows <= 1),
             "a row count >= 0 or a share of the table in (0, 1]"),
            ("hot_refresh", hot_refresh, positive(hot_refresh), "a positive int (batches)"),
            ("transfer", transfer, transfer in ("staged", "zero-copy"), "'staged' or 'zero-copy'"),
            ("worker_nice", worker_nice, positive(worker_nice, -1) and worker_nice <= 19,
             "-1 (ordinary threads) or 0..19"),
        ):
            if not ok:
                raise ValueError(f"Prefetcher: {name}={value!r}, expected {expected}")
        self.dedup, self.max_pending, self.transfer = dedup, max_pending, transfer
        self.stats = PrefetchStats()
        # Sharded tables (engram.distributed; not imported: none) take an id exchange and remote gather ahead.
        distributed = sys.modules.get("engram.distributed")
        self._sharded = distributed.ShardPrefetch.split(self, max_pending) if distributed else None
        self._hot = _hot.HotRows(hot_rows, hot_refresh, self.stats) if hot_rows else None
        self._pool = _engine.GatherPool(num_threads, worker_nice)
        self._queues = _engine.LayerQueues(self._pool, len(self.layers), max_pending)
        self._updates = TableUpdates(self._modules, self._queues, self._pool, self.stats, self._hot)
        self._index = {m: i for i, m in enumerate(self._modules)}
        self._specs, self._streams = LayerSpecs(self.layers, self._queues), {}
        self.enabled, self._closed = True, False
        self._specs.build(bool(self.dedup))
        ref = weakref.ref(self)

        def bound(method, otherwise):  # calls the prefetcher's `method` (a dotted name) while it lives and is open
            def call(*args):
                prefetcher = ref()
                alive = prefetcher is not None and not prefetcher._closed
                return attrgetter(method)(prefetcher)(*args) if alive else otherwise(*args)
            return call

        self._hook = bound("_lookup", lambda module, hash_ids, input_ids=None: module.direct_forward(hash_ids))
        changed = bound("_changed", lambda *args: None)
        self._handles = [register_optimizer_step_pre_hook(bound("_updates.before_step", lambda *args: None))]
        # Reassigned tensors (a buffer, the table, its module), load_state_dict and .to() call refresh().
        for register in (_module.register_module_buffer_registration_hook,
                         _module.register_module_parameter_registration_hook,
                         _module.register_module_module_registration_hook):
            self._handles.append(register(changed))
        for layer, module in zip(self.layers, self._modules):
            module.row_source = self._hook
            # Fused row-wise updates wait for this table's gathers and are recorded.
            self._handles += [module.add_update_listener(bound("_updates.run", lambda t, update, rows: update())),
                              module.add_change_listener(changed),
                              layer.register_load_state_dict_post_hook(lambda *args: changed())]

    # ---- public API ----------------------------------------------------------
    def refresh(self) -> None:
        """Builds every layer's spec (copies of its hash parameters and offsets, its table) again at the next
        prefetch or lookup. The layers' hooks call it (a tensor reassigned, load_state_dict, .to()); in-place
        changes need not (version counters). Queued batches that read the same rows stay."""
        self._specs.stale = True

    def prefetch(self, input_ids: torch.Tensor) -> None:
        """Queues the gathers of the rows every layer will look up for ``input_ids`` [B, T]; returns at once."""
        if self._closed:
            raise RuntimeError("Prefetcher: closed")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"Prefetcher.prefetch: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if self._sharded is not None:
            self._sharded.prefetch(input_ids)
        self._specs.build(bool(self.dedup))
        if input_ids.device.type == "cpu" and input_ids.dtype == torch.int64 and input_ids.dim() == 2 \
                and self._hot is None:
            # One engine call: the workers hash too, off the caller's critical path.
            stale = self._queues.prefetch(input_ids)
            if stale:
                raise RuntimeError(f"Prefetcher: the specs of layers {stale} are stale right after being built")
            return
        for group in self._specs.groups:  # the caller hashes: one ngram_hash call per group of layers
            hashed = self._specs.hash(group, input_ids)
            hashed_cpu = None  # copied to the CPU only for a gather there (from an accelerator: a host sync)
            for i, index in enumerate(group):
                module, offsets = self._modules[index], self._specs.copies[index][3]
                table = module.embedding.weight
                if table.device.type != "cpu":
                    continue  # on an accelerator: looked up directly
                if self.transfer == "zero-copy" and input_ids.device.type == "cuda" and table.is_pinned():
                    ticket = zero_copy.gather(self._streams, table, hashed[i], module.offsets)
                else:
                    hashed_cpu = hashed.cpu() if hashed_cpu is None else hashed_cpu
                    dedup = self.dedup if self.dedup is not None else input_ids.device.type != "cpu"
                    own_bumps = self._updates.logs[index].own_bumps
                    cache = None if self._hot is None else \
                        self._hot.snapshot(index, table, hashed_cpu[i], offsets, dedup, input_ids.device, own_bumps)
                    ticket = self._pool.submit(table.detach(), hashed_cpu[i], table.is_pinned(), dedup, offsets,
                                               None if cache is None else cache.rows,
                                               None if cache is None or dedup else cache.data)
                    ticket.payload = cache
                self._queues.add(index, ticket, input_ids, hashed[i])

    def wait(self) -> None:
        """Blocks until every queued gather finished (errors are raised when the rows are used)."""
        self._updates.wait(range(len(self.layers)))
        if self._sharded is not None:
            self._sharded.wait()

    def close(self) -> None:
        """Cancels queued gathers, joins the workers, detaches from the layers (they look up directly). Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._queues.clear()
        self._pool.close()
        for module in self._modules:
            if module.row_source is self._hook:
                module.row_source = None
        if self._sharded is not None:
            self._sharded.close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ---- lookups and updates ---------------------------------------------------
    def _lookup(self, module, hash_ids: torch.Tensor, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight, index = module.embedding.weight, self._index[module]
        if not weight.is_cpu:
            self.stats.misses += 1
            return module.direct_forward(hash_ids)
        if self._specs.stale:
            self._specs.build(bool(self.dedup))
        ids = (input_ids, hash_ids) if self.enabled else (None, None)  # disabled: only whether the spec is current
        found, ticket, output = self._queues.take(index, *ids)
        if ticket is None and found == Take.STALE:  # a hash parameter, the offsets or the table data changed
            self._specs.build(bool(self.dedup), index)
            found, ticket, output = self._queues.take(index, *ids)
        offsets, stats = self._specs.copies[index][3], self.stats
        if ticket is None:
            stats.misses += 1
            return module.lookup(weight, hash_ids.to(weight.device), offsets).to(hash_ids.device, non_blocking=True)
        grad = torch.is_grad_enabled() and weight.requires_grad  # only the backward needs the ids on the CPU
        if output is not None and hash_ids.is_cpu:  # the common CPU case: the staged rows are the output, current
            looked_up = hash_ids.numel()
            stats.hits, stats.rows_looked_up, stats.rows_gathered = \
                stats.hits + 1, stats.rows_looked_up + looked_up, stats.rows_gathered + looked_up
            return module.lookup(weight, ticket.wait().hashed, offsets, [output]) if grad else output
        staged, table_ids = self._use(index, weight, ticket, hash_ids, offsets)
        return module.lookup(weight, table_ids() if grad else hash_ids, offsets, staged)

    def _use(self, index: int, weight, ticket, hash_ids: torch.Tensor, offsets: torch.Tensor):
        """A batch's staged rows, current and on hash_ids' device: [table[ids]] or [rows, inverse] (see
        engram.lookup.staged_rows); and a callable giving hash_ids on the table's device (the CPU)."""
        device, looked_up, stats, staged = hash_ids.device, hash_ids.numel(), self.stats, ticket.wait()
        rows, data, cpu_ids = staged.rows, staged.staged, staged.hashed  # the engine's CPU copy of the hash ids
        stats.hits += 1
        stats.rows_looked_up += looked_up
        stats.rows_gathered += looked_up if rows is None else rows.numel()
        if cpu_ids is None:  # a device gather (zero-copy): hash ids copied from the accelerator, a host sync
            data, table_ids, cache = zero_copy.use(ticket, device), lambda: hash_ids.to(weight.device), None
        else:
            table_ids, cache = (lambda: cpu_ids), ticket.payload
        if cache is not None:
            stats.cache_lookups += looked_up
            stats.cache_hits += staged.cache_hits
        if rows is not None:
            data = data.to(device, non_blocking=True) if staged.slots is None else \
                _hot.assemble(rows, data, staged.slots, cache.data, device)
        data = self._updates.catch_up(index, weight, ticket, lambda: table_ids() + offsets, rows, data)
        if rows is not None:
            return [data, staged.inverse.to(device, non_blocking=True)], table_ids
        return [data.to(device, non_blocking=True)], table_ids

    def _changed(self, module=None, *args) -> None:
        if module is None or module in self._specs.watched:
            self.refresh()
