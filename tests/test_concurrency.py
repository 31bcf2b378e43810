"""engram ops called from several Python threads (and DataLoader worker
processes) at once give the bits a serial run gives.

Threads run ops whose outputs and table gradients are megabytes, all at
once: each result is compared with the serial one, every result is
overwritten before it is freed (memory the allocator hands out again must not
leak old values), and some are kept alive while others are freed (a live
result must not be written by another call). Threads start together on a
barrier and are joined with a timeout: no sleeps, and a deadlock fails
instead of hanging.
"""

from __future__ import annotations

import threading
from collections import deque

import pytest
import torch

import engram
from engram import ops

OPS = torch.ops.engram
THREADS = 6
ROUNDS = 8
TIMEOUT_S = 300


def run_threads(work, count=THREADS, extra=None):
    """Runs work(i) on `count` threads (and extra() on one more), all started on
    a barrier; re-raises the first failure."""
    barrier = threading.Barrier(count + (extra is not None))
    errors = []

    def wrap(fn, *args):
        def target():
            try:
                barrier.wait(timeout=TIMEOUT_S)
                fn(*args)
            except BaseException as err:  # reported below, in the test's thread
                errors.append(err)
                barrier.abort()
        return target

    threads = [threading.Thread(target=wrap(work, i), daemon=True) for i in range(count)]
    if extra is not None:
        threads.append(threading.Thread(target=wrap(extra), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish: deadlock?"
    if errors:
        raise errors[0]


# Hash outputs of 2 MiB ([2, 2, 4096, 16] int64): big enough for the
# streaming-store path.
HASH_SHAPE = (2, 4096)
VOCAB = 5000


def hash_params():
    gen = torch.Generator().manual_seed(1)
    lookup = torch.randperm(VOCAB, generator=gen)
    keys = torch.randint(1, 2**40, (2, 3), generator=gen) * 2 + 1
    sizes = torch.tensor([[100_003 + 10 * (16 * layer + head) for head in range(16)] for layer in range(2)])
    return lookup, keys, sizes


def hash_inputs(count):
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, HASH_SHAPE, generator=gen) for _ in range(count)]


def table_gradient_inputs(count, rows=9001, dh=64):  # 2.2 MiB float32 gradients
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(0, rows, (2, 100, 4), generator=gen), torch.randn(2, 100, 4, dh, generator=gen))
            for _ in range(count)]


def test_ngram_hash_from_many_threads_matches_serial():
    lookup, keys, sizes = hash_params()
    inputs = hash_inputs(THREADS * ROUNDS)
    serial = [OPS.ngram_hash(ids, lookup, keys, sizes, None, 2, "deepseek").clone() for ids in inputs]

    def work(i):
        alive = deque()  # the last few outputs stay alive while others are freed and reused
        for r in range(ROUNDS):
            j = (i * ROUNDS + r * 5) % len(inputs)  # threads share inputs, in different orders
            out = OPS.ngram_hash(inputs[j], lookup, keys, sizes, None, 2, "deepseek")
            assert torch.equal(out, serial[j]), f"thread {i} round {r}"
            alive.append((j, out))
            if len(alive) > 2:
                k, old = alive.popleft()
                assert torch.equal(old, serial[k]), "a live output was overwritten"
                old.fill_(-1)  # whoever gets this block next must overwrite all of it
        for k, old in alive:
            assert torch.equal(old, serial[k])

    run_threads(work)


def test_table_gradients_from_many_threads_match_serial():
    inputs = table_gradient_inputs(THREADS * 2)
    rows = 9001
    weight = torch.randn(rows, 64)
    serial_grads = [OPS.multihead_embedding_backward(grad, ids, None, rows).clone() for ids, grad in inputs]
    serial_rows = [OPS.multihead_embedding(weight, ids, None, False) for ids, _ in inputs]

    def work(i):
        alive = deque()
        for r in range(ROUNDS):
            j = (i + 3 * r) % len(inputs)
            ids, grad = inputs[j]
            assert torch.equal(OPS.multihead_embedding(weight, ids, None, False), serial_rows[j])
            out = OPS.multihead_embedding_backward(grad, ids, None, rows)
            assert torch.equal(out, serial_grads[j]), f"thread {i} round {r}"
            alive.append((j, out))
            if len(alive) > 1:
                k, old = alive.popleft()
                assert torch.equal(old, serial_grads[k]), "a live gradient was overwritten"
                old.fill_(7.0)  # a reused gradient block must come back zeroed

    run_threads(work)


def test_layer_forward_and_backward_from_many_threads_match_serial():
    torch.manual_seed(0)
    cfg = engram.EngramConfig(engram_vocab_size=[5003, 5003], n_embed_per_ngram=64, n_head_per_ngram=4,
                              layer_ids=[1], pad_id=0)
    # 8 heads of ~5000 rows x 16 floats: a 2.5 MiB table gradient, kept when freed.
    layer = engram.EngramLayer(cfg, 1, hidden_size=32, hc_mult=2, compression=engram.CompressionTable.identity(VOCAB))
    params = [p for p in layer.parameters()]
    gen = torch.Generator().manual_seed(4)
    inputs = [(torch.randn(2, 64, 2, 32, generator=gen), torch.randint(0, VOCAB, (2, 64), generator=gen),
               torch.randn(2, 64, 2, 32, generator=gen)) for _ in range(THREADS)]

    def step(hidden, ids, grad_out):
        hidden = hidden.clone().requires_grad_()
        out = layer(hidden, ids)
        # autograd.grad, not .backward(): threads must not accumulate into shared .grad fields.
        return (out.detach(), *torch.autograd.grad(out, [hidden, *params], grad_out))

    serial = [step(*x) for x in inputs]

    def work(i):
        for r in range(3):
            j = (i + r) % len(inputs)
            for got, want in zip(step(*inputs[j]), serial[j], strict=True):
                assert torch.equal(got, want), f"thread {i} round {r}"

    run_threads(work)


class _HashDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.params = hash_params()
        self.inputs = hash_inputs(8)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        lookup, keys, sizes = self.params
        out = OPS.ngram_hash(self.inputs[i], lookup, keys, sizes, None, 2, "deepseek")
        again = OPS.ngram_hash(self.inputs[(i + 1) % len(self)], lookup, keys, sizes, None, 2, "deepseek")
        del again  # a block kept in the worker, reused by its next item
        return out


def test_forked_dataloader_workers_match_serial():
    dataset = _HashDataset()
    serial = [dataset[i].clone() for i in range(len(dataset))]  # leaves blocks kept in this process
    stop = threading.Event()

    def hammer():  # takes and keeps blocks in this process while the workers fork
        lookup, keys, sizes = dataset.params
        while not stop.is_set():
            OPS.ngram_hash(dataset.inputs[0], lookup, keys, sizes, None, 2, "deepseek")

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                             multiprocessing_context="fork", timeout=TIMEOUT_S)
        got = list(loader)
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    assert len(got) == len(serial)
    for g, s in zip(got, serial):
        assert torch.equal(g, s)
