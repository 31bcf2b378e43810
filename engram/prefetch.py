"""engram.Prefetcher: gathers the Engram rows of the next batch ahead of use.

Row ids depend only on the tokens, so the rows every Engram layer will read
are known before the model runs. ``prefetch(input_ids)`` queues, per layer,
the hashing of the batch, the deduplication of its rows and their gather
into a staging buffer on the engine's worker threads (csrc/prefetch/); every
batch, however it was hashed or gathered, sits in the engine's one queue per
layer (LayerQueues). The layer's lookup takes its own batch from there and
waits on it alone; any other ids are looked up directly::

    with engram.Prefetcher(model) as prefetcher:
        prefetcher.prefetch(batches[0])
        for i, batch in enumerate(batches):
            out = model(batch)                     # uses the staged rows
            if i + 1 < len(batches):
                prefetcher.prefetch(batches[i + 1])  # overlaps what follows
            out.loss.backward(); optimizer.step()

Gradients are the same as without a prefetcher, and no staged row is used
stale: updates the prefetcher learns of (the module's update listener, an
optimizer step pre-hook) are recorded and read again; any other change of a
table bumps its version counter and its staged rows are gathered again. The
order is in docs/design.md ("The prefetcher"). Only tables in CPU memory are
prefetched; layers whose table is on an accelerator look up directly.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _loader, hot_rows as _hot, ops, zero_copy
from .layer import EngramLayer

_engine = _loader.load("_engine")
Take, TaskKind = _engine.Take, _engine.TaskKind

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


@dataclass
class _Log:
    """A layer's table as the prefetcher saw it change: updates recorded, their version bumps, changed rows."""

    epoch: int = 0
    own_bumps: int = 0
    updates: List[tuple] = field(default_factory=list)  # (epoch after, rows)


