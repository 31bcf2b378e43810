"""Engram tables row-sharded over torch.distributed (paper §2.5).

A paper-scale table (Engram-27B: 5.7 B parameters) does not fit one device.
:func:`shard_tables` splits every Engram table of a model row-wise across the
ranks of a process group; each rank keeps only its rows (and, once
:func:`engram.optim.make_rowwise` is called on the sharded model, only those
rows' optimizer state). A lookup then costs three ``all_to_all_single`` calls
per table and step: the per-owner counts, the requested row ids, the rows
back. The backward pass sends each owner the summed gradients of the rows it
owns (one more ``all_to_all_single``) and the owner applies the fused row-wise
update. No collective ever carries the whole table, and no rank ever holds a
table-shaped gradient.

Layout: rank ``r`` of ``W`` owns the contiguous rows
``[r * c, min((r + 1) * c, R))`` with ``c = ceil(R / W)``, the split of
``torch.chunk`` and of DTensor's ``Shard(0)``, so a shard is a DTensor local
shard as is and ``torch.distributed.checkpoint`` reshards it (see
:func:`save` / :func:`load`). Any world size works; the last shards may be
shorter or empty.

Gradients: the exchange assumes data parallelism over the same group, each
rank's loss being the mean over its own batch (as with DDP). The owner
therefore averages the ranks' contributions (``average_gradients=True``,
DDP's convention), so training equals one process at the global batch.
"""

from __future__ import annotations

import collections
import datetime
import functools
import hashlib
import json
import math
import operator
import os
import queue
import shutil
import threading
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .layer import EngramLayer, MultiHeadEmbedding, TableFileChangedError, file_change, file_identity

__all__ = [
    "shard_tables",
    "row_range",
    "init_rows",
    "init_table_",
    "ShardedMultiHeadEmbedding",
    "sharded_tables",
    "ddp_ignore_tables",
    "gather_table",
    "state_dict",
    "load_state_dict",
    "save",
    "load",
    "fingerprint",
]

# Rows generated per random stream by init_rows: a shard boundary inside a block
# costs at most one block of extra draws on each side.
INIT_BLOCK_ROWS = 4096


def row_range(num_rows: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of the rows rank ``rank`` owns in a table of ``num_rows``
    rows split over ``world_size`` ranks (torch.chunk's / DTensor Shard(0)'s split)."""
    if not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"row_range: num_rows={num_rows!r}; expected an int >= 0")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"row_range: world_size={world_size!r}; expected an int >= 1")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"row_range: rank={rank!r}; expected an int in [0, {world_size})")
    chunk = -(-num_rows // world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def _block_seed(seed: int, salt: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{salt}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes < 2**63 on every build


def init_rows(seed: int, start: int, stop: int, dim: int, dtype: torch.dtype = torch.float32,
              salt: int = 0) -> torch.Tensor:
    """Rows [start, stop) of a table of width ``dim`` initialised N(0, 1) (nn.Embedding's
    rule) by global row: the values of a row depend only on (seed, salt, row), never on
    which rank or shard generates it. ``salt`` tells tables apart (shard_tables uses the
    table's index in the model)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"init_rows: seed={seed!r}; expected an int >= 0")
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
        raise ValueError(f"init_rows: start={start!r}, stop={stop!r}; expected ints with 0 <= start <= stop")
    out = torch.empty((stop - start, dim), dtype=dtype)
    b = start // INIT_BLOCK_ROWS
    while b * INIT_BLOCK_ROWS < stop:
        gen = torch.Generator().manual_seed(_block_seed(seed, salt, b))
        block = torch.randn((INIT_BLOCK_ROWS, dim), generator=gen, dtype=dtype)
        lo, hi = max(start, b * INIT_BLOCK_ROWS), min(stop, (b + 1) * INIT_BLOCK_ROWS)
        out[lo - start:hi - start] = block[lo - b * INIT_BLOCK_ROWS:hi - b * INIT_BLOCK_ROWS]
        b += 1
    return out


@torch.no_grad()
def init_table_(model: nn.Module, seed: int) -> None:
    """Initialise every (unsharded) Engram table of ``model`` by global row, as
    ``shard_tables(model, init_seed=seed)`` does at any world size."""
    for salt, (_, module) in enumerate(_tables(model)):
        weight = module.embedding.weight
        weight.copy_(init_rows(seed, 0, weight.shape[0], weight.shape[1], weight.dtype, salt))


def _tables(model: nn.Module) -> List[Tuple[str, MultiHeadEmbedding]]:
    if isinstance(model, MultiHeadEmbedding):
        return [("", model)]
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadEmbedding)]


