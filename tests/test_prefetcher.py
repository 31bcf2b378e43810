"""The prefetch engine (gather pool, layer queues) and the Prefetcher, in
inference and training: prefetched results equal direct lookups bit for bit on the CPU."""

import gc
import os

import numpy as np
import pytest
import torch
from torch import nn

import engram
from engram import CompressionTable, EngramLayer
from table_testing import D, VOCAB, assert_same, config, inputs, make_layer, needs_cuda


# --------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------

_engine = engram._loader.load("_engine")


def test_dedup_gather_matches_unique_and_index_select():
    gen, pool = torch.Generator().manual_seed(3), _engine.GatherPool(1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        table = torch.randn(500, 7, generator=gen).to(dtype)
        ids = torch.randint(0, 500, (4, 9, 3), generator=gen)
        rows, staged, inverse = pool.submit(table, ids).wait()
        expected_rows, expected_inverse = torch.unique(ids, sorted=True, return_inverse=True)
        assert_same(rows, expected_rows)
        assert_same(inverse, expected_inverse)
        assert_same(staged, table[expected_rows])
        assert_same(staged[inverse], table[ids])
    empty = pool.submit(table, torch.empty(0, 3, dtype=torch.int64)).wait()
    assert empty.rows.numel() == 0 and empty.staged.shape == (0, 7) and empty.inverse.shape == (0, 3)


def test_engine_int64_rows_beyond_2_31_elements(tmp_path):
    # A sparse file: 2^31 + 16 * 1000 float32 elements, only a few pages written.
    rows, dim = 2**31 // 16 + 1000, 16
    array = np.lib.format.open_memmap(str(tmp_path / "big.npy"), mode="w+", dtype=np.float32, shape=(rows, dim))
    table = torch.from_numpy(array)
    assert table.numel() > 2**31
    far = torch.tensor([rows - 1, 3, rows - 500, rows - 1], dtype=torch.int64)
    for r in far.tolist():
        table[r] = torch.arange(dim, dtype=torch.float32) + r % 1000
    pool = _engine.GatherPool(1)
    got_rows, staged, inverse = pool.submit(table, far).wait()
    assert got_rows.tolist() == sorted(set(far.tolist()))
    assert_same(staged[inverse], table[far])


def test_engine_errors_surface_in_the_caller():
    table = torch.randn(10, 4)
    pool = _engine.GatherPool(2)
    ticket = pool.submit(table, torch.tensor([[1, 2], [3, 99]]))
    with pytest.raises(IndexError, match=r"^engram.Prefetcher: rows holds 99 at flat index 3; expected values in \[0, 10\) for table.size\(0\)=10$"):
        ticket.wait()
    assert ticket.ready()
    with pytest.raises(IndexError, match="rows holds -1 at flat index 0"):
        pool.submit(table, torch.tensor([-1])).wait()
    with pytest.raises(ValueError, match="ids must be contiguous int64"):
        pool.submit(table, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="table must be a contiguous 2-D CPU tensor"):
        pool.submit(table.t(), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_threads=0"):
        _engine.GatherPool(0)
    # The pool still works after errors.
    assert_same(pool.submit(table, torch.tensor([4])).wait().staged, table[4:5])
    pool.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux thread ids")
def test_engine_workers_are_background_threads():
    """SCHED_BATCH and a raised nice: a submit does not preempt the caller."""
    import time

    def named_workers():
        # Gather workers name themselves; torch's own threads differ by name.
        found = set()
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as comm:
                    if comm.read().strip() == "engram-gather":
                        found.add(int(tid))
            except FileNotFoundError:  # the thread ended meanwhile
                pass
        return found

    def until(condition):
        # Workers name themselves and set their policy when they start.
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)

    others = named_workers()  # a previous test's pool not yet collected
    pool = _engine.GatherPool(2)
    until(lambda: len(named_workers() - others) == 2)
    workers = named_workers() - others
    assert len(workers) == 2
    until(lambda: all(os.sched_getscheduler(t) == os.SCHED_BATCH for t in workers))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for t in workers:
        assert os.sched_getscheduler(t) == os.SCHED_BATCH
        assert os.getpriority(os.PRIO_PROCESS, t) == min(19, base + 5)
    pool.close()
    assert not named_workers() & workers  # close joins its workers
    others = named_workers()
    ordinary = _engine.GatherPool(1, -1)
    until(lambda: len(named_workers() - others) == 1)
    (worker,) = named_workers() - others
    assert os.sched_getscheduler(worker) == os.SCHED_OTHER
    assert os.getpriority(os.PRIO_PROCESS, worker) == base
    ordinary.close()
    with pytest.raises(ValueError, match="background_nice=20"):
        _engine.GatherPool(1, 20)
    with pytest.raises(ValueError, match="worker_nice=-2"):
        engram.Prefetcher(Toy("host"), worker_nice=-2)


def test_engine_close_cancels_queued_gathers_without_hanging():
    table = torch.randn(200_000, 32)
    ids = torch.randint(0, 200_000, (50_000,))
    pool = _engine.GatherPool(1)
    tickets = [pool.submit(table, ids) for _ in range(20)]
    pool.close()
    pool.close()  # idempotent
    done = cancelled = 0
    for ticket in tickets:
        assert ticket.ready()
        try:
            rows, staged, inverse = ticket.wait()
            assert_same(staged[inverse], table[ids])
            done += 1
        except RuntimeError as err:
            assert "closed before this gather ran" in str(err)
            cancelled += 1
    assert done + cancelled == 20 and cancelled >= 1
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(table, ids)


# --------------------------------------------------------------------------
# Prefetcher
# --------------------------------------------------------------------------


def layer_spec(layer, dedup=False):
    """LayerQueues.set_layer's arguments for `layer` as the Prefetcher gives
    them: copies of the hash parameters and offsets, the originals watched."""
    module = layer.multi_head_embedding
    watched = [layer.hash_lookup, layer.hash_keys, layer.hash_sizes, module.offsets]
    lookup, keys, sizes, offsets = (t.clone() for t in watched)
    return (module.embedding.weight, lookup, keys, sizes, layer.config.pad_id, layer.config.hash, offsets, dedup,
            watched)


def test_layer_queues_match_token_ids_and_report_changes():
    """LayerQueues.take: MISS, FOUND (removed, waited for, stamped with the
    table's state it read), STALE (a hash parameter changed in place: build
    the spec again); batches of an older spec match by their hash ids only."""
    Take = _engine.Take
    layer = make_layer("host")
    module = layer.multi_head_embedding
    table = module.embedding.weight
    (_, ids), (_, other) = inputs(seed=1), inputs(seed=2)
    pool = _engine.GatherPool(1)
    queues = _engine.LayerQueues(pool, 1, 2)
    assert queues.prefetch(ids) == [0] and queues.stale() == [0]  # no spec yet: nothing queued
    queues.set_layer(0, *layer_spec(layer))
    assert queues.prefetch(ids) == [] and len(queues.pending(0)) == 1

    def expected(tokens):
        return table.detach()[layer.hash(tokens) + module.offsets]

    assert queues.take(0, other) == (Take.MISS, None, None)  # other tokens: still queued
    found, ticket, rows = queues.take(0, ids)
    assert found == Take.FOUND and ticket.kind == _engine.TaskKind.HASH_AND_GATHER
    assert_same(ticket.wait().staged, expected(ids))
    assert rows is ticket.wait().staged  # current, expanded: the lookup's output as it is
    assert queues.take(0, ids) == (Take.MISS, None, None) and not queues.pending(0)  # used once

    # At most max_pending batches: the oldest is dropped.
    for tokens in (ids, other, other):
        queues.prefetch(tokens)
    assert len(queues.pending(0)) == 2
    assert queues.take(0, ids)[0] == Take.MISS

    # Stamps: the table's version and the caller's update counters when queued.
    queues.prefetch(ids)
    version = table._version
    with torch.no_grad():
        table[0] += 1
    found, ticket, rows = queues.take(0, ids)
    assert found == Take.FOUND and ticket.table_version == version < table._version and ticket.epoch == 0
    assert rows is None  # the table changed since: to be brought up to date
    queues.set_counters(0, 3, 1)
    queues.prefetch(ids)
    _, ticket, rows = queues.take(0, ids)
    assert (ticket.table_version, ticket.epoch, ticket.own_bumps) == (table._version, 3, 1) and rows is not None
    queues.prefetch(ids)
    queues.set_counters(0, 4, 1)  # an update recorded after queuing, the version unchanged
    assert queues.take(0, ids)[2] is None

    # Hash parameters changed in place after queuing: stale, and a prefetch
    # reports the layer and queues nothing.
    queues.prefetch(ids)
    old_hash = layer.hash(ids)
    layer.hash_keys[0, 1] += 2
    assert queues.take(0, ids) == (Take.STALE, None, None)
    queued = len(queues.pending(0))
    assert queues.prefetch(other) == [0] and len(queues.pending(0)) == queued
    # Built again: the batch hashed with the old keys now matches by its hash ids only.
    queues.set_layer(0, *layer_spec(layer))
    assert queues.take(0, ids, layer.hash(ids)) == (Take.MISS, None, None)
    found, ticket, _ = queues.take(0, ids, old_hash)
    assert found == Take.FOUND and len(queues.pending(0)) == queued - 1
    queues.prefetch(ids)
    found, ticket, _ = queues.take(0, ids)
    assert found == Take.FOUND
    assert_same(ticket.wait().staged, expected(ids))
    # A spec built again with equal copies keeps matching by token ids.
    queues.prefetch(ids)
    queues.set_layer(0, *layer_spec(layer))
    assert queues.take(0, ids)[0] == Take.FOUND
    # Token ids that are not int64 on the CPU cannot decide: the hash ids do.
    queues.prefetch(ids)
    assert queues.take(0, ids.int()) == (Take.MISS, None, None)
    assert queues.take(0, ids.int(), layer.hash(ids))[0] == Take.FOUND

    # A worker's error is raised by take, and the batch is removed.
    with torch.no_grad():
        module.offsets += 10**9  # rows beyond the table
    queues.set_layer(0, *layer_spec(layer))
    queues.prefetch(ids)
    with pytest.raises(IndexError, match=r"rows holds \d+ at flat index \d+; expected values in \[0, \d+\) for table.size\(0\)"):
        queues.take(0, ids)
    assert not queues.pending(0)
    module.offsets -= 10**9

    # Other offsets or the table's data replaced: the queued rows are dropped.
    queues.set_layer(0, *layer_spec(layer))
    queues.prefetch(ids)
    with torch.no_grad():
        spec = layer_spec(layer)
        module.offsets += 1
        queues.set_layer(0, *layer_spec(layer))
        module.offsets -= 1
    assert not queues.pending(0)
    queues.set_layer(0, *layer_spec(layer))
    queues.prefetch(ids)
    table.data = table.data.clone()
    assert queues.take(0, ids) == (Take.STALE, None, None) and queues.prefetch(ids) == [0] and queues.stale() == [0]
    queues.set_layer(0, *layer_spec(layer))  # gathered from the old data: dropped
    assert not queues.pending(0) and queues.take(0, ids) == (Take.MISS, None, None)

    # A layer whose table is elsewhere: nothing is queued for it.
    queues.set_layer(0, table)
    assert queues.prefetch(ids) == [] and not queues.pending(0)
    with pytest.raises(IndexError, match="layer index 1 is outside 0..0"):
        queues.take(1, ids)
    with pytest.raises(ValueError, match="input_ids must be an int64 CPU tensor"):
        queues.set_layer(0, *spec)
        queues.prefetch(ids.int())
    with pytest.raises(ValueError, match=r"one layer's CPU tensors \(head_sizes \[1, K\]\), got head_sizes of shape \[4\]"):
        queues.set_layer(0, *spec[:3], layer.hash_sizes[0], *spec[4:])
    queues.clear()
    pool.close()


def test_engine_patch_reads_updated_rows_again():
    """pool.patch: a finished gather gets the rows an update changed read
    again from the table (expanded and deduplicated), and new stamps."""
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(50, 6, generator=gen)
    ids = torch.randint(0, 50, (3, 7, 2), generator=gen)
    pool = _engine.GatherPool(2)
    for dedup in (False, True):
        ticket = pool.submit(table, ids, False, dedup)
        ticket.wait()
        changed = torch.unique(ids)[::3].contiguous()
        before = table.clone()
        table[changed] += 1
        assert pool.patch(ticket, table, changed, 7, 3, 2)
        rows, staged, inverse = ticket.wait()
        assert (ticket.table_version, ticket.epoch, ticket.own_bumps) == (7, 3, 2)
        if dedup:
            assert_same(staged, table[rows])
        else:
            assert_same(staged, table[ids])
            assert not torch.equal(staged, before[ids])  # rows did change
    # Nothing to patch: a failed gather, and a gather that used the hot-row cache.
    failed = pool.submit(table, torch.tensor([99]))
    with pytest.raises(IndexError):
        failed.wait()
    assert not pool.patch(failed, table, torch.tensor([1]), 0, 0, 0)
    for dedup in (True, False):
        cached = pool.submit(table, ids, False, dedup, None, torch.tensor([1, 2]), table[[1, 2]])
        before = cached.wait().staged.clone()
        assert not pool.patch(cached, table, torch.tensor([1]), 0, 0, 0)
        assert_same(cached.wait().staged, before)  # untouched, no error
    device_gather = _engine.GatherTicket.device_gather(table[ids])
    assert device_gather.kind == _engine.TaskKind.DEVICE_GATHER
    assert not pool.patch(device_gather, table, torch.tensor([1]), 0, 0, 0)
    with pytest.raises(ValueError, match="changed rows must be a contiguous 1-D int64 CPU tensor"):
        pool.patch(ticket, table, torch.tensor([1], dtype=torch.int32), 0, 0, 0)
    pool.close()


def test_prefetcher_sees_reassigned_buffers_and_replaced_table_data():
    """The engine's specs are copies: a buffer reassigned or changed in place,
    or the table's data replaced, between prefetches is seen, and no batch
    gathered with the old values is used."""
    model, reference = Toy("host"), Toy("host")
    data = batches(3)
    with torch.no_grad(), engram.Prefetcher(model) as prefetcher:
        prefetcher.prefetch(data[0])
        for m in (model, reference):
            m.engrams[0].hash_keys = m.engrams[0].hash_keys.clone()  # same values, another tensor
        assert_same(model(data[0]), reference(data[0]))
        assert prefetcher.stats.hits == 2  # layer 0 matched by its hash ids
        # Other offsets (still in range), reassigned between a prefetch and its use.
        prefetcher.prefetch(data[1])
        for m in (model, reference):
            module = m.engrams[1].multi_head_embedding
            module.offsets = torch.zeros_like(module.offsets)
        assert_same(model(data[1]), reference(data[1]))
        assert prefetcher.stats.hits == 3 and prefetcher.stats.misses == 1
        prefetcher.prefetch(data[2])  # built again with the new offsets
        assert_same(model(data[2]), reference(data[2]))
        assert prefetcher.stats.hits == 5
        # The table's data replaced (same shape) after a prefetch: not used;
        # the next prefetch gathers from the new data.
        prefetcher.prefetch(data[0])
        for m in (model, reference):
            weight = m.engrams[0].multi_head_embedding.embedding.weight
            weight.data = weight.data * 2
        hits = prefetcher.stats.hits
        assert_same(model(data[0]), reference(data[0]))
        assert prefetcher.stats.hits == hits + 1  # layer 1 only
        prefetcher.prefetch(data[1])
        assert_same(model(data[1]), reference(data[1]))
        assert prefetcher.stats.hits == hits + 3


class Toy(nn.Module):
    """Token embedding, an Engram layer at blocks 1 and 3, a mixing linear after each."""

    def __init__(self, placement="device", directory=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.engrams = nn.ModuleList([
            EngramLayer(config(), l, D, compression=CompressionTable.identity(VOCAB), table_placement=placement,
                        table_path=os.path.join(directory, f"layer{l}.npy") if placement == "mmap" else None)
            for l in (1, 3)
        ])
        self.mixes = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])

    def forward(self, ids):
        h = self.embed(ids)
        for engram_layer, mix in zip(self.engrams, self.mixes):
            h = torch.tanh(mix(h + engram_layer(h, ids)))
        return h


