"""The CUDA paths that must not synchronise with the host, run under
torch.cuda.set_sync_debug_mode("error") or inside CUDA-graph capture: the
deferred error record (set up outside capture, never re-armed inside one),
the row-wise update ops (rows checked on the device) and the prefetcher's
zero-copy forward. Every CUDA test skips without a GPU
and a CUDA build of engram; the CPU test checks that the prefetcher's CPU
behaviour is unchanged by the device-side bookkeeping.
"""

import os
import subprocess
import sys

import pytest
import torch
from test_prefetcher import Toy, batches, loss_of

import engram
from engram import ops, optim

has_cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "engram::multihead_embedding", "CUDA"
)
needs_cuda = pytest.mark.skipif(not has_cuda_kernels, reason="needs a CUDA GPU and a CUDA build of engram")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@needs_cuda
def test_first_use_under_capture_names_the_warm_up():
    # A fresh process: no engram CUDA op has set up the device's record yet.
    code = """
import torch, engram
weight = torch.randn(10, 4, device="cuda")
ids = torch.tensor([[1, 2]], device="cuda")
graph = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(graph):
        engram.ops.multihead_embedding(weight, ids, None)
except RuntimeError as err:
    print("raised:", err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert "error record must be set up outside capture" in result.stdout + result.stderr, result.stderr


@needs_cuda
def test_capture_neither_raises_nor_rearms_a_pending_report():
    weight = torch.randn(10, 4, device="cuda")
    good = torch.tensor([[1, 2]], device="cuda")
    static = ops.multihead_embedding(weight, good, None)  # sets up the record
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    ops.multihead_embedding(weight, torch.tensor([[1, 10]], device="cuda"), None)  # left as a report
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):  # would raise inside capture, or record the re-arm memset, before
        static = ops.multihead_embedding(weight, good, None)
    with pytest.raises(IndexError, match=r"ids holds 10 at flat index 1"):
        engram.check_cuda_errors()
    graph.replay()
    torch.testing.assert_close(static, weight[good])
    engram.check_cuda_errors()  # the replay reported nothing, and the record was re-armed outside capture


@needs_cuda
def test_zero_copy_prefetched_forward_has_no_host_sync():
    model = Toy("host").cuda()
    data = [ids.cuda() for ids in batches(3)]
    with torch.no_grad(), engram.Prefetcher(model, transfer="zero-copy") as prefetcher:
        prefetcher.prefetch(data[0])
        expected = model(data[0])  # warm-up: hash parameters, offsets and streams cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for ids in data[1:]:
                prefetcher.prefetch(ids)
                out = model(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert prefetcher.stats.hits == 2 * len(data)
    torch.testing.assert_close(out, Toy("host").cuda()(data[-1]))
    assert expected.shape == out.shape
    engram.check_cuda_errors()


@needs_cuda
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam"])
def test_rowwise_updates_have_no_host_sync_and_replay_in_a_graph(rule):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 20, generator=gen).cuda()
    state = {"sgd": [], "adagrad": [torch.rand(300, generator=gen).cuda()],
             "adam": [torch.zeros(300, 20).cuda(), torch.zeros(300, 20).cuda()]}[rule]
    rows = torch.randperm(300, generator=gen)[:50].sort().values.cuda()
    row_grads = torch.randn(50, 20, generator=gen).cuda()

    def update(tensors):
        if rule == "sgd":
            optim.rowwise_sgd_update(tensors[0], rows, row_grads, 0.1, 0.01)
        elif rule == "adagrad":
            optim.rowwise_adagrad_update(tensors[0], tensors[1], rows, row_grads, 0.1, 1e-8, 0.01)
        else:
            optim.rowwise_adam_update(*tensors, rows, row_grads, 0.01, 0.9, 0.999, 1e-8, 0.01, True, 1)

    eager, captured = [w.clone(), *[s.clone() for s in state]], [w.clone(), *[s.clone() for s in state]]
    update([t.clone() for t in eager])  # warm-up: error record, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update(eager)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update(captured)
    for tensor, original in zip(captured, [w, *state]):  # capture ran nothing
        assert torch.equal(tensor, original)
    graph.replay()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)
    engram.check_cuda_errors()


def test_prefetched_training_patches_expanded_rows_on_the_cpu():
    # The expanded (dedup=False) refresh now finds the changed rows as integer
    # positions; training must equal the direct model bit for bit, as before.
    data = batches(5)
    direct, model = Toy(), Toy("host")
    losses = []
    for m, prefetch in ((direct, False), (model, True)):
        optimizer = engram.optim.make_rowwise(m, "sgd", lr=0.05)
        # Batches that used a hot-row cache are not patched on a worker: their
        # expanded rows are brought up to date at use (TableUpdates.catch_up).
        prefetcher = engram.Prefetcher(m, dedup=False, max_pending=2, hot_rows=8, hot_refresh=2) if prefetch else None
        run = []
        if prefetcher:
            prefetcher.prefetch(data[0])
            prefetcher.prefetch(data[1])
        for i, ids in enumerate(data):
            loss = loss_of(m(ids))
            if prefetcher and i + 2 < len(data):
                prefetcher.prefetch(data[i + 2])  # two batches ahead: the older one needs patching
            loss.backward()
            optimizer.step()
            run.append(loss.detach())
        if prefetcher:
            assert prefetcher.stats.hits == 2 * len(data) and prefetcher.stats.patched_rows > 0
            prefetcher.close()
        optimizer.remove()
        losses.append(torch.stack(run))
    assert torch.equal(losses[0], losses[1])
    for p1, p2 in zip(direct.state_dict().values(), model.state_dict().values()):
        assert torch.equal(p1, p2)