def sharded_tables(model: nn.Module) -> List["ShardedMultiHeadEmbedding"]:
    """The sharded Engram tables of ``model``, in module order."""
    return [m for _, m in _tables(model) if isinstance(m, ShardedMultiHeadEmbedding)]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _table_record(name: str, module: MultiHeadEmbedding, layer: Optional[EngramLayer]) -> dict:
    """What a table's rows mean: shape, heads and (if its layer is known) the hash
    configuration and a fingerprint of the tokenizer compression."""
    rows = module.num_rows if isinstance(module, ShardedMultiHeadEmbedding) else module.embedding.weight.shape[0]
    record = {
        "name": name,
        "rows": int(rows),
        "dim": int(module.embedding.weight.shape[1]),
        "dtype": str(module.embedding.weight.dtype),
        "offsets": [int(o) for o in module.offsets.tolist()],
    }
    if layer is not None:
        record.update(layer_id=layer.layer_id, hash=layer.config.hash, pad_id=layer.config.pad_id,
                      hash_keys=_digest(layer.hash_keys), hash_sizes=_digest(layer.hash_sizes),
                      compression=_digest(layer.hash_lookup))
    return record


def _layers_by_table(model: nn.Module) -> Dict[int, EngramLayer]:
    return {id(m.multi_head_embedding): m for m in model.modules() if isinstance(m, EngramLayer)}


def fingerprint(model: nn.Module) -> List[dict]:
    """One record per Engram table of ``model`` (sharded or not): its global shape,
    head offsets, hash family, pad id and digests of the hash keys and of the
    tokenizer compression's lookup table. Checkpoints store it; loads compare it."""
    layers = _layers_by_table(model)
    return [_table_record(name, m, layers.get(id(m))) for name, m in _tables(model)]


# --------------------------------------------------------------------------
# the exchange
# --------------------------------------------------------------------------


class _Exchange:
    """One lookup's routing: which unique rows this rank asked each owner for,
    which rows each rank asked this rank for; reused by the backward pass."""

    __slots__ = ("unique", "inverse", "send_splits", "recv_splits", "recv_local")


def _collective(module: "ShardedMultiHeadEmbedding", what: str, fn, *args, group=None):
    """Runs a collective on ``group`` (default: the table's); a peer that died or
    raised (so never joined) becomes an error naming the layer and the group's
    timeout instead of a bare gloo/NCCL one."""
    try:
        fn(*args, group=module.group if group is None else group)
    except RuntimeError as err:
        raise RuntimeError(
            f"engram.distributed: the {what} exchange of table {module.table_name!r} failed on rank "
            f"{module.rank} of {module.world_size} (a peer rank died, raised or did not reach this step within "
            f"the process group's timeout): {err}"
        ) from err


# Error records exchanged with the counts (forward) or alone (before an mmap
# shard's update): [kind, value, recorded file size, current file size].
_OK, _BAD_ID, _FILE = 0, 1, 2
_FILE_CHANGES = ("removed", "replaced", "truncated", "resized")


def _file_record(module: "ShardedMultiHeadEmbedding") -> Tuple[Optional[str], List[int]]:
    """This rank's shard file check: (its error message or None, its error record)."""
    if module.placement != "mmap":
        return None, [_OK, 0, 0, 0]
    now = file_identity(module.table_path)
    change = file_change(module._file_id, now)
    if change is None:
        return None, [_OK, 0, 0, 0]
    return change, [_FILE, _FILE_CHANGES.index(change), module._file_id[2], -1 if now is None else now[2]]


def _raise_flagged(module: "ShardedMultiHeadEmbedding", recv: torch.Tensor, when: str) -> None:
    """Raises on every rank if any rank flagged an error: each rank gets the same
    records, so no rank goes on to a collective that the others skip."""
    kinds = recv[:, 0].tolist()
    if not any(kinds):
        return
    where = f"engram.distributed: table {module.table_name!r} (layer_id={module.layer_id})"
    if kinds[module.rank] == _FILE:  # this rank's own file: the full story, path included
        own = module.table_file_problem(when) or f"the mmap shard file {module.table_path!r} changed"
        raise TableFileChangedError(
            f"{own} ({where}, rank {module.rank} of {module.world_size}; every rank "
            f"raises an error)")
    src = next(r for r, k in enumerate(kinds) if k)
    value, recorded, now = (int(v) for v in recv[src, 1:])
    if kinds[src] == _BAD_ID:
        raise ValueError(
            f"{where}: rank {src} looked up hash id {value}, out of range for its head (head sizes "
            f"{module.head_sizes}); every rank raises this error"
        )
    raise TableFileChangedError(
        f"{where}: rank {src}'s mmap shard file was {_FILE_CHANGES[value]} while in use (found before {when}): "
        f"{recorded} bytes when opened, {'none' if now < 0 else f'{now} bytes'} now; rank {src}'s error names the "
        f"file; every rank raises this error, and nothing was read or written"
    )