def batches(n, b=2, t=16, seed=5, vocab=40):
    # A small vocabulary: consecutive batches share many n-grams (rows).
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=gen) for _ in range(n)]


def loss_of(out):
    return (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum()


@pytest.mark.parametrize("placement", ["device", "host", "mmap"])
@pytest.mark.parametrize("dedup", [None, True])
def test_prefetched_forward_backward_equal_direct(tmp_path, placement, dedup):
    direct, model = Toy(), Toy(placement, str(tmp_path))
    ids = batches(1)[0]
    with engram.Prefetcher(model, dedup=dedup) as prefetcher:
        assert len(prefetcher.layers) == 2 and len(prefetcher._specs.groups) == 1  # one hash call for both layers
        prefetcher.prefetch(ids)
        out = model(ids)
        assert prefetcher.stats.hits == 2 and prefetcher.stats.misses == 0
        if dedup:
            assert 0 < prefetcher.stats.rows_gathered < prefetcher.stats.rows_looked_up
        else:  # on the CPU the lookup's output itself is gathered
            assert prefetcher.stats.rows_gathered == prefetcher.stats.rows_looked_up == ids.numel() * 2 * 4
        expected = direct(ids)
        assert_same(out, expected)
        loss_of(out).backward()
        loss_of(expected).backward()
        for (name, p1), p2 in zip(direct.named_parameters(), model.parameters()):
            assert_same(p1.grad, p2.grad)
        # Nothing prefetched any more: direct lookups, same output.
        assert_same(model(ids), expected)
        assert prefetcher.stats.misses == 2


@pytest.mark.parametrize("hot_rows", [0, 48])  # the engine hashes; the caller hashes (for the cache's counts)
def test_prefetched_backward_takes_the_engines_cpu_hash_ids(hot_rows):
    """Every gathered batch keeps its hash ids on the CPU, equal to the layer's, and a prefetched lookup hands
    those to its backward: from an accelerator, copying the layer's ids to the table would be a host sync."""
    model, ids = Toy("host"), batches(1)[0]
    handed = []
    for layer in model.engrams:
        module = layer.multi_head_embedding
        module.lookup = lambda w, hash_ids, offsets, staged=None, own=module.lookup: (
            handed.append(hash_ids), own(w, hash_ids, offsets, staged))[1]
    with engram.Prefetcher(model, hot_rows=hot_rows) as prefetcher:
        prefetcher.prefetch(ids)
        kept = []
        for i, layer in enumerate(model.engrams):
            (ticket,) = prefetcher._queues.pending(i)
            kept.append(ticket.wait().hashed)
            assert kept[-1].device.type == "cpu"
            assert_same(kept[-1], layer.hash(ids))
        loss_of(model(ids)).backward()
        assert prefetcher.stats.hits == 2
    assert [t.data_ptr() for t in handed] == [t.data_ptr() for t in kept]


def test_caller_hashed_prefetch_skips_a_table_off_the_cpu():
    """Where the caller hashes (here for the hot-row counts; on CUDA for every
    batch), a layer whose table is not in CPU memory gets nothing queued (it
    is looked up directly), and the others are prefetched as usual."""
    model = Toy("host")
    model.engrams[1].multi_head_embedding.embedding.to("meta")  # stands in for an accelerator
    ids = batches(1)[0]
    layer, hidden = model.engrams[0], model.embed(ids)
    expected = layer(hidden, ids)
    with engram.Prefetcher(model, hot_rows=8) as prefetcher:
        prefetcher.prefetch(ids)
        assert len(prefetcher._queues.pending(0)) == 1 and not prefetcher._queues.pending(1)
        assert_same(layer(hidden, ids), expected)
        assert prefetcher.stats.hits == 1


def test_prefetched_rows_used_only_for_their_ids(tmp_path):
    model, direct = Toy("host"), Toy()
    first, second = batches(2)
    with engram.Prefetcher(model) as prefetcher:
        prefetcher.prefetch(first)
        assert_same(model(second), direct(second))  # other ids: looked up directly
        assert prefetcher.stats.hits == 0 and prefetcher.stats.misses == 2
        assert_same(model(first), direct(first))  # the prefetched rows are still there
        assert prefetcher.stats.hits == 2
        # Batch i+1 prefetched before batch i is used (max_pending=2).
        prefetcher.prefetch(first)
        prefetcher.prefetch(second)
        assert_same(model(first), direct(first))
        assert_same(model(second), direct(second))
        assert prefetcher.stats.hits == 6
        prefetcher.enabled = False
        prefetcher.prefetch(first)
        assert_same(model(first), direct(first))
        assert prefetcher.stats.hits == 6


def test_unused_prefetches_raising_forwards_and_shutdown():
    model, direct = Toy("host"), Toy()
    data = batches(6)
    prefetcher = engram.Prefetcher(model, num_threads=1)
    for ids in data:  # never used: each replaces the last
        prefetcher.prefetch(ids)
    prefetcher.prefetch(data[0])
    with pytest.raises(ValueError, match="input_ids has shape"):
        model.engrams[0](torch.zeros(2, 16, D), data[0][:, :3])  # a forward that raises
    assert_same(model(data[0]), direct(data[0]))
    prefetcher.prefetch(data[1])
    prefetcher.close()
    prefetcher.close()
    assert all(l.multi_head_embedding.row_source is None for l in model.engrams)
    assert_same(model(data[1]), direct(data[1]))
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.prefetch(data[1])
    # Garbage collection closes and detaches too.
    prefetcher = engram.Prefetcher(model)
    prefetcher.prefetch(data[2])
    del prefetcher
    gc.collect()
    assert all(l.multi_head_embedding.row_source is None for l in model.engrams)
    assert_same(model(data[2]), direct(data[2]))


def test_prefetcher_worker_error_surfaces_in_forward():
    model = Toy("host")
    ids = batches(1)[0]
    with engram.Prefetcher(model) as prefetcher:
        module = model.engrams[1].multi_head_embedding
        good = module.offsets.clone()
        module.offsets += 10**9  # rows beyond the table: the worker's bound check fails
        prefetcher.prefetch(ids)
        with pytest.raises(IndexError, match=r"rows holds \d+ at flat index \d+; expected values in \[0, \d+\) for table.size\(0\)"):
            model(ids)
        module.offsets.copy_(good)
        prefetcher.prefetch(ids)
        assert_same(model(ids), Toy()(ids))


def test_prefetched_rows_matched_by_token_ids_only_while_the_hash_is_unchanged():
    """A layer's lookup is matched to a prefetched batch by its token ids;
    after its hash parameters change, only the hash ids can match (here they
    do not: the layer looks up directly, with the new hash)."""
    model, reference = Toy("host"), Toy("host")
    ids = batches(1)[0]
    with torch.no_grad():
        for m in (model, reference):
            m.engrams[0].hash_keys[0, 1] += 2  # another odd multiplier for order 2
        with engram.Prefetcher(model) as prefetcher:
            prefetcher.prefetch(ids)
            assert_same(model(ids), reference(ids))
            assert prefetcher.stats.hits == 2
            prefetcher.prefetch(ids)
            model.engrams[0].hash_keys[0, 1] += 2  # after the prefetch: its rows are stale
            reference.engrams[0].hash_keys[0, 1] += 2
            assert_same(model(ids), reference(ids))
            assert prefetcher.stats.hits == 3 and prefetcher.stats.misses == 1


def test_prefetch_matched_by_the_same_token_tensor_without_comparing_ids():
    """The caller-hashed path (here: a hot-row cache on the CPU; on CUDA every
    path) matches a lookup by the token tensor given to prefetch when it and
    the layer are unchanged, without comparing hash ids (a host sync on an
    accelerator); anything changed falls back to comparing them."""
    model, reference = Toy("host"), Toy("host")
    first, second = batches(2)
    with torch.no_grad(), engram.Prefetcher(model, hot_rows=0.05) as prefetcher:
        prefetcher.prefetch(first)
        layer = model.engrams[0]
        module = layer.multi_head_embedding
        garbage = torch.zeros_like(layer.hash(first))  # hash ids a comparison could not match
        assert_same(module(garbage, first), reference.engrams[0].multi_head_embedding(layer.hash(first)))
        assert prefetcher.stats.hits == 1
        assert_same(model.engrams[1].multi_head_embedding(model.engrams[1].hash(first), first),
                    reference.engrams[1].multi_head_embedding(model.engrams[1].hash(first)))
        assert prefetcher.stats.hits == 2
        # The same tensor changed in place after the prefetch: compared, no match.
        tokens = second.clone()
        prefetcher.prefetch(tokens)
        tokens[0, 0] = (tokens[0, 0] + 1) % 40
        assert_same(model(tokens), reference(tokens))
        assert prefetcher.stats.hits == 2 and prefetcher.stats.misses == 2
        # A layer's hash changed after the prefetch: compared, no match there.
        prefetcher.prefetch(second)
        for m in (model, reference):
            m.engrams[1].hash_keys[0, 0] += 2
        assert_same(model(second), reference(second))
        assert prefetcher.stats.hits == 3 and prefetcher.stats.misses == 3


def test_prefetcher_errors():
    with pytest.raises(ValueError, match="holds no EngramLayer"):
        engram.Prefetcher(nn.Linear(2, 2))
    model = Toy("host")
    with pytest.raises(ValueError, match="num_threads=0"):
        engram.Prefetcher(model, num_threads=0)
    with pytest.raises(ValueError, match="max_pending=0"):
        engram.Prefetcher(model, max_pending=0)
    with pytest.raises(ValueError, match="dedup='yes'"):
        engram.Prefetcher(model, dedup="yes")
    with engram.Prefetcher(model):
        with pytest.raises(ValueError, match="already has a Prefetcher"):
            engram.Prefetcher(model)


# --------------------------------------------------------------------------
# training with host / mmap tables and prefetch
# --------------------------------------------------------------------------


def train(model, data, rule, prefetch, dedup=None, fused=True, **options):
    """Fused row-wise tables + Adam elsewhere; with prefetch, the next batch is
    prefetched right after the forward, before the backward updates the tables."""
    optimizer = engram.optim.make_rowwise(model, rule, lr=0.05, fused=fused)
    tables = {id(p) for p in engram.optim.table_parameters(model)}
    dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], lr=0.01)
    prefetcher = engram.Prefetcher(model, dedup=dedup, **options) if prefetch else None
    losses = []
    if prefetcher:
        prefetcher.prefetch(data[0])
    for i, ids in enumerate(data):
        loss = loss_of(model(ids))
        if prefetcher and i + 1 < len(data):
            prefetcher.prefetch(data[i + 1])  # rows read before this step's update lands
        loss.backward()
        optimizer.step()
        dense.step()
        dense.zero_grad()
        losses.append(loss.detach())
    stats = prefetcher.stats if prefetcher else None
    if prefetcher:
        prefetcher.close()
    optimizer.remove()
    return torch.stack(losses), stats


