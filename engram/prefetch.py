"""engram.Prefetcher: gathers the Engram rows of the next batch ahead of use.

Row ids depend only on the tokens, so the rows every Engram layer of a model
will read can be known before the model runs. ``Prefetcher(model)`` finds the
model's EngramLayers; ``prefetch(input_ids)`` queues, per layer, the hashing
of the batch, the deduplication of its rows and their gather from the table
into a staging buffer on the engine's worker threads (csrc/prefetch.h). With
int64 CPU ids that is one call into the engine (LayerQueues), and the workers
hash; otherwise the caller hashes all layers in one pass (one ``ngram_hash``
call per group of layers sharing a tokenizer map). When the layer later looks
up the same ids, it waits on its own gather only, and reads the staged rows;
any other ids are looked up directly. The model's code does not change::

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
  table's gathers in flight, then records the rows it changed; on the CPU
  path it has a worker read those rows again into every batch of the table
  that was current until then (the lookup waits for that too), so they are
  not read again at use;
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

The hot-row cache (``hot_rows``) keeps a copy of each table's most used rows:
where the layer computes for deduplicated gathers (cached rows are not
gathered; the use takes them from the copy), as a compact CPU tensor for
expanded ones (the worker copies them from it). Its order with updates:

* a recorded update (fused row-wise, or a sparse gradient's step) marks its
  rows dirty; the next ``prefetch`` copies them from the table into the
  cache before submitting any gather (none of that table runs then: the
  update waited for them, and none was submitted since);
* a change the prefetcher does not record (version counter) makes the next
  ``prefetch`` read the whole cache again;
* choosing the hot rows again (every ``hot_refresh`` batches) builds new
  tensors: a gather still running keeps reading its own snapshot;
* staged rows built from a snapshot are then brought up to date at use
  exactly like any staged row (above), so the cache never changes a result.

Only tables in CPU memory are prefetched (every placement on a CPU-only
machine; "host" and "mmap" on an accelerator, where the staged rows are then
copied to the device). Layers whose table is on an accelerator look up
directly.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

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
    key: torch.Tensor  # the layer's hash ids [B, T, K] (no offsets), on the ids' device
    offsets: torch.Tensor  # the layer's head offsets, on the CPU
    version: int  # table._version at submission
    epoch: int  # the prefetcher's update count of the table at submission
    own_bumps: int  # version bumps of those updates
    cache: Optional["_HotRows"] = None  # the hot-row cache snapshot the gather used
    result: Optional[tuple] = None  # the ticket's (rows, staged, inverse), once waited for
    # (input_ids, its version, the layer's _hash_state) at prefetch: a lookup
    # with that very tensor, unchanged, through an unchanged layer matches
    # without comparing ids (on an accelerator a comparison is a host sync)
    source: Optional[tuple] = None


@dataclass
class _TableLog:
    epoch: int = 0  # updates recorded
    own_bumps: int = 0  # the table's version bumps by them
    updates: List[tuple] = field(default_factory=list)  # (epoch after, rows)
    # (epoch, own_bumps) for the engine, which stamps them on its tickets
    counters: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))


class _Queued(NamedTuple):
    """A batch in the engine's queue of a layer (LayerQueues), as _pending_of lists it."""

    ticket: object
    epoch: int


@dataclass
class _HotRows:
    """One snapshot of a table's hot-row cache: rows [H] sorted (CPU), data =
    table[rows] on the cache's device, as of table version `version`."""

    rows: torch.Tensor
    data: torch.Tensor
    version: int
    own_bumps: int


@dataclass
class _HotState:
    """A table's cache and its (aged) LFU counts."""

    size: int  # rows to keep
    device: torch.device
    current: Optional[_HotRows] = None
    window: List[torch.Tensor] = field(default_factory=list)  # rows looked up since the last refresh
    seen_rows: Optional[torch.Tensor] = None  # rows counted before the window (sorted), and
    seen_counts: Optional[torch.Tensor] = None  # their counts, halved at every refresh
    dirty: List[torch.Tensor] = field(default_factory=list)  # rows updated since data was last synced


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