def _check_before_update(module: "ShardedMultiHeadEmbedding", device) -> None:
    """Before an mmap shard's gradients are exchanged (and its rows written): one
    small exchange of the ranks' file checks, so a changed file stops every rank."""
    _, record = _file_record(module)
    send = torch.tensor([record] * module.world_size, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    _collective(module, "file check", dist.all_to_all_single, recv, send)
    _raise_flagged(module, recv, "a row-wise update")


def _records_to_send(module: "ShardedMultiHeadEmbedding", first_column, bad: Optional[int], device) -> torch.Tensor:
    """[W, 5]: column 0 per rank (counts, or a prefetch's index), columns 1-4
    this rank's error record (0 in column 0 then), the same for every rank."""
    send = torch.zeros((module.world_size, 5), dtype=torch.int64, device=device)
    send[:, 0] = first_column
    _, record = _file_record(module)
    if bad is not None and record[0] == _OK:
        record = [_BAD_ID, bad, 0, 0]
    if record[0] != _OK:
        send[:, 0] = 0
        send[:, 1:] = torch.tensor(record, dtype=torch.int64)
    return send


def _exchange_ids(module: "ShardedMultiHeadEmbedding", global_ids: torch.Tensor, bad: Optional[int],
                  group=None) -> _Exchange:
    world, device = module.world_size, global_ids.device
    ex = _Exchange()
    ex.unique, ex.inverse = torch.unique(global_ids.reshape(-1), sorted=True, return_inverse=True)
    # Owners of sorted rows are non-decreasing: the per-owner runs are contiguous.
    owner = torch.bucketize(ex.unique, module.shard_starts[1:].to(device), right=True)
    send_counts = torch.bincount(owner, minlength=world)
    # Columns 1-4 carry an error record (an out-of-range id, or this rank's mmap
    # shard file changed), so that every rank raises on an error only one rank
    # saw (no rank waits forever).
    send = _records_to_send(module, send_counts, bad, device)
    recv = torch.empty_like(send)
    _collective(module, "count", dist.all_to_all_single, recv, send, group=group)
    _raise_flagged(module, recv[:, 1:], "a lookup")
    ex.send_splits = send_counts.tolist()
    ex.recv_splits = recv[:, 0].tolist()
    recv_ids = torch.empty(sum(ex.recv_splits), dtype=torch.int64, device=device)
    _collective(module, "id", dist.all_to_all_single, recv_ids, ex.unique, ex.recv_splits, ex.send_splits,
                group=group)
    ex.recv_local = recv_ids - module.row_start
    return ex


class _ShardedLookup(torch.autograd.Function):
    """Forward: dedup, route ids to owners, gather, route rows back. Backward: sum
    per unique row, route row gradients to owners, sum there in (source rank,
    row) order, then the fused row-wise update (or a sparse local gradient)."""

    @staticmethod
    def forward(ctx, weight, global_ids, module, ex, rows=None):
        # rows: what this rank owes the others, gathered ahead by a prefetcher.
        rows = (module.gather_local(ex.recv_local) if rows is None else rows).to(global_ids.device)
        got = rows.new_empty((ex.unique.numel(), weight.shape[1]))
        _collective(module, "row", dist.all_to_all_single, got, rows, ex.send_splits, ex.recv_splits)
        ctx.module, ctx.ex = module, ex
        ctx.save_for_backward(global_ids)
        return got.index_select(0, ex.inverse).reshape(*global_ids.shape, weight.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        module, ex = ctx.module, ctx.ex
        (global_ids,) = ctx.saved_tensors
        dim = grad.shape[-1]
        if module.placement == "mmap":  # every rank's shard is mmap: shard_tables checked
            _check_before_update(module, grad.device)
        # Summed per unique row in entry order; rows come back sorted, i.e. == ex.unique.
        _, row_grads = torch.ops.engram.dedup_row_grads(grad.contiguous(), global_ids, None, module.num_rows)
        recv = row_grads.new_empty((len(ex.recv_local), dim))
        _collective(module, "gradient", dist.all_to_all_single, recv, row_grads.contiguous(), ex.recv_splits,
                    ex.send_splits)
        weight = module.embedding.weight
        rows, sums = torch.ops.engram.dedup_row_grads(
            recv.unsqueeze(1), ex.recv_local.unsqueeze(1), None, max(weight.shape[0], 1))
        rows, sums = rows.to(weight.device), sums.to(weight.device, weight.dtype)
        if module.average_gradients and module.world_size > 1:
            sums = sums / module.world_size
        optimizer = _fused_optimizer(module)
        if optimizer is not None:
            # Through the listeners: a prefetcher patches the rows it staged.
            module.run_table_update(lambda: optimizer.update(weight, rows, sums), rows)
            return None, None, None, None, None
        # rows are strictly increasing: already a coalesced COO tensor.
        grad_weight = torch.sparse_coo_tensor(rows[None], sums, weight.shape, is_coalesced=True,
                                              check_invariants=False)
        return grad_weight, None, None, None, None


def _fused_optimizer(module):
    optimizer = module.table_optimizer
    return optimizer if optimizer is not None and optimizer.fused_backward else None


class ShardedMultiHeadEmbedding(MultiHeadEmbedding):
    """A MultiHeadEmbedding holding rows [row_start, row_stop) of a table of
    num_rows rows sharded over ``group``; made by :func:`shard_tables`.
    ``embedding.weight`` is the local shard."""

    def gather_local(self, local_rows: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight
        with torch.no_grad():
            return weight.index_select(0, local_rows.to(weight.device))

    def forward(self, hash_ids: torch.Tensor, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # No local file check here (the base class's): a sharded lookup checks
        # in its first exchange, so that every rank raises.
        if self.row_source is not None:
            return self.row_source(self, hash_ids, input_ids)
        return self.direct_forward(hash_ids)

    def global_ids(self, hash_ids: torch.Tensor) -> Tuple[torch.Tensor, Optional[int]]:
        """(hash_ids + head offsets, the first out-of-range hash id or None)."""
        if hash_ids.dtype != torch.int64 or hash_ids.dim() < 1 or hash_ids.shape[-1] != len(self.head_sizes):
            raise ValueError(
                f"engram.distributed: table {self.table_name!r}: hash_ids is a {hash_ids.dtype} tensor of shape "
                f"{list(hash_ids.shape)}; expected int64 [..., {len(self.head_sizes)}]"
            )
        sizes = torch.tensor(self.head_sizes, device=hash_ids.device)
        out_of_range = (hash_ids < 0) | (hash_ids >= sizes)
        bad = int(hash_ids[out_of_range][0]) if bool(out_of_range.any()) else None
        return hash_ids + self.offsets.to(hash_ids.device), bad

    def direct_forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        global_ids, bad = self.global_ids(hash_ids)
        return self.exchanged_lookup(global_ids, _exchange_ids(self, global_ids, bad))

    def exchanged_lookup(self, global_ids: torch.Tensor, ex: _Exchange, rows=None) -> torch.Tensor:
        """The lookup once the ids are exchanged (now, or ahead by a prefetcher
        that also gathered ``rows``): the rows' exchange, then autograd."""
        weight = self.embedding.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return _ShardedLookup.apply(weight, global_ids, self, ex, rows)
        with torch.no_grad():
            return _ShardedLookup.forward(_NoCtx(), weight, global_ids, self, ex, rows)

    def extra_repr(self) -> str:
        return (f"rows={self.row_start}:{self.row_stop} of {self.num_rows}, rank={self.rank}/{self.world_size}, "
                f"placement={self.placement!r}")


# Prefetched batches a lookup can choose from (a bit each in one int64).
_MASK_BITS = 62


class _Staged:
    """One sharded lookup prefetched: its ids exchanged on the prefetch group
    and the rows this rank owes the others gathered, by the prefetch thread.
    ``version`` / ``log_at``: the shard's version and update-log length just
    before the gather, to find the rows updated since."""

    __slots__ = ("hash_ids", "global_ids", "bad", "done", "ex", "rows", "version", "log_at", "error")

    def __init__(self, hash_ids, global_ids, bad):
        self.hash_ids, self.global_ids, self.bad = hash_ids, global_ids, bad
        self.done, self.ex, self.rows, self.version, self.log_at, self.error = threading.Event(), None, None, 0, 0, None


class ShardPrefetch:
    """engram.Prefetcher's part for sharded tables (made by it; collective:
    every rank of the tables' group builds it, and then prefetches and looks
    up the same sequence of batches, each its own).

    ``prefetch`` hashes a batch and queues, on one background thread, the id
    exchange (counts, then ids) and the owner-side gather of the requested rows
    on a process group of its own, so that it never queues behind DDP's
    all-reduces or the lookups' own exchanges. A lookup then costs one small
    exchange (every rank's choice of prefetched batch and its error record, in
    the place of the counts) and the rows' exchange. Rows updated in between
    (fused row-wise updates, seen through the module's update listener) are
    gathered again at use; any other change of the shard (a torch.optim step,
    a load) regathers them all (version counter).
    """

    def __init__(self, layers: Sequence[EngramLayer], max_pending: int, stats=None) -> None:
        self.modules = [layer.multi_head_embedding for layer in layers]
        self.max_pending, self.stats, self.enabled = max_pending, stats, True
        self._hash = {layer.multi_head_embedding: layer.hash for layer in layers}
        self._groups: Dict[int, object] = {}
        self._group_of = {}
        for module in self.modules:
            key = id(module.group)
            if key not in self._groups:  # new_group is collective: the same order on every rank
                kwargs = {} if module.exchange_timeout is None else {"timeout": module.exchange_timeout}
                self._groups[key] = dist.new_group(ranks=dist.get_process_group_ranks(module.group),
                                                   backend=dist.get_backend(module.group), **kwargs)
            self._group_of[module] = self._groups[key]
        self._pending = {m: collections.deque() for m in self.modules}
        # Per module: fused updates as (version before, version after, rows); log_base: entries dropped.
        self._log = {m: [] for m in self.modules}
        self._log_base = {m: 0 for m in self.modules}
        self._lock = threading.Lock()
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._handles = [m.add_update_listener(self._listener(m)) for m in self.modules]
        self._thread = threading.Thread(target=self._run, name="engram-shard-prefetch", daemon=True)
        self._thread.start()

    @classmethod
    def split(cls, prefetcher, max_pending: int) -> Optional["ShardPrefetch"]:
        """Takes the sharded layers out of ``prefetcher.layers`` (its local
        gathers never see them) and serves their lookups; None if none is sharded."""
        sharded = [l for l in prefetcher.layers if isinstance(l.multi_head_embedding, ShardedMultiHeadEmbedding)]
        if not sharded:
            return None
        prefetcher.layers[:] = [l for l in prefetcher.layers if not any(l is s for s in sharded)]
        prefetcher._modules[:] = [l.multi_head_embedding for l in prefetcher.layers]
        part, owner = cls(sharded, max_pending, prefetcher.stats), weakref.ref(prefetcher)

        def lookup(module, hash_ids, input_ids=None):
            live = owner()
            if live is None or live._closed:
                return module.direct_forward(hash_ids)
            part.enabled = live.enabled
            return part.lookup(module, hash_ids)

        part._hook = lookup
        for module in part.modules:
            module.row_source = lookup
        return part

    def _listener(self, module):
        def before_update(table, update, rows):
            before = table._version
            update()
            with self._lock:
                self._log[module].append((before, table._version, rows))
        return before_update

    def prefetch(self, input_ids: torch.Tensor) -> None:
        for module in self.modules:
            hash_ids = self._hash[module](input_ids)
            global_ids, bad = module.global_ids(hash_ids)
            staged = _Staged(hash_ids, global_ids, bad)
            pending = self._pending[module]
            pending.append(staged)
            while len(pending) > self.max_pending:  # every rank drops the same one
                pending.popleft()
            self._jobs.put((module, staged))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            module, staged = job
            try:
                ex = _exchange_ids(module, staged.global_ids, staged.bad, group=self._group_of[module])
                with self._lock:
                    staged.version = module.embedding.weight._version
                    staged.log_at = self._log_base[module] + len(self._log[module])
                staged.rows, staged.ex = module.gather_local(ex.recv_local), ex
            except BaseException as err:  # raised at use (or the lookup is done directly)
                staged.error = err
            finally:
                staged.done.set()

    def lookup(self, module: "ShardedMultiHeadEmbedding", hash_ids: torch.Tensor) -> torch.Tensor:
        pending = self._pending[module]
        # This rank's usable prefetched batches (those of its ids), as a bit mask.
        mask = 0
        for i, staged in enumerate(list(pending)[:_MASK_BITS] if self.enabled else []):
            if staged.hash_ids.shape == hash_ids.shape and torch.equal(staged.hash_ids, hash_ids):
                staged.done.wait()
                if isinstance(staged.error, RuntimeError) and "exchange of table" in str(staged.error):
                    raise staged.error  # a peer died or timed out on the prefetch group
                if staged.error is None:  # else (a bad id, a changed file) the direct lookup raises it everywhere
                    mask |= 1 << i
        global_ids, bad = module.global_ids(hash_ids)
        # Every rank's mask, with the error records: all ranks use the first
        # batch usable on every rank (one index: the same exchange), or all look
        # up directly.
        send = _records_to_send(module, mask, bad, hash_ids.device)
        recv = torch.empty_like(send)
        _collective(module, "prefetch choice", dist.all_to_all_single, recv, send)
        _raise_flagged(module, recv[:, 1:], "a lookup")
        common = functools.reduce(operator.and_, recv[:, 0].tolist())
        if common == 0:
            if self.stats is not None:
                self.stats.misses += 1
            return module.direct_forward(hash_ids)
        index = (common & -common).bit_length() - 1
        staged = pending[index]
        for _ in range(index + 1):
            pending.popleft()
        rows = self._current_rows(module, staged)
        if self.stats is not None:
            self.stats.hits += 1
            self.stats.rows_looked_up += hash_ids.numel()
            self.stats.rows_gathered += int(staged.ex.unique.numel())
        return module.exchanged_lookup(global_ids, staged.ex, rows)

    def _current_rows(self, module, staged: _Staged) -> torch.Tensor:
        """The staged rows, with those updated since the gather read again."""
        with self._lock:
            log, base = self._log[module], self._log_base[module]
            updates = log[staged.log_at - base:]
            # Entries no prefetched batch can need any more go.
            keep = min([s.log_at for s in self._pending[module] if s.done.is_set()] + [base + len(log)])
            del log[: keep - base]
            self._log_base[module] = keep
        weight, rows, ex = module.embedding.weight, staged.rows, staged.ex
        expected, changed, untracked = staged.version, [], False
        for before, after, updated in updates:
            if before != expected:  # a change in between that no listener saw
                untracked = True
                break
            expected = after
            changed.append(updated)
        if untracked or weight._version != expected:  # changed by other means than a fused update: all again
            if self.stats is not None:
                self.stats.regathers += 1
            return module.gather_local(ex.recv_local)
        if changed:
            local = ex.recv_local.to(weight.device)
            # A fused update's rows are sorted and unique: a binary search each
            # (several updates: merged first).
            updated = changed[0] if len(changed) == 1 else torch.unique(torch.cat(changed))
            updated = updated.to(weight.device)
            at = torch.searchsorted(updated, local).clamp_(max=max(updated.numel() - 1, 0))
            stale = (updated[at] == local).nonzero().squeeze(1) if updated.numel() else local[:0]
            if stale.numel():
                rows[stale.to(rows.device)] = module.gather_local(local[stale]).to(rows.device)
                if self.stats is not None:
                    self.stats.patched_rows += int(stale.numel())
        return rows

    def wait(self) -> None:
        for pending in self._pending.values():
            for staged in list(pending):
                staged.done.wait()

    def close(self) -> None:
        """Stops the thread after the queued exchanges (the peers run them too,
        so they finish, or fail at the group's timeout)."""
        for handle in self._handles:
            handle.remove()
        for module in self.modules:
            if module.row_source is getattr(self, "_hook", None):
                module.row_source = None
        self._jobs.put(None)
        self._thread.join()
        for pending in self._pending.values():
            pending.clear()


class _NoCtx:
    def save_for_backward(self, *args):
        pass


def _default_group(group, timeout):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("shard_tables: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (torchrun sets up its environment)")
    if group is not None:
        if timeout is not None:
            raise ValueError("shard_tables: timeout is set by the group's creator when group is given; pass one "
                             "of group and timeout")
        return group
    # Its own group: the table exchange never queues behind DDP's all-reduces.
    kwargs = {} if timeout is None else {"timeout": timeout}
    return dist.new_group(backend=dist.get_backend(), **kwargs)


def shard_tables(model: nn.Module, group=None, *, init_seed: Optional[int] = None,
                 timeout: Optional[datetime.timedelta] = None, average_gradients: bool = True) -> nn.Module:
    """Shard every Engram table of ``model`` row-wise over ``group``; returns ``model``.

    Collective: every rank of ``group`` calls it with the same model. ``group``:
    a process group (default: a new group of all ranks, with the default
    backend and ``timeout``, used only by the table exchange, so it never
    queues behind DDP's). ``init_seed``: None keeps the table's current values
    (each rank copies its rows; the model must have been built identically
    on every rank, e.g. from the same seed); an int initialises each shard
    by global row (:func:`init_rows`), equal to :func:`init_table_` on the
    unsharded model whatever the world size, without ever materialising the
    whole table (the built table may then be on the meta device).

    Raises ValueError, on every rank, if the ranks' tables differ in number,
    shape, dtype, head layout or hash configuration.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"shard_tables: model must be an nn.Module, got {type(model).__name__}")
    if init_seed is not None and (not isinstance(init_seed, int) or isinstance(init_seed, bool) or init_seed < 0):
        raise ValueError(f"shard_tables: init_seed={init_seed!r}; expected None or an int >= 0")
    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        raise ValueError(f"shard_tables: timeout={timeout!r}; expected a datetime.timedelta")
    tables = _tables(model)
    if not tables:
        raise ValueError(f"shard_tables: model ({type(model).__name__}) holds no Engram table")
    for name, module in tables:
        if isinstance(module, ShardedMultiHeadEmbedding):
            raise ValueError(f"shard_tables: table {name!r} is already sharded")
        if module.table_optimizer is not None:
            raise ValueError(f"shard_tables: table {name!r} already trains row-wise; call make_rowwise after "
                             "shard_tables, so that the optimizer state is created for the shard only")
        if module.row_source is not None:
            raise ValueError(f"shard_tables: table {name!r} has a Prefetcher attached; sharded tables do not "
                             "support engram.Prefetcher yet")
        if module.embedding.weight.is_meta and init_seed is None:
            raise ValueError(f"shard_tables: table {name!r} is on the meta device; pass init_seed to initialise "
                             "the shards by global row")
    group = _default_group(group, timeout)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"shard_tables: this process (global rank {dist.get_rank()}) is not in group; every "
                         "rank that calls shard_tables must belong to the group")

    # The layout check, on every rank before any step: all ranks must shard equal tables.
    layers = _layers_by_table(model)
    # The placement too: an mmap shard's backward runs one more exchange.
    records = [dict(_table_record(name, m, layers.get(id(m))), placement=m.placement) for name, m in tables]
    everyone: List[Optional[list]] = [None] * world
    dist.all_gather_object(everyone, records, group=group)
    for other_rank, other in enumerate(everyone):
        if other != records:
            diff = _first_difference(records, other)
            raise ValueError(
                f"shard_tables: rank {rank}'s Engram tables differ from rank {other_rank}'s ({diff}); every rank "
                f"of the group must shard the same model"
            )

    for salt, (name, module) in enumerate(tables):
        weight = module.embedding.weight
        num_rows, dim = weight.shape
        start, stop = row_range(int(num_rows), world, rank)
        with torch.no_grad():
            if init_seed is not None:
                local = init_rows(init_seed, start, stop, dim, weight.dtype, salt)
            else:
                local = weight.detach()[start:stop].clone()
        device = weight.device if not weight.is_meta else torch.device("cpu")
        if module.placement == "host":
            local = local.pin_memory() if torch.cuda.is_available() else local
        elif module.placement == "mmap":
            path = _shard_path(module.table_path, start, stop)
            array = np.lib.format.open_memmap(path, mode="w+", dtype=local.numpy().dtype, shape=tuple(local.shape))
            array[:] = local.numpy()
            module._file_array, module.table_path = array, path
            module.record_table_file()
            local = torch.from_numpy(array)
        else:
            local = local.to(device)
        requires_grad = weight.requires_grad
        module.embedding = nn.Embedding(stop - start, dim, _weight=local)
        module.embedding.weight.requires_grad_(requires_grad)
        module.__class__ = ShardedMultiHeadEmbedding
        layer = layers.get(id(module))
        module.group, module.rank, module.world_size = group, rank, world
        module.num_rows, module.row_start, module.row_stop = int(num_rows), start, stop
        module.shard_starts = torch.tensor([row_range(int(num_rows), world, r)[0] for r in range(world)]
                                           + [int(num_rows)])
        module.head_sizes = [int(s) for s in torch.diff(module.offsets.cpu(), append=torch.tensor([num_rows]))]
        module.table_name = name or type(module).__name__
        module.layer_id = layer.layer_id if layer is not None else None
        module.average_gradients = bool(average_gradients)
        module.exchange_timeout = timeout  # for a prefetcher's own group (None: the backend's default)
    return model


def _shard_path(path: str, start: int, stop: int) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.rows{start}-{stop}{ext or '.npy'}"


def _first_difference(mine: list, other: list) -> str:
    if len(mine) != len(other):
        return f"{len(mine)} tables against {len(other)}"
    for a, b in zip(mine, other):
        keys = [k for k in list(a) + [k for k in b if k not in a] if a.get(k) != b.get(k)]  # shape first
        if keys:
            return f"table {a.get('name')!r}: " + ", ".join(
                f"{key} is {a.get(key)!r} here, {b.get(key)!r} there" for key in keys)
    return "unknown"


def ddp_ignore_tables(model: nn.Module) -> List[str]:
    """Tell DistributedDataParallel to leave the sharded tables alone (no broadcast
    of the shards at construction, no all-reduce of their gradients); call before
    wrapping ``model`` in DDP. Returns the ignored parameter names."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in model.named_parameters() if any(p is m.embedding.weight for m in sharded_tables(model))]
    if not names:
        raise ValueError("ddp_ignore_tables: model holds no sharded Engram table; call shard_tables first")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def gather_table(module: "ShardedMultiHeadEmbedding", dst: Optional[int] = None) -> Optional[torch.Tensor]:
    """The whole table of a sharded module, assembled from the shards (for tests
    and small tables: it is table-sized). Returned on every rank, or only on
    rank ``dst`` (None elsewhere)."""
    if not isinstance(module, ShardedMultiHeadEmbedding):
        raise ValueError(f"gather_table: module must be a ShardedMultiHeadEmbedding, got {type(module).__name__}")
    _check_files(module.group, [module], "gather_table")
    return _gather_rows(module, module.embedding.weight, dst)


def _check_files(group, tables, when: str) -> None:
    """Collective: raises TableFileChangedError on every rank if any rank's mmap
    shard file changed since it was written (before a read or write of all rows)."""
    mine = [m.table_file_problem(when) for m in tables]
    everyone: List[Optional[list]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, problems in enumerate(everyone):
        for problem in problems:
            if problem is not None:
                raise TableFileChangedError(f"engram.distributed: rank {rank}: {problem}; every rank raises this error")


def _gather_rows(module, local: torch.Tensor, dst):
    parts: List[Optional[torch.Tensor]] = [None] * module.world_size
    dist.all_gather_object(parts, local.detach().cpu(), group=module.group)
    if dst is not None and module.rank != dst:
        return None
    return torch.cat(parts)


# --------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------


def _dtensor(module: "ShardedMultiHeadEmbedding", local: torch.Tensor):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = getattr(module, "_mesh", None)
    if mesh is None:
        ranks = dist.get_process_group_ranks(module.group)
        device_type = "cuda" if local.is_cuda else "cpu"
        mesh = DeviceMesh.from_group(module.group, device_type, mesh=ranks)
        module._mesh = mesh
    shape = (module.num_rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def state_dict(model: nn.Module, optimizer=None) -> dict:
    """The sharded tables (and the row-wise optimizer's per-row state and step
    counts) of ``model`` as DTensors sharded by row, for
    ``torch.distributed.checkpoint``; loading into the dict of a model sharded
    over another world size reshards. The DTensors share storage with the
    shards: dcp.load writes into the model."""
    out = {}
    tables = sharded_tables(model)
    if not tables:
        raise ValueError("state_dict: model holds no sharded Engram table; call shard_tables first")
    for module in tables:
        weight = module.embedding.weight
        out[f"{module.table_name}.weight"] = _dtensor(module, weight.data)
        if optimizer is not None:
            if weight not in optimizer.state:
                raise ValueError(f"state_dict: table {module.table_name!r} is not one of optimizer's tables")
            for key, value in optimizer.state[weight].items():
                if torch.is_tensor(value):
                    out[f"{module.table_name}.optim.{key}"] = _dtensor(module, value)
                else:
                    out[f"{module.table_name}.optim.{key}"] = torch.tensor(value)
    return out


def load_state_dict(model: nn.Module, optimizer, loaded: dict) -> None:
    """After dcp.load into ``state_dict(model, optimizer)``: copies back what DCP
    could not write in place (the scalar step counts)."""
    if optimizer is None:
        return
    for module in sharded_tables(model):
        state = optimizer.state[module.embedding.weight]
        for key, value in list(state.items()):
            if not torch.is_tensor(value):
                state[key] = type(value)(loaded[f"{module.table_name}.optim.{key}"].item())


_META = "engram_fingerprint.json"


def save(path: str, model: nn.Module, optimizer=None) -> None:
    """Collective: writes the sharded tables of ``model`` (and ``optimizer``'s
    state) to the folder ``path`` with torch.distributed.checkpoint, plus the
    tables' fingerprint. Written to ``path + '.partial'`` (the fingerprint
    last) and renamed once complete: an existing checkpoint at ``path`` is
    replaced only after the new one is whole. Between rank 0's two renames the
    old one is at ``path + '.old'``; :func:`load` falls back to it and the next
    save moves it back first, so a save killed at any point leaves the previous
    checkpoint loadable. A leftover ``path + '.partial'`` is deleted here and
    never read by :func:`load`."""
    import torch.distributed.checkpoint as dcp

    tables = sharded_tables(model)
    if not tables:
        raise ValueError("save: model holds no sharded Engram table; call shard_tables first")
    group, rank = tables[0].group, tables[0].rank
    _check_files(group, tables, "save")
    partial, old = os.fspath(path) + ".partial", os.fspath(path) + ".old"
    if rank == 0:
        if os.path.exists(partial):
            shutil.rmtree(partial)
        if not os.path.exists(path) and os.path.exists(os.path.join(old, _META)):
            os.rename(old, path)  # a save died between its renames: the old checkpoint is the current one
    dist.barrier(group=group)
    dcp.save(state_dict(model, optimizer), checkpoint_id=partial, process_group=group)
    if rank == 0:
        meta = {"tables": fingerprint(model),
                "optimizer": None if optimizer is None else getattr(optimizer, "rule", type(optimizer).__name__),
                "world_size": tables[0].world_size}
        with open(os.path.join(partial, _META), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(path, old)
        os.rename(partial, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    dist.barrier(group=group)


def load(path: str, model: nn.Module, optimizer=None) -> None:
    """Collective: loads a checkpoint written by :func:`save` (at any world size)
    into the sharded tables of ``model`` and ``optimizer``'s state. Refuses
    (ValueError, on every rank, before changing anything) a checkpoint of
    other tables: other sizes, head layout, hash configuration or tokenizer
    compression, or another row-wise rule."""
    import torch.distributed.checkpoint as dcp

    tables = sharded_tables(model)
    if not tables:
        raise ValueError("load: model holds no sharded Engram table; call shard_tables first")
    meta_path = os.path.join(os.fspath(path), _META)
    old = os.fspath(path) + ".old"
    if not os.path.exists(os.fspath(path)) and os.path.exists(os.path.join(old, _META)):
        # A save died between its renames: path + '.old' is the last complete checkpoint.
        path, meta_path = old, os.path.join(old, _META)
    if not os.path.exists(meta_path):
        raise ValueError(f"load: path={os.fspath(path)!r} holds no engram checkpoint (no {_META}); expected a "
                         "folder written by engram.distributed.save")
    with open(meta_path) as f:
        meta = json.load(f)
    mine = fingerprint(model)
    if meta["tables"] != mine:
        raise ValueError(f"load: the checkpoint at {os.fspath(path)!r} was written for other tables "
                         f"({_first_difference(mine, meta['tables'])}); refusing to load it")
    rule = None if optimizer is None else getattr(optimizer, "rule", type(optimizer).__name__)
    if optimizer is not None and meta["optimizer"] != rule:
        raise ValueError(f"load: the checkpoint holds optimizer state of rule {meta['optimizer']!r}; optimizer's "
                         f"rule is {rule!r}")
    _check_files(tables[0].group, tables, "load")
    sd = state_dict(model, optimizer)
    dcp.load(sd, checkpoint_id=os.fspath(path), process_group=tables[0].group)
    load_state_dict(model, optimizer, sd)