@pytest.mark.parametrize("placement,rule,dedup,fused", [
    ("host", "sgd", None, True), ("host", "adam", True, True), ("mmap", "adam", None, True),
    ("mmap", "adagrad", True, True), ("host", "adam", None, False), ("mmap", "sgd", True, False),
])
def test_training_with_prefetch_equals_device_without(tmp_path, placement, rule, dedup, fused):
    data = batches(6)
    reference, model = Toy(), Toy(placement, str(tmp_path))
    losses_ref, _ = train(reference, data, rule, prefetch=False, fused=fused)
    losses, stats = train(model, data, rule, prefetch=True, dedup=dedup, fused=fused)
    assert stats.hits == 2 * len(data)
    # Consecutive batches share rows, so staged rows were updated after their
    # gather and had to be read again: the ordering was exercised. A fused
    # update has a worker read them again right away; a sparse gradient's
    # step (recorded before it runs) leaves it to the use.
    if fused:
        assert stats.patched_batches > 0 and stats.patched_rows == 0
    else:
        assert stats.patched_rows > 0 and stats.patched_batches == 0
    assert_same(losses, losses_ref)
    for (name, p1), p2 in zip(reference.state_dict().items(), model.state_dict().values()):
        assert_same(p1, p2)


@pytest.mark.parametrize("placement,rule,dedup,fused", [
    ("host", "sgd", None, True), ("mmap", "adam", True, True), ("host", "adagrad", True, False),
    ("mmap", "sgd", None, False),
])
def test_hot_row_cache_changes_no_output_in_training(tmp_path, placement, rule, dedup, fused):
    """The same training with and without the cache: bit-identical losses,
    tables and weights, while the hot set is chosen again every 2 batches and
    the cached rows are updated between a gather and its use."""
    data = batches(8)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    without, model = Toy(placement, str(tmp_path / "a")), Toy(placement, str(tmp_path / "b"))
    losses_ref, stats_ref = train(without, data, rule, prefetch=True, dedup=dedup, fused=fused)
    losses, stats = train(model, data, rule, prefetch=True, dedup=dedup, fused=fused, hot_rows=48,
                          hot_refresh=2)
    assert stats_ref.cache_lookups == 0
    assert stats.cache_refreshes >= 2 * 3 and stats.cache_lookups > 0
    assert 0 < stats.cache_hits < stats.cache_lookups
    assert_same(losses, losses_ref)
    for p1, p2 in zip(without.state_dict().values(), model.state_dict().values()):
        assert_same(p1, p2)