class Prefetcher:
    """Prefetches the Engram rows of ``model``'s layers on ``num_threads``
    worker threads (default: one per layer, at most half the cores, at least one).
    Use as a context manager or call :meth:`close`.

    ``dedup``: gather each distinct row once and expand at use (what an
    accelerator wants: fewer bytes cross the link), or gather the lookup's
    output itself (what a CPU consumer wants). Default (None): dedup for
    layers on an accelerator only. ``max_pending``: prefetched batches each
    layer keeps (a prefetch beyond drops the oldest unused one).

    ``hot_rows``: an optional hot-row cache per table, in rows (int) or as a
    share of the table (float in (0, 1]); 0 (default) turns it off. It keeps
    the most looked-up rows (LFU, counts halved every ``hot_refresh``
    batches) where the layer computes for deduplicated gathers, or as a
    compact CPU copy for expanded ones (engram/hot_rows.py); it never changes a result.

    ``transfer`` (CUDA only): "staged" (default: workers gather into pinned
    buffers, copied at use) or "zero-copy" (a kernel reads a pinned "host"
    table over UVA on a side stream, engram/zero_copy.py; no dedup, no cache).

    ``worker_nice`` (Linux): workers run as SCHED_BATCH threads, nice raised by
    this much (default 5), so gathers take idle CPU time first; -1: ordinary threads.

    ``stats`` counts hits, misses, rows moved and cache hits. ``enabled = False``
    makes every lookup direct. Call :meth:`refresh` after changing a layer's
    tensors in a way its hooks do not see."""

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

        def positive(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        for name, value, ok, expected in (
            ("num_threads", num_threads, positive(num_threads), "a positive int"),
            ("max_pending", max_pending, positive(max_pending), "a positive int"),
            ("dedup", dedup, dedup in (None, True, False), "None, True or False"),
            ("hot_rows", hot_rows, not isinstance(hot_rows, bool) and (
                (isinstance(hot_rows, int) and hot_rows >= 0) or (isinstance(hot_rows, float) and 0 < hot_rows <= 1)),
             "a row count >= 0 or a share of the table in (0, 1]"),
            ("hot_refresh", hot_refresh, positive(hot_refresh), "a positive int (batches)"),
            ("transfer", transfer, transfer in ("staged", "zero-copy"), "'staged' or 'zero-copy'"),
            ("worker_nice", worker_nice, isinstance(worker_nice, int) and not isinstance(worker_nice, bool)
             and -1 <= worker_nice <= 19, "-1 (ordinary threads) or 0..19"),
        ):
            if not ok:
                raise ValueError(f"Prefetcher: {name}={value!r}, expected {expected}")
        self.dedup, self.max_pending, self.transfer = dedup, max_pending, transfer
        self.stats = PrefetchStats()
        self._hot = _hot.HotRows(hot_rows, hot_refresh, self.stats) if hot_rows else None
        self._pool = _engine.GatherPool(num_threads, worker_nice)
        self._queues = _engine.LayerQueues(self._pool, len(self.layers), max_pending)
        self._index = {m: i for i, m in enumerate(self._modules)}
        self._logs = [_Log() for _ in self.layers]
        self._copies: List[Optional[tuple]] = [None] * len(self.layers)  # the specs' CPU copies (lookup, keys, sizes, offsets)
        self._stacked, self._streams = {}, {}
        self.enabled, self._closed, self._stale = True, False, True
        self._build_specs()
        ref = weakref.ref(self)

        def lookup(module, hash_ids, input_ids=None):
            prefetcher = ref()
            if prefetcher is None or prefetcher._closed:
                return module.direct_forward(hash_ids)
            return prefetcher._lookup(module, hash_ids, input_ids)

        def before_update(table, update, rows):
            prefetcher = ref()
            # A table on an accelerator is never gathered: nothing to order (its rows may hold -1 padding).
            if prefetcher is None or prefetcher._closed or table.device.type != "cpu":
                return update()
            prefetcher._update_table(table, update, rows, patch=True)

        def changed(module=None, *args):
            prefetcher = ref()
            if prefetcher is not None and (module is None or module in prefetcher._watched):
                prefetcher.refresh()

        def before_step(optimizer, args, kwargs):
            prefetcher = ref()
            if prefetcher is not None and not prefetcher._closed:
                prefetcher._before_step(optimizer)

        self._hook, self._handles = lookup, [register_optimizer_step_pre_hook(before_step)]
        # Reassigned tensors (a buffer, the table, its module) and load_state_dict / .to() are reported by hooks.
        for register in (_module.register_module_buffer_registration_hook,
                         _module.register_module_parameter_registration_hook,
                         _module.register_module_module_registration_hook):
            self._handles.append(register(changed))
        for layer, module in zip(self.layers, self._modules):
            module.row_source = lookup
            self._handles += [module.add_update_listener(before_update), module.add_change_listener(changed),
                              layer.register_load_state_dict_post_hook(lambda *args: changed())]

    # ---- public API ----------------------------------------------------------
    def refresh(self) -> None:
        """Builds every layer's spec (copies of its hash parameters and offsets,
        its table) again before the next prefetch or lookup. The layers' hooks
        call it (a tensor reassigned, load_state_dict, .to()); in-place changes
        are seen anyway (version counters). Batches queued before still match
        if the layer reads the same rows for them."""
        self._stale = True

    def prefetch(self, input_ids: torch.Tensor) -> None:
        """Queues the gathers of the rows every layer will look up for
        ``input_ids`` [B, T]; returns at once."""
        if self._closed:
            raise RuntimeError("Prefetcher: closed")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"Prefetcher.prefetch: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        self._build_specs()
        if input_ids.device.type == "cpu" and input_ids.dtype == torch.int64 and input_ids.dim() == 2 \
                and self._hot is None:
            # One engine call: the workers hash too, off the caller's critical path.
            stale = self._queues.prefetch(input_ids)
            if stale:
                raise RuntimeError(f"Prefetcher: the specs of layers {stale} are stale right after being built")
            return
        for group in self._groups:  # the caller hashes: one ngram_hash call per group of layers
            first = self.layers[group[0]]
            hashed = ops.ngram_hash(input_ids, *self._stacked_params(group, input_ids.device), None,
                                    first.config.pad_id, first.config.hash)  # [L, B, T, K], no offsets
            hashed_cpu = None  # copied to the CPU only for a gather there (from an accelerator: a host sync)
            for i, index in enumerate(group):
                module, offsets = self._modules[index], self._copies[index][3]
                table = module.embedding.weight
                if self.transfer == "zero-copy" and input_ids.device.type == "cuda" and table.is_pinned():
                    ticket = zero_copy.gather(self._streams, table, hashed[i], module.offsets)
                else:
                    hashed_cpu = hashed.cpu() if hashed_cpu is None else hashed_cpu
                    dedup = self.dedup if self.dedup is not None else input_ids.device.type != "cpu"
                    cache = None if self._hot is None else self._hot.snapshot(
                        index, table, hashed_cpu[i], offsets, dedup, input_ids.device, self._logs[index].own_bumps)
                    ticket = self._pool.submit(table.detach(), hashed_cpu[i], table.is_pinned(), dedup, offsets,
                                               None if cache is None else cache.rows,
                                               None if cache is None or dedup else cache.data)
                    ticket.payload = cache
                self._queues.add(index, ticket, input_ids, hashed[i])

    def wait(self) -> None:
        """Blocks until every queued gather finished (errors are raised when the rows are used)."""
        for index in range(len(self.layers)):
            for ticket in self._queues.pending(index):
                _wait_quietly(ticket)

    def close(self) -> None:
        """Cancels queued gathers, joins the workers and detaches from the
        layers (they look up directly again). Idempotent."""
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

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ---- specs -------------------------------------------------------------------
    def _build_specs(self, only: Optional[int] = None) -> None:
        """Layer specs for the engine: copies (a worker must not read a buffer
        the caller may change meanwhile) of the hash parameters and offsets,
        watched by their version counters; all of them after a refresh(), else the stale ones."""
        indices = range(len(self.layers)) if self._stale else [only] if only is not None else self._queues.stale()
        if self._stale:
            self._stale = False
            self._watched = {m for layer in self.layers for m in (layer, layer.multi_head_embedding,
                                                                  layer.multi_head_embedding.embedding)}
        for index in indices:
            layer, module = self.layers[index], self._modules[index]
            table = module.embedding.weight
            watched = [layer.hash_lookup, layer.hash_keys, layer.hash_sizes, module.offsets]
            copies = tuple(t.detach().to("cpu", copy=True).contiguous() for t in watched)
            spec = _engine.LayerSpec(table, *copies[:3], layer.config.pad_id, layer.config.hash, copies[3],
                                     bool(self.dedup), False, watched) if table.device.type == "cpu" else \
                _engine.LayerSpec.skipped(table)
            self._queues.set_layer(index, spec)
            self._copies[index] = copies
        if indices:  # layers one ngram_hash call hashes: same family, pad, shapes and tokenizer map
            self._groups: List[List[int]] = []
            for index, layer in enumerate(self.layers):
                key = (layer.config.hash, layer.config.pad_id, *(c.shape for c in self._copies[index][:3]))
                group = next((g for g in self._groups if g[0] == key and torch.equal(
                    self._copies[g[1]][0], self._copies[index][0])), None)
                if group:
                    group.append(index)
                else:
                    self._groups.append([key, index])
            self._groups = [g[1:] for g in self._groups]

    def _stacked_params(self, group: List[int], device: torch.device) -> tuple:
        """A group's hash parameters (the specs' copies) stacked on `device`, built again when a spec is."""
        copies = [self._copies[i] for i in group]
        cached = self._stacked.get((group[0], device))
        if cached is None or len(cached[0]) != len(copies) or any(a is not b for a, b in zip(cached[0], copies)):
            cached = self._stacked[(group[0], device)] = (copies, (
                copies[0][0].to(device), torch.cat([c[1] for c in copies]).to(device),
                torch.cat([c[2] for c in copies]).to(device)))
        return cached[1]

    # ---- lookups and updates ---------------------------------------------------
    def _lookup(self, module, hash_ids: torch.Tensor, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight, index = module.embedding.weight, self._index[module]
        if weight.device.type != "cpu":
            self.stats.misses += 1
            return module.direct_forward(hash_ids)
        if self._stale:
            self._build_specs()
        found = Take.MISS
        if self.enabled:
            found, ticket = self._queues.take(index, input_ids, hash_ids)
            if found == Take.STALE:  # a hash parameter or the offsets changed in place
                self._build_specs(index)
                found, ticket = self._queues.take(index, input_ids, hash_ids)
        if found != Take.FOUND and not self._queues.current(index):
            self._build_specs(index)
        ids, offsets = hash_ids.to(weight.device), self._copies[index][3]
        if found != Take.FOUND:
            self.stats.misses += 1
            return module.lookup(weight, ids, offsets).to(hash_ids.device, non_blocking=True)
        return module.lookup(weight, ids, offsets, self._use(index, weight, ticket, hash_ids))

    def _use(self, index: int, weight, ticket, hash_ids: torch.Tensor) -> list:
        """A batch's staged rows, current and on hash_ids' device: [table[ids]]
        or [rows, inverse] (see engram.lookup.staged_rows)."""
        device, looked_up = hash_ids.device, hash_ids.numel()
        if ticket.kind == TaskKind.DEVICE_GATHER:
            staged, data = None, zero_copy.use(ticket, device)
        else:
            staged = ticket.wait()
            data = staged.staged
        rows = None if staged is None else staged.rows
        cache = None if staged is None else ticket.payload
        stats = self.stats
        stats.hits += 1
        stats.rows_looked_up += looked_up
        stats.rows_gathered += looked_up if rows is None else rows.numel()
        if cache is not None:
            stats.cache_lookups += looked_up
            stats.cache_hits += staged.cache_hits
        if rows is not None:
            data = data.to(device, non_blocking=True) if staged.slots is None else \
                _hot.assemble(rows, data, staged.slots, cache.data, device)
        log = self._logs[index]
        if log.updates or weight._version != ticket.table_version:
            data = self._catch_up(index, weight, ticket, hash_ids, rows, data)
        if rows is not None:
            return [data, staged.inverse.to(device, non_blocking=True)]
        return [data.to(device, non_blocking=True)]

    def _catch_up(self, index: int, weight, ticket, hash_ids, rows, staged):
        """Staged rows as the table holds them now: the recorded updates'
        rows read again, or everything after a change of unknown rows."""
        log = self._logs[index]
        foreign = (weight._version - ticket.table_version) - (log.own_bumps - ticket.own_bumps)
        changed = [r for epoch, r in log.updates if epoch > ticket.epoch]
        epochs = [t.epoch for t in self._queues.pending(index)]  # drop the records no pending batch needs
        log.updates = [(e, r) for e, r in log.updates if e > min(epochs, default=log.epoch)]
        if foreign == 0 and not changed:
            return staged
        table = weight.detach()
        ids = rows if rows is not None else hash_ids.to(table.device) + self._copies[index][3]
        if foreign != 0:
            self.stats.regathers += 1
            return table[ids].to(staged.device)
        changed = torch.cat(changed).to(table.device)
        if rows is not None:  # rows sorted: find the changed ones
            pos = torch.searchsorted(rows, changed)
            hit = pos < rows.numel()
            hit[hit.clone()] = rows[pos[hit]] == changed[hit]
            pos = pos[hit]
            staged[pos.to(staged.device)] = table[rows[pos]].to(staged.device)
        else:
            # Integer positions found on the table's device (the CPU): a boolean
            # mask sent to an accelerator would make index_put count it there, a host sync.
            pos = torch.isin(ids, changed).reshape(-1).nonzero().squeeze(1)
            flat = staged.view(-1, staged.shape[-1])
            flat[pos.to(staged.device, non_blocking=True)] = table[ids.reshape(-1)[pos]].to(staged.device,
                                                                                             non_blocking=True)
            pos = ids.reshape(-1)[pos]
        self.stats.patched_rows += int(torch.unique(pos).numel())
        return staged

    def _update_table(self, table: torch.Tensor, update, rows: torch.Tensor, patch: bool = False) -> None:
        """Runs a row-wise update of `table` after its gathers in flight and
        records the rows it changed. patch: its batches that were current
        before get those rows read again on a worker, overlapped with what
        follows, instead of at use on the critical path."""
        indices = [i for i, m in enumerate(self._modules) if m.embedding.weight is table]
        pending = [(i, t) for i in indices for t in self._queues.pending(i)]
        for _, ticket in pending:
            _wait_quietly(ticket)
        before, prior = table._version, {i: (self._logs[i].epoch, self._logs[i].own_bumps) for i in indices}
        update()
        changed = None
        for i in indices:
            log = self._logs[i]
            log.epoch, log.own_bumps = log.epoch + 1, log.own_bumps + table._version - before
            self._queues.set_counters(i, log.epoch, log.own_bumps)
            if any(j == i for j, _ in pending):
                log.updates.append((log.epoch, rows))
            if self._hot is not None:
                self._hot.mark_dirty(i, rows)
        for i, ticket in pending if patch else ():
            epoch, own_bumps = prior[i]
            # Only a batch with nothing else to catch up on (no earlier update,
            # no change of unknown rows) is brought up to date here.
            if ticket.epoch == epoch and before - ticket.table_version == own_bumps - ticket.own_bumps:
                changed = rows.detach().to("cpu").contiguous() if changed is None else changed
                log = self._logs[i]
                if self._pool.patch(ticket, table.detach(), changed, table._version, log.epoch, log.own_bumps):
                    self.stats.patched_batches += 1

    def _before_step(self, optimizer) -> None:
        """An optimizer is about to step: no gather of its tables may run
        while it writes them, and the rows of sparse gradients will change."""
        tables = {id(m.embedding.weight): m.embedding.weight for m in self._modules}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in tables:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    self._update_table(p, lambda: None, p.grad._indices()[0])
                else:  # a dense step bumps the version counter: gathered again
                    for i, m in enumerate(self._modules):
                        for ticket in self._queues.pending(i) if m.embedding.weight is p else ():
                            _wait_quietly(ticket)


def _wait_quietly(ticket) -> None:
    try:
        if ticket.kind == TaskKind.DEVICE_GATHER:
            ticket.payload.synchronize()  # the host waits: the table is about to be written
        ticket.wait()
    except Exception:  # reported when the rows are used
        pass