class _DeviceGather:
    """The future of a zero-copy gather: engram::gather_rows launched on the
    prefetcher's side stream, and the event recorded after it. Same interface
    as the engine's tickets; wait() blocks the host (used only before the
    table is written), the lookup instead makes its stream wait on the event."""

    def __init__(self, out: torch.Tensor, event) -> None:
        self.out, self.event = out, event

    def wait(self):
        self.event.synchronize()
        return None, self.out, None

    def ready(self) -> bool:
        return self.event.query()

    def slots(self):
        return None

    def cache_hits(self) -> int:
        return 0


def _hash_state(layer: EngramLayer) -> tuple:
    """Identity and version of what a layer's hash ids and rows depend on
    besides the tokens: equal states give equal rows for equal tokens."""
    offsets = layer.multi_head_embedding.offsets
    return tuple((id(t), t._version) for t in (layer.hash_lookup, layer.hash_keys, layer.hash_sizes, offsets)) + (
        layer.config.pad_id, layer.config.hash)


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

    ``hot_rows``: size of an optional hot-row cache per table, in rows (an
    int) or as a share of the table's rows (a float in (0, 1]); 0 (default)
    turns it off. The cache holds a copy of the table's most looked-up rows
    (LFU with aging: lookups are counted per row, the counts halve every
    ``hot_refresh`` prefetched batches, when the hot set is chosen again from
    the batches before) where the layer computes for deduplicated
    gathers (the accelerator: cached rows do not cross the link), or as a
    compact CPU tensor for expanded ones (hot rows read from it rather than
    from a large or file-backed table). It never changes a result: see the
    module docstring for its order with updates.

    ``transfer`` (CUDA only): how rows of a pinned host table reach the GPU.
    "staged" (default): worker threads gather them into pinned staging
    buffers, copied to the device at use. "zero-copy": a CUDA kernel
    (engram::gather_rows) reads them straight from host memory over UVA, on a
    side stream, with one event per layer and batch: the layer's stream waits
    on its own event only. Zero-copy needs a pinned table ("host"), gathers
    the lookup's rows as they are (no dedup) and uses no hot-row cache; other
    tables stay staged.

    ``worker_nice`` (Linux): the workers run as background threads
    (SCHED_BATCH, nice raised by this much; default 5), so that queuing a
    gather never preempts the model's compute and gathers take idle CPU time
    first; -1 keeps them ordinary threads.

    ``stats`` counts hits, misses, the rows moved and the cache's hits.
    ``enabled = False`` makes every lookup direct (the prefetched rows are
    then ignored)."""

    def __init__(self, model: nn.Module, num_threads: Optional[int] = None, dedup: Optional[bool] = None,
                 max_pending: int = 2, hot_rows=0, hot_refresh: int = 16, transfer: str = "staged",
                 worker_nice: int = 5) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Prefetcher: model must be an nn.Module, got {type(model).__name__}")
        self.layers: List[EngramLayer] = [m for m in model.modules() if isinstance(m, EngramLayer)]
        if not self.layers:
            raise ValueError(f"Prefetcher: {type(model).__name__} holds no EngramLayer")
        for layer in self.layers:
            if layer.multi_head_embedding.row_source is not None:
                raise ValueError("Prefetcher: a layer of this model already has a Prefetcher; close() it first")
        # Sharded tables (engram.distributed) are prefetched by their own part:
        # an id exchange and a remote gather ahead, not a local gather.
        distributed = sys.modules.get("engram.distributed")  # not imported: nothing is sharded
        sharded = [l for l in self.layers if distributed is not None
                   and isinstance(l.multi_head_embedding, distributed.ShardedMultiHeadEmbedding)]
        self.layers = [l for l in self.layers if not any(l is s for s in sharded)]
        if num_threads is None:
            num_threads = max(1, min(len(self.layers), (os.cpu_count() or 2) // 2))
        if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
            raise ValueError(f"Prefetcher: num_threads={num_threads!r}, expected a positive int")
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ValueError(f"Prefetcher: max_pending={max_pending!r}, expected a positive int")
        if dedup not in (None, True, False):
            raise ValueError(f"Prefetcher: dedup={dedup!r}, expected None, True or False")
        if isinstance(hot_rows, bool) or not (
            (isinstance(hot_rows, int) and hot_rows >= 0) or (isinstance(hot_rows, float) and 0 < hot_rows <= 1)
        ):
            raise ValueError(
                f"Prefetcher: hot_rows={hot_rows!r}, expected a row count >= 0 or a share of the table in (0, 1]"
            )
        if not isinstance(hot_refresh, int) or isinstance(hot_refresh, bool) or hot_refresh < 1:
            raise ValueError(f"Prefetcher: hot_refresh={hot_refresh!r}, expected a positive int (batches)")
        if transfer not in ("staged", "zero-copy"):
            raise ValueError(f"Prefetcher: transfer={transfer!r}, expected 'staged' or 'zero-copy'")
        self.dedup, self.max_pending, self.transfer = dedup, max_pending, transfer
        self._streams: Dict[torch.device, object] = {}
        self.hot_rows, self.hot_refresh = hot_rows, hot_refresh
        self._hot: Dict[int, _HotState] = {}  # id(table) -> its cache
        self._offsets: Dict[MultiHeadEmbedding, torch.Tensor] = {}
        if not isinstance(worker_nice, int) or isinstance(worker_nice, bool) or not -1 <= worker_nice <= 19:
            raise ValueError(f"Prefetcher: worker_nice={worker_nice!r}, expected -1 (ordinary threads) or 0..19")
        self._pool = _engine.GatherPool(num_threads, worker_nice)
        self._pending: Dict[MultiHeadEmbedding, List[_Pending]] = {}
        self._logs: Dict[int, _TableLog] = {}
        self._groups = self._group_layers()
        self._stacked: Dict[tuple, tuple] = {}
        # The CPU path's batches live in the engine, per layer (by index); see _set_queue_layer.
        self._index = {layer.multi_head_embedding: i for i, layer in enumerate(self.layers)}
        self._queues = _engine.LayerQueues(self._pool, len(self.layers), max_pending)
        self._queue_offsets: Dict[int, torch.Tensor] = {}  # the offsets each layer's spec adds
        self._queue_dedup = bool(dedup)
        self.stats = PrefetchStats()
        self.enabled = True
        self._closed = False
        self._sharded = distributed.ShardPrefetch(sharded, max_pending, self.stats) if sharded else None
        ref = weakref.ref(self)

        def lookup(module, hash_ids, input_ids=None):
            prefetcher = ref()
            if prefetcher is None or prefetcher._closed:
                return module.direct_forward(hash_ids)
            return prefetcher._lookup(module, hash_ids, input_ids)

        def before_update(table, update, rows):
            prefetcher = ref()
            # A table on an accelerator is never gathered (see _lookup), so
            # there is nothing to order; its rows may hold -1 padding.
            if prefetcher is None or prefetcher._closed or table.device.type != "cpu":
                return update()
            prefetcher._update_table(table, update, rows, patch=True)

        def sharded_lookup(module, hash_ids, input_ids=None):
            prefetcher = ref()
            if prefetcher is None or prefetcher._closed:
                return module.direct_forward(hash_ids)
            prefetcher._sharded.enabled = prefetcher.enabled
            return prefetcher._sharded.lookup(module, hash_ids)

        self._hook = lookup
        self._sharded_hook = sharded_lookup
        for layer in sharded:
            layer.multi_head_embedding.row_source = sharded_lookup
        self._listener_handles = []
        for layer in self.layers:
            layer.multi_head_embedding.row_source = lookup
            # Fused row-wise updates wait for this table's gathers and are recorded.
            self._listener_handles.append(layer.multi_head_embedding.add_update_listener(before_update))

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

    def _cpu_offsets(self, module: MultiHeadEmbedding) -> torch.Tensor:
        """The module's head offsets on the CPU (copied again if changed in place)."""
        cached = self._offsets.get(module)
        version = module.offsets._version
        if cached is None or cached[0] != version or cached[2] is not module.offsets:
            cached = self._offsets[module] = (version, module.offsets.detach().cpu().contiguous(), module.offsets)
        return cached[1]

    def _stacked_params(self, index: int, device: torch.device):
        """Group `index`'s hash parameters stacked on `device`, built again
        when a layer's change, and the layers' states (see _hash_state)."""
        group = self._groups[index]
        states = tuple(_hash_state(l) for l in group)
        cached = self._stacked.get((index, device))
        if cached is None or cached[1] != states:
            cached = self._stacked[(index, device)] = ((
                group[0].hash_lookup.to(device, copy=True),
                torch.cat([l.hash_keys for l in group]).to(device),
                torch.cat([l.hash_sizes for l in group]).to(device),
            ), states)
        return cached[0], states

    # ---- public API ----------------------------------------------------------
    def prefetch(self, input_ids: torch.Tensor) -> None:
        """Queues the gathers of the rows every layer will look up for
        ``input_ids`` [B, T]; returns at once. Each layer keeps the last
        ``max_pending`` prefetched batches not used yet (older ones are dropped)."""
        self._check_open()
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"Prefetcher.prefetch: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if self._sharded is not None:
            self._sharded.prefetch(input_ids)
            if not self.layers:
                return
        if (input_ids.device.type == "cpu" and input_ids.dtype == torch.int64 and input_ids.dim() == 2
                and not self.hot_rows):
            self._prefetch_hashing_on_workers(input_ids)
            return
        for index, group in enumerate(self._groups):
            (lookup, keys, sizes), states = self._stacked_params(index, input_ids.device)
            # Hash ids without the head offsets: they are what the layer's own
            # lookup receives (compared as is), and the worker adds the offsets.
            hashed = ops.ngram_hash(input_ids, lookup, keys, sizes, None, group[0].config.pad_id,
                                    group[0].config.hash)  # [L, B, T, K]
            hashed_cpu = None  # copied to the CPU only for a gather there (from an accelerator: a host sync)
            for i, layer in enumerate(group):
                module = layer.multi_head_embedding
                table = module.embedding.weight
                if table.device.type != "cpu":
                    continue  # on an accelerator: looked up directly
                log = self._log(table)
                dedup = self.dedup if self.dedup is not None else input_ids.device.type != "cpu"
                offsets = self._cpu_offsets(module)
                source = (input_ids, input_ids._version, states[i])
                if self.transfer == "zero-copy" and input_ids.device.type == "cuda" and table.is_pinned():
                    ticket = self._zero_copy(table, hashed[i], module.offsets)
                    queue = self._pending.setdefault(module, [])
                    queue.append(_Pending(ticket, False, hashed[i], offsets, table._version, log.epoch,
                                          log.own_bumps, source=source))
                    del queue[: -self.max_pending]
                    continue
                if hashed_cpu is None:
                    hashed_cpu = hashed.cpu()
                cache = self._hot_snapshot(table, hashed_cpu[i], offsets, dedup, input_ids.device)
                ticket = self._pool.submit(
                    table.detach(), hashed_cpu[i], table.is_pinned(), dedup, offsets,
                    None if cache is None else cache.rows,
                    None if cache is None or dedup else cache.data,
                )
                queue = self._pending.setdefault(module, [])
                queue.append(_Pending(ticket, dedup, hashed[i], offsets, table._version, log.epoch,
                                      log.own_bumps, cache, source=source))
                del queue[: -self.max_pending]

    def _prefetch_hashing_on_workers(self, input_ids: torch.Tensor) -> None:
        """The CPU path: each layer's hashing, as well as its gather, is queued
        on a worker, in one engine call for all layers (LayerQueues), so
        prefetch() only queues: the hash would otherwise be on the caller's
        critical path. The lookup matches its token ids there too (_lookup)."""
        if self._queue_dedup != bool(self.dedup):
            self._queue_dedup = bool(self.dedup)
            self._queues.clear()
        stale = self._queues.prefetch(input_ids)
        if stale:  # a layer's hash parameters, offsets or table changed (or first use)
            for index in stale:
                self._set_queue_layer(index)
            stale = self._queues.prefetch(input_ids)
            if stale:
                raise RuntimeError(f"Prefetcher: the specs of layers {stale} are stale right after being built")

    def _set_queue_layer(self, index: int) -> None:
        """Builds layer `index`'s spec for the engine: copies of its hash
        parameters and offsets (a worker must not read a buffer the caller may
        change meanwhile), watched so that a change of the originals, in place
        or by reassignment, makes the spec stale: until the next prefetch
        builds it again (dropping the batches queued with it), a lookup
        matches those batches by their hash ids."""
        layer = self.layers[index]
        module = layer.multi_head_embedding
        table = module.embedding.weight
        table_owners = [(module._modules, "embedding", module.embedding),
                        (module.embedding._parameters, "weight", table)]
        if table.device.type != "cpu":  # on an accelerator: looked up directly
            self._queues.set_layer(index, _engine.LayerSpec.skipped(table), [], table_owners)
            return
        watched = [layer.hash_lookup, layer.hash_keys, layer.hash_sizes, module.offsets]
        lookup, keys, sizes, offsets = (t.detach().to("cpu", copy=True).contiguous() for t in watched)
        spec = _engine.LayerSpec(table, lookup, keys, sizes, layer.config.pad_id, layer.config.hash, offsets,
                                 self._queue_dedup, False, watched, self._log(table).counters)
        owners = [(layer._buffers, name, t) for name, t in zip(("hash_lookup", "hash_keys", "hash_sizes"), watched)]
        owners.append((module._buffers, "offsets", module.offsets))
        self._queues.set_layer(index, spec, owners, table_owners)
        self._queue_offsets[index] = offsets

    def _zero_copy(self, table, hashed: torch.Tensor, offsets: torch.Tensor) -> _DeviceGather:
        """Launches the zero-copy gather of one layer on the side stream; no host sync."""
        device = hashed.device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the hash ids are computed there
        with torch.cuda.stream(stream):
            # Rows are in range by construction (hash mod each head's prime,
            # plus that head's offset), so the kernel's range check (a host
            # sync) is skipped.
            out = _ops.gather_rows(table.detach(), hashed + offsets, False)
            event = torch.cuda.Event()
            event.record(stream)
        hashed.record_stream(stream)  # allocated on the compute stream, read on the side stream
        return _DeviceGather(out, event)

    def wait(self) -> None:
        """Blocks until every queued gather finished (errors are raised when
        the rows are used)."""
        for queue in list(self._pending.values()):
            for pending in queue:
                _wait_quietly(pending.ticket)
        for index in range(len(self.layers)):
            for ticket in self._queues.pending(index):
                _wait_quietly(ticket)
        if self._sharded is not None:
            self._sharded.wait()

    def close(self) -> None:
        """Cancels queued gathers, joins the workers and detaches from the
        layers (they look up directly again). Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._step_hook.remove()
        self._queues.clear()
        self._pool.close()
        self._pending.clear()
        for handle in self._listener_handles:
            handle.remove()
        for layer in self.layers:
            if layer.multi_head_embedding.row_source is self._hook:
                layer.multi_head_embedding.row_source = None
        if self._sharded is not None:
            for module in self._sharded.modules:
                if module.row_source is self._sharded_hook:
                    module.row_source = None
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

    # ---- internals -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Prefetcher: closed")

    def _log(self, table: torch.Tensor) -> _TableLog:
        log = self._logs.get(id(table))
        if log is None:
            log = self._logs[id(table)] = _TableLog()
        return log

    def _update_table(self, table: torch.Tensor, update, rows: torch.Tensor, patch: bool = False) -> None:
        """Runs a row-wise update of `table` after its gathers in flight and
        records the rows it changed. patch (the update has run when this
        returns): the engine's batches of this table that were current before
        it get those rows read again on a worker, overlapped with what follows,
        instead of at use on the critical path."""
        pending = self._pending_of(table)
        for p in pending:
            _wait_quietly(p.ticket)
        log = self._log(table)
        before, epoch, own_bumps = table._version, log.epoch, log.own_bumps
        update()
        log.epoch += 1
        log.own_bumps += table._version - before
        log.counters[0], log.counters[1] = log.epoch, log.own_bumps
        if pending:
            log.updates.append((log.epoch, rows))
        if patch:
            changed = None
            for p in pending:
                ticket = p.ticket
                # Only a batch with nothing else to catch up on (no earlier
                # update, no change of unknown rows) is brought up to date here.
                if (isinstance(p, _Queued) and ticket.epoch == epoch
                        and before - ticket.table_version == own_bumps - ticket.own_bumps):
                    if changed is None:
                        changed = rows.detach().to("cpu").contiguous()
                    if self._pool.patch(ticket, table.detach(), changed, table._version, log.epoch, log.own_bumps):
                        self.stats.patched_batches += 1
        hot = self._hot.get(id(table))
        if hot is not None and hot.current is not None:
            # Copied into the cache before the next gather can read it (in
            # prefetch, see _hot_snapshot): no gather of this table runs now.
            hot.dirty.append(rows.detach().to("cpu"))

    # ---- hot-row cache -----------------------------------------------------------
    def _hot_size(self, table: torch.Tensor) -> int:
        if isinstance(self.hot_rows, float):
            return max(1, int(self.hot_rows * table.shape[0]))
        return min(self.hot_rows, table.shape[0])

    def _hot_snapshot(self, table, hashed: torch.Tensor, offsets: torch.Tensor, dedup: bool,
                      device: torch.device) -> Optional[_HotRows]:
        """The cache the gather of these ids may use, brought up to date with
        the table first; counts the ids and chooses the hot rows again every
        hot_refresh batches."""
        if not self.hot_rows:
            return None
        # Deduplicated gathers leave the cached rows to the consumer's device;
        # expanded ones copy them on the worker, so the cache is on the CPU.
        where = device if dedup else torch.device("cpu")
        hot = self._hot.get(id(table))
        if hot is None or hot.device != where:
            hot = self._hot[id(table)] = _HotState(self._hot_size(table), where)
        log = self._log(table)
        # Chosen from the batches before this one only: no look at the rows it serves.
        if len(hot.window) >= self.hot_refresh:
            # LFU with aging: the window's counts plus half the older ones; the
            # most looked-up rows win, ties to the lower row.
            rows, counts = torch.unique(torch.cat(hot.window), sorted=True, return_counts=True)
            counts = counts.double()
            hot.window.clear()
            if hot.seen_rows is not None:
                rows, inverse = torch.unique(torch.cat([hot.seen_rows, rows]), sorted=True, return_inverse=True)
                counts = torch.zeros(rows.numel(), dtype=torch.float64).index_add_(
                    0, inverse, torch.cat([hot.seen_counts * 0.5, counts]))
            order = torch.sort(counts, descending=True, stable=True).indices
            # Counts kept for 4x the cache's rows: room for rows on their way up.
            history = torch.sort(order[: 4 * hot.size]).values
            hot.seen_rows, hot.seen_counts = rows[history], counts[history]
            rows = torch.sort(rows[order[: hot.size]]).values
            # New tensors, never written in place: a gather still running may
            # read the old snapshot.
            hot.current = _HotRows(rows, self._read_rows(table, rows, where), table._version, log.own_bumps)
            hot.dirty.clear()
            self.stats.cache_refreshes += 1
        hot.window.append((hashed + offsets).reshape(-1))
        current = hot.current
        if current is None:
            return None
        if (table._version - current.version) != (log.own_bumps - current.own_bumps):
            # Changed by something other than a recorded update: read it all again.
            current = hot.current = _HotRows(current.rows, self._read_rows(table, current.rows, where),
                                             table._version, log.own_bumps)
            hot.dirty.clear()
        elif hot.dirty:
            # No gather of this table is running (the updates waited for them
            # and none was submitted since), so the data may change in place.
            changed = torch.cat(hot.dirty)
            hot.dirty.clear()
            pos = torch.searchsorted(current.rows, changed).clamp_(max=max(current.rows.numel() - 1, 0))
            found = current.rows.numel() > 0 and current.rows[pos] == changed
            if current.rows.numel() and bool(found.any()):
                pos, changed = pos[found], changed[found]
                current.data[pos.to(current.data.device)] = self._read_rows(table, changed, where)
            current.version, current.own_bumps = table._version, log.own_bumps
        else:
            current.version, current.own_bumps = table._version, log.own_bumps
        return current

    @staticmethod
    def _read_rows(table: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        return table.detach().index_select(0, rows).to(device)

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

    def _pending_of(self, table) -> list:
        """The batches prefetched for `table` and not used yet: _Pending (Python
        queues) and _Queued (the engine's); each has .ticket and .epoch."""
        found = [p for m, queue in self._pending.items() if m.embedding.weight is table for p in queue]
        for module, index in self._index.items():
            if module.embedding.weight is table:
                found += [_Queued(t, t.epoch) for t in self._queues.pending(index)]
        return found

    def _lookup(self, module: MultiHeadEmbedding, hash_ids: torch.Tensor,
                input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = module.embedding.weight
        if weight.device.type != "cpu":
            self.stats.misses += 1
            return module.direct_forward(hash_ids)
        grad = torch.is_grad_enabled() and weight.requires_grad
        pending = None
        if self.enabled:
            # The engine's queue first (the CPU path): one call matches the
            # token ids, waits, and says whether the rows are current.
            index = self._index[module]
            found, value = self._queues.take(index, input_ids)
            if found == _TAKE_CLEAN:  # value: table[ids] as the table holds it now
                stats, looked_up = self.stats, hash_ids.numel()
                stats.hits += 1
                stats.rows_looked_up += looked_up
                stats.rows_gathered += looked_up
                if not grad:
                    return value
                return module.lookup(weight, hash_ids, module.offsets, [value])
            if found == _TAKE_CHANGED:
                pending = self._queued_pending(index, value, hash_ids)
            elif found == _TAKE_COMPARE_HASH_IDS:
                pending = self._take_queued_by_hash_ids(index, hash_ids)
            if pending is None:
                pending = self._take(module, hash_ids, input_ids)
        if pending is None:
            self.stats.misses += 1
            # Past the check above the table is on the CPU; its offsets come from
            # the cached copy, not a device-to-host copy (a host sync) per lookup.
            ids, offsets = hash_ids.to(weight.device), self._cpu_offsets(module)
            return module.lookup(weight, ids, offsets).to(hash_ids.device, non_blocking=True)
        staged = self._use(weight, pending, hash_ids.device)
        return module.lookup(weight, hash_ids.to(weight.device), self._cpu_offsets(module), staged)

    def _queued_pending(self, index: int, ticket, hash_ids: torch.Tensor) -> _Pending:
        """A batch taken from the engine's queue (done), as _use takes it."""
        return _Pending(ticket, self._queue_dedup, hash_ids, self._queue_offsets[index], ticket.table_version,
                        ticket.epoch, ticket.own_bumps, result=ticket.wait())

    def _take_queued_by_hash_ids(self, index: int, hash_ids: torch.Tensor) -> Optional[_Pending]:
        """Token ids cannot decide (the layer's hash parameters or offsets
        changed since the batch was queued, or they are not int64 CPU ids):
        the queued batch whose hash ids, computed by its worker, equal these,
        if any, provided the offsets it added are the module's (every queued
        batch used the spec's: set_layer drops the others)."""
        used = self._queue_offsets.get(index)
        offsets = self.layers[index].multi_head_embedding.offsets.detach()
        if used is None or not torch.equal(used, offsets.to(used.device)):
            return None
        for ticket in self._queues.pending(index):
            try:
                ticket.wait()
            except Exception:  # the error is raised at use, if these are the ids
                self._queues.remove(index, ticket)
                raise
            key = ticket.hashed()
            if key.shape == hash_ids.shape and torch.equal(key, hash_ids.to(key.device)):
                self._queues.remove(index, ticket)
                return self._queued_pending(index, ticket, hash_ids)
        return None

    def _take(self, module: MultiHeadEmbedding, hash_ids: torch.Tensor,
              input_ids: Optional[torch.Tensor] = None) -> Optional[_Pending]:
        """Removes and returns the pending gather (Python queues) of these hash ids, if any."""
        queue = self._pending.get(module)
        if not queue:
            return None
        if input_ids is not None:
            # The very token tensor given to prefetch, unchanged, through an
            # unchanged layer: the same hash ids, without comparing them.
            state = None
            for index, pending in enumerate(queue):
                source = pending.source
                if source is not None and source[0] is input_ids and source[1] == input_ids._version:
                    if state is None:
                        state = _hash_state(self.layers[self._index[module]])
                    if source[2] == state:
                        del queue[index]
                        return pending
        for index, pending in enumerate(queue):
            if pending.key.shape == hash_ids.shape and torch.equal(pending.key, hash_ids):
                del queue[index]
                return pending
        return None

    def _use(self, weight, pending: _Pending, device: torch.device) -> list:
        """The staged rows of a pending gather, current and on `device`:
        [table[ids]] or [rows, inverse] (see engram.lookup.staged_rows)."""
        if isinstance(pending.ticket, _DeviceGather):
            # The layer's stream waits on this layer's gather only; the host does not.
            stream = torch.cuda.current_stream(device)
            stream.wait_event(pending.ticket.event)
            pending.ticket.out.record_stream(stream)  # allocated on the side stream
            rows, data, inverse = None, pending.ticket.out, None
        else:
            # Raises a worker's error here.
            rows, data, inverse = pending.result if pending.result is not None else pending.ticket.wait()
        stats = self.stats
        stats.hits += 1
        stats.rows_looked_up += pending.key.numel()
        stats.rows_gathered += rows.numel() if pending.dedup else pending.key.numel()
        if pending.cache is not None:
            stats.cache_lookups += pending.key.numel()
            stats.cache_hits += pending.ticket.cache_hits()
        if pending.dedup:
            slots = pending.ticket.slots()
            if slots is not None:  # cached rows were not gathered: take them from the cache
                data = self._assemble(rows, data, slots, pending.cache.data, device)
            else:
                data = data.to(device, non_blocking=True)
        log = self._log(weight)
        if log.updates or weight._version != pending.version:
            data = self._refresh(weight, pending, rows, data)
            if log.updates:
                self._trim(weight)
        if pending.dedup:
            return [data, inverse.to(device, non_blocking=True)]
        return [data.to(device, non_blocking=True)]

    @staticmethod
    def _assemble(rows, misses, slots, cache_data, device) -> torch.Tensor:
        """[U, Dh] on `device`: the cache's rows where slots >= 0, else the gathered ones in order."""
        data = torch.empty((rows.numel(), misses.shape[1]), dtype=misses.dtype, device=device)
        hit = slots >= 0
        hit_pos, miss_pos = hit.nonzero().squeeze(1), (~hit).nonzero().squeeze(1)  # on the CPU: no sync
        data[miss_pos.to(device, non_blocking=True)] = misses.to(device, non_blocking=True)
        data[hit_pos.to(device, non_blocking=True)] = cache_data[slots[hit].to(cache_data.device, non_blocking=True)]
        return data

    def _refresh(self, weight, pending: _Pending, rows, staged):
        """Staged rows as the table holds them now (see the module docstring).
        staged may be on another device than the table."""
        log = self._log(weight)
        foreign = (weight._version - pending.version) - (log.own_bumps - pending.own_bumps)
        changed = [r for epoch, r in log.updates if epoch > pending.epoch]
        if foreign == 0 and not changed:
            return staged
        table = weight.detach()
        ids = rows if pending.dedup else (pending.key.to(table.device) + pending.offsets)
        if foreign != 0:
            self.stats.regathers += 1
            return table[ids].to(staged.device)
        changed = torch.cat(changed).to(table.device)
        if pending.dedup:  # rows sorted: find the changed ones
            pos = torch.searchsorted(rows, changed)
            hit = pos < rows.numel()
            hit[hit.clone()] = rows[pos[hit]] == changed[hit]
            pos = pos[hit]
            staged[pos.to(staged.device)] = table[rows[pos]].to(staged.device)
        else:
            # Integer positions found on the table's device (the CPU): a boolean
            # mask sent to an accelerator would make index_put count it there,
            # a host sync.
            pos = torch.isin(ids, changed).reshape(-1).nonzero().squeeze(1)
            flat = staged.view(-1, staged.shape[-1])
            flat[pos.to(staged.device, non_blocking=True)] = table[ids.reshape(-1)[pos]].to(staged.device,
                                                                                             non_blocking=True)
            pos = ids.reshape(-1)[pos]
        self.stats.patched_rows += int(torch.unique(pos).numel())
        return staged

    def _trim(self, weight) -> None:
        """Drops the update records no pending gather of this table needs."""
        log = self._log(weight)
        epochs = [p.epoch for p in self._pending_of(weight)]
        oldest = min(epochs) if epochs else log.epoch
        log.updates = [(e, r) for e, r in log.updates if e > oldest]


# LayerQueues.take's answers (csrc/prefetch.h, LayerQueues::Take).
_TAKE_MISS, _TAKE_CLEAN, _TAKE_CHANGED, _TAKE_COMPARE_HASH_IDS = 0, 1, 2, 3


def _wait_quietly(ticket) -> None:
    try:
        ticket.wait()
    except Exception:  # reported when the rows are used
        pass