def test_hot_row_cache_engine_serves_cached_rows_from_the_cache():
    table = torch.arange(40.0).reshape(20, 2)
    ids = torch.tensor([[3, 5], [7, 5], [3, 11]])
    offsets = torch.tensor([0, 1])  # head 1 reads rows id + 1
    rows = ids + offsets
    cache_rows = torch.tensor([4, 6, 12])
    cache_data = -table[cache_rows]  # marked: where a row came from is visible
    pool = _engine.GatherPool(1)
    ticket = pool.submit(table, ids, False, False, offsets, cache_rows, cache_data)
    _, staged, _ = ticket.wait()
    cached = torch.isin(rows, cache_rows)
    assert ticket.wait().cache_hits == int(cached.sum()) == 3
    assert_same(staged[~cached], table[rows[~cached]])
    assert_same(staged[cached], -table[rows[cached]])
    # Deduplicated: the cached rows are not gathered, slots say where they are.
    ticket = pool.submit(table, ids, False, True, offsets, cache_rows)
    unique, staged, inverse = ticket.wait()
    slots = ticket.wait().slots
    assert_same(unique, torch.unique(rows))
    assert_same(unique[inverse], rows)
    assert slots.tolist() == [-1, 1, -1, 2]  # rows 3, 6, 7, 12; the cache holds 4, 6, 12
    assert_same(staged, table[unique[slots < 0]])
    assert ticket.wait().cache_hits == 3
    plain = pool.submit(table, rows).wait()  # no cache: every distinct row gathered
    assert plain.staged.shape == (4, 2) and plain.slots is None and plain.cache_hits == 0
    with pytest.raises(ValueError, match="cache_data must be a contiguous CPU \\[3, 2\\]"):
        pool.submit(table, ids, False, False, offsets, cache_rows, cache_data[:2])
    with pytest.raises(ValueError, match="expanded gather with a cache needs cache_data"):
        pool.submit(table, ids, False, False, offsets, cache_rows)
    with pytest.raises(ValueError, match="one entry per head \\(2\\)"):
        pool.submit(table, ids, False, False, torch.tensor([0, 1, 2]))
    pool.close()


def test_hot_row_cache_follows_changes_it_does_not_record():
    """A dense optimizer writes the table behind the prefetcher's back: the
    cache is read again before the next gather uses it. The next batch is
    prefetched after the step here, so its staged rows are not gathered again
    (the table did not change since): only the cache could be stale."""
    data = batches(7)

    def run(model, **options):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        prefetcher = engram.Prefetcher(model, **options)
        prefetcher.prefetch(data[0])
        losses = []
        for i, ids in enumerate(data):
            loss = loss_of(model(ids))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i + 1 < len(data):
                prefetcher.prefetch(data[i + 1])
            losses.append(loss.detach())
        prefetcher.close()
        return torch.stack(losses), prefetcher.stats

    losses_ref, _ = run(Toy("host"))
    losses, stats = run(Toy("host"), hot_rows=0.02, hot_refresh=3)
    assert stats.regathers == 0
    assert stats.cache_hits > 0
    assert_same(losses, losses_ref)


def test_hot_row_options_are_checked():
    model = Toy("host")
    for bad in (-1, 1.5, 0.0, True, "10"):
        with pytest.raises(ValueError, match="hot_rows="):
            engram.Prefetcher(model, hot_rows=bad)
    with pytest.raises(ValueError, match="hot_refresh=0"):
        engram.Prefetcher(model, hot_rows=10, hot_refresh=0)


def test_unfused_updates_are_caught_by_the_version_counter():
    """A dense optimizer over the host table (changes the prefetcher does not
    record): the staged rows are gathered again."""
    data = batches(4)

    def run(model, prefetch):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        prefetcher = engram.Prefetcher(model) if prefetch else None
        if prefetcher:
            prefetcher.prefetch(data[0])
        for i, ids in enumerate(data):
            loss = loss_of(model(ids))
            if prefetcher and i + 1 < len(data):
                prefetcher.prefetch(data[i + 1])
            loss.backward()
            if prefetcher:
                prefetcher.wait()  # no gather runs while step() writes the table
            optimizer.step()
            optimizer.zero_grad()
        if prefetcher:
            prefetcher.close()
            return prefetcher.stats

    reference, model = Toy(), Toy("host")
    run(reference, False)
    stats = run(model, True)
    assert stats.hits == 2 * len(data) and stats.regathers == 2 * (len(data) - 1)
    for p1, p2 in zip(reference.state_dict().values(), model.state_dict().values()):
        assert_same(p1, p2)



@needs_cuda
@pytest.mark.parametrize("transfer,hot_rows", [("staged", 0), ("staged", 0.05), ("zero-copy", 0)])
def test_cuda_prefetch_training_matches_device_placement(transfer, hot_rows):
    data = [ids.cuda() for ids in batches(6)]
    reference, model = Toy().cuda(), Toy("host").cuda()
    assert model.engrams[0].multi_head_embedding.embedding.weight.is_pinned()
    losses_ref, _ = train(reference, data, "sgd", prefetch=False)
    losses, stats = train(model, data, "sgd", prefetch=True, transfer=transfer, hot_rows=hot_rows, hot_refresh=2)
    assert stats.hits == 2 * len(data)
    if hot_rows:
        assert stats.cache_hits > 0
    # Within tolerance, not bit for bit: the CUDA and CPU kernels sum row gradients in different orders.
    torch.testing.assert_close(losses.cpu(), losses_ref.cpu(), rtol=1e-4, atol=1e-5)
    for p1, p2 in zip(reference.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(p1.cpu(), p2.cpu(), rtol=1e-4, atol=1e-5)


@needs_cuda
def test_cuda_zero_copy_forward_waits_only_on_its_own_event():
    model = Toy("host").cuda()
    ids = batches(1)[0].cuda()
    with torch.no_grad():
        expected = model(ids)
        with engram.Prefetcher(model, transfer="zero-copy") as prefetcher:
            prefetcher.prefetch(ids)
            pending = [prefetcher._queues.pending(i)[0] for i in range(2)]
            assert all(t.kind == _engine.TaskKind.DEVICE_GATHER for t in pending)
            assert len({id(t.payload) for t in pending}) == 2  # one event per layer
            got = model(ids)
        assert prefetcher.stats.hits == 2
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------
# staleness: version counters, and refresh() from the layers' hooks
# --------------------------------------------------------------------------


def test_refresh_rebuilds_the_specs_after_a_change_no_hook_sees():
    """A buffer replaced behind the hooks' back (straight into _buffers): the
    prefetcher cannot know, until refresh() makes it build its copies again."""
    model, reference = Toy("host"), Toy("host")
    data = batches(2)
    with torch.no_grad(), engram.Prefetcher(model) as prefetcher:
        for m in (model, reference):
            module = m.engrams[1].multi_head_embedding
            module._buffers["offsets"] = torch.zeros_like(module.offsets)  # no hook runs
        prefetcher.refresh()
        prefetcher.prefetch(data[0])
        assert_same(model(data[0]), reference(data[0]))
        assert prefetcher.stats.hits == 2  # gathered with the new offsets
        prefetcher.prefetch(data[1])
        for m in (model, reference):
            m.engrams[0]._buffers["hash_keys"] = m.engrams[0].hash_keys + 2  # other odd multipliers
        prefetcher.refresh()
        assert_same(model(data[1]), reference(data[1]))
        assert prefetcher.stats.hits == 3 and prefetcher.stats.misses == 1  # layer 0's batch: hashed otherwise


@pytest.mark.parametrize("change", ["table in place", "offsets in place", "load_state_dict",
                                    "load_state_dict assign", "to() overwriting parameters"])
def test_changes_between_prefetch_and_lookup_give_the_fresh_rows(change):
    """Whatever changes a layer's table or offsets between a prefetch and its
    use, the lookup returns the rows as they are now, never the staged ones."""
    placement = "device" if change.startswith("to()") else "host"
    model, reference, other = Toy(placement), Toy(placement), Toy(placement, seed=1)
    ids = batches(1)[0]
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    with torch.no_grad(), engram.Prefetcher(model) as prefetcher:
        prefetcher.prefetch(ids)
        for m in (model, reference):
            module = m.engrams[0].multi_head_embedding
            if change == "table in place":
                module.embedding.weight.mul_(-1)
            elif change == "offsets in place":
                module.offsets.copy_(torch.flip(module.offsets, [0]))
            elif change.startswith("load_state_dict"):
                m.load_state_dict(other.state_dict(), assign=change.endswith("assign"))
            else:
                torch.__future__.set_overwrite_module_params_on_conversion(True)
                try:
                    m.double()
                finally:
                    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        got, want = model(ids.clone()), reference(ids)
        assert not torch.equal(want, Toy(placement)(ids).to(want.dtype))  # the change mattered
        assert_same(got, want)
        # And the next prefetch is gathered from the changed model (not gathered again at use).
        prefetcher.prefetch(ids)
        hits, regathers = prefetcher.stats.hits, prefetcher.stats.regathers
        assert_same(model(ids), want)
        assert prefetcher.stats.hits == hits + 2 and prefetcher.stats.regathers == regathers
