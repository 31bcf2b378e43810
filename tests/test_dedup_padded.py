"""dedup_row_grads_padded: dedup_row_grads sized by the entries (rows of -1 and
zero sums as padding), so that the CUDA op needs no host sync; and the CPU
update ops, which skip a suffix of -1 rows.

CPU: the unpadded prefix equals dedup_row_grads bit for bit, the float64
reference within rounding, opcheck (the fake kernel's static sizes), and an
update with padded rows equals the update with the rows before the padding.
CUDA (skipped without a GPU): equality with the CPU op, no host sync under
torch.cuda.set_sync_debug_mode("error"), CUDA-graph capture, and bad ids
reported as a deferred error with every row turned into padding.
"""

import pytest
import torch
from torch.library import opcheck

import engram
from engram import optim
from engram import reference as ref

ops = torch.ops.engram


def sample(gen, shape=(6, 30), sizes=(7, 11, 13, 5), dh=8, dtype=torch.float32):
    offsets = ref.head_offsets(list(sizes))
    ids = torch.stack([torch.randint(0, s, shape, generator=gen) for s in sizes], dim=-1)
    grad = torch.randn(*shape, len(sizes), dh, generator=gen).to(dtype)
    return grad, ids, offsets, sum(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_offsets", [True, False])
def test_padded_prefix_equals_dedup_bitwise(dtype, with_offsets):
    gen = torch.Generator().manual_seed(0)
    grad, ids, offsets, num_rows = sample(gen, dtype=dtype)
    if not with_offsets:
        ids, offsets = ids + offsets, None
    rows, row_grads = optim.dedup_row_grads(grad, ids, offsets, num_rows)
    padded_rows, padded_grads = optim.dedup_row_grads_padded(grad, ids, offsets, num_rows)
    u, entries = rows.numel(), ids.numel()
    assert 0 < u < entries  # the test has padding to check
    assert padded_rows.shape == (entries,) and padded_grads.shape == (entries, grad.shape[-1])
    assert padded_rows.dtype == torch.int64 and padded_grads.dtype == dtype
    assert torch.equal(padded_rows[:u], rows)
    assert torch.equal(padded_grads[:u], row_grads)
    assert torch.equal(padded_rows[u:], torch.full((entries - u,), -1))
    assert torch.equal(padded_grads[u:], torch.zeros(entries - u, grad.shape[-1], dtype=dtype))


def test_padded_against_reference():
    gen = torch.Generator().manual_seed(1)
    grad, ids, offsets, num_rows = sample(gen, dh=5)
    rows, sums = optim.dedup_row_grads_padded(grad, ids, offsets, num_rows)
    want_rows, want = ref.dedup_row_grads_padded(grad, ids, offsets, num_rows)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(sums.double(), want, rtol=1e-6, atol=1e-6)


def test_padded_every_entry_distinct_has_no_padding():
    ids = torch.arange(12).reshape(3, 4)
    grad = torch.randn(3, 4, 2)
    rows, sums = optim.dedup_row_grads_padded(grad, ids, None, 12)
    assert torch.equal(rows, torch.arange(12))
    assert torch.equal(sums, grad.reshape(12, 2))


def test_padded_opcheck():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 9, (3, 5, 2), generator=gen)
    offsets = torch.tensor([0, 9])
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(3, 5, 2, 4, generator=gen).to(dtype)
        opcheck(ops.dedup_row_grads_padded.default, (grad, ids, offsets, 18))
        opcheck(ops.dedup_row_grads_padded.default, (grad, ids + offsets, None, 18))


def test_padded_fake_sizes_are_static():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grad, ids = torch.empty(4, 7, 2, 3), torch.empty(4, 7, 2, dtype=torch.long)
        rows, sums = ops.dedup_row_grads_padded(grad, ids, torch.zeros(2, dtype=torch.long), 10)
    assert rows.shape == (56,) and sums.shape == (56, 3)


def test_padded_bad_ids_raise_on_cpu():
    ids, offsets, grad = torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 5]), torch.randn(2, 2, 3)
    with pytest.raises(IndexError, match=r"ids holds 8 at flat index 3 \(after adding offsets\)"):
        optim.dedup_row_grads_padded(grad, ids, offsets, 8)
    with pytest.raises(ValueError, match=r"grad has shape \[1, 2, 3\]; expected ids.shape \+ \[Dh\]"):
        optim.dedup_row_grads_padded(grad[:1], ids, None, 10)


# --------------------------------------------------------------------------
# the update ops skip a -1 suffix (CPU)
# --------------------------------------------------------------------------


def run_rule(rule, tensors, rows, row_grads, step=1):
    if rule == "sgd":
        optim.rowwise_sgd_update(tensors[0], rows, row_grads, 0.3, 0.01)
    elif rule == "adagrad":
        optim.rowwise_adagrad_update(tensors[0], tensors[1], rows, row_grads, 0.3, 1e-8, 0.01)
    else:
        optim.rowwise_adam_update(tensors[0], tensors[1], tensors[2], rows, row_grads, 0.01, 0.9, 0.999, 1e-8,
                                  0.01, rule == "adamw", step)


def rule_tensors(rule, gen, num_rows, dh, dtype):
    w = torch.randn(num_rows, dh, generator=gen).to(dtype)
    if rule == "sgd":
        return [w]
    if rule == "adagrad":
        return [w, torch.rand(num_rows, generator=gen).to(dtype)]
    return [w, torch.randn(num_rows, dh, generator=gen).to(dtype), torch.rand(num_rows, dh, generator=gen).to(dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "adamw"])
def test_update_with_padding_equals_unpadded_bitwise(rule, dtype):
    gen = torch.Generator().manual_seed(2)
    grad, ids, offsets, num_rows = sample(gen, dh=16, dtype=dtype)
    tensors = rule_tensors(rule, gen, num_rows, 16, dtype)
    want = [t.clone() for t in tensors]
    rows, row_grads = optim.dedup_row_grads(grad, ids, offsets, num_rows)
    padded_rows, padded_grads = optim.dedup_row_grads_padded(grad, ids, offsets, num_rows)
    assert (padded_rows == -1).any()
    run_rule(rule, want, rows, row_grads, step=3)
    run_rule(rule, tensors, padded_rows, padded_grads, step=3)
    for got, expected in zip(tensors, want):
        assert torch.equal(got, expected)


def test_update_all_padding_writes_nothing():
    w = torch.randn(5, 4)
    before = w.clone()
    optim.rowwise_sgd_update(w, torch.full((3,), -1), torch.randn(3, 4), 0.5)
    assert torch.equal(w, before)


@pytest.mark.parametrize("rows", [[0, -1, 2], [-1, 1, 2], [2, 1, -1], [0, 5, -1]])
def test_update_padding_only_as_suffix(rows):
    w = torch.randn(5, 4)
    before = w.clone()
    with pytest.raises((IndexError, ValueError), match=r"rowwise_sgd_update: rows holds"):
        optim.rowwise_sgd_update(w, torch.tensor(rows), torch.randn(3, 4), 0.5)
    assert torch.equal(w, before)


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------

has_cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "engram::dedup_row_grads_padded", "CUDA"
)
needs_cuda = pytest.mark.skipif(not has_cuda_kernels, reason="needs a CUDA GPU and a CUDA build of engram")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [50, 100_000])
def test_cuda_padded_matches_cpu_without_sync(dtype, num_rows):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, num_rows, (16, 100, 4), generator=gen)
    ids[:, :, 0] = torch.randint(0, 3, (16, 100), generator=gen)  # three rows with hundreds of entries
    grad = torch.randn(16, 100, 4, 8, generator=gen).to(dtype)
    rows, row_grads = optim.dedup_row_grads_padded(grad, ids, None, num_rows)
    grad_gpu, ids_gpu = grad.cuda(), ids.cuda()
    optim.dedup_row_grads_padded(grad_gpu, ids_gpu, None, num_rows)  # sets up the error record (may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows_gpu, row_grads_gpu = optim.dedup_row_grads_padded(grad_gpu, ids_gpu, None, num_rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(rows_gpu.cpu(), rows)
    u = int((rows >= 0).sum())
    counts = torch.bincount(ids.reshape(-1), minlength=num_rows)[rows[:u]]
    few = counts <= 32  # summed in entry order on both devices
    assert torch.equal(row_grads_gpu.cpu()[:u][few], row_grads[:u][few])
    assert torch.equal(row_grads_gpu.cpu()[u:], row_grads[u:])  # zero padding
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(row_grads_gpu.cpu().double(), row_grads.double(), rtol=tol, atol=tol * 100)


@needs_cuda
def test_cuda_padded_graph_capture():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (8, 30, 2), generator=gen).cuda()
    grad = torch.randn(8, 30, 2, 4, generator=gen).cuda()
    out = optim.dedup_row_grads_padded(grad, ids, None, 40)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows, row_grads = optim.dedup_row_grads_padded(grad, ids, None, 40)
    new_ids = torch.randint(0, 40, ids.shape, generator=gen)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    want_rows, want = optim.dedup_row_grads_padded(grad.cpu(), new_ids, None, 40)
    assert torch.equal(rows.cpu(), want_rows)
    torch.testing.assert_close(row_grads.cpu(), want, rtol=1e-5, atol=1e-5)
    del out


@needs_cuda
def test_cuda_padded_bad_ids_deferred_and_all_padding():
    ids = torch.tensor([[0, 1], [2, 3]], device="cuda")
    offsets = torch.tensor([0, 5], device="cuda")
    grad = torch.randn(2, 2, 3, device="cuda")
    rows, _ = optim.dedup_row_grads_padded(grad, ids, offsets, 9)
    assert rows.tolist() == [0, 2, 6, 8]
    # Deferred (the default): no raise at the call, every row is padding, and
    # the report names the op.
    rows, row_grads = optim.dedup_row_grads_padded(grad, ids, offsets, 8)
    assert rows.tolist() == [-1] * 4 and not row_grads.any()
    match = r"dedup_row_grads_padded: ids holds 8 at flat index 3 \(after adding offsets\)"
    with pytest.raises(IndexError, match=match):
        engram.check_cuda_errors()
    previous = engram.cuda_sync_checks()
    engram.set_cuda_sync_checks(True)
    try:
        with pytest.raises(IndexError, match=match):
            optim.dedup_row_grads_padded(grad, ids, offsets, 8)
    finally:
        engram.set_cuda_sync_checks(previous)


@needs_cuda
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam"])
def test_cuda_fused_rowwise_step_has_no_host_sync_and_matches_cpu(rule):
    """The fused backward on a CUDA table uses the padded row sums: a whole
    lookup + backward + update runs under set_sync_debug_mode("error") and
    gives the CPU's table (rows with at most 32 entries: same sums)."""
    from engram.layer import MultiHeadEmbedding

    torch.manual_seed(0)
    cpu = MultiHeadEmbedding([97, 89], 8)
    gpu = MultiHeadEmbedding([97, 89], 8).cuda()
    gpu.load_state_dict(cpu.state_dict())
    opts = [optim.make_rowwise(m, rule, lr=0.1) for m in (cpu, gpu)]
    ids = torch.randint(0, 89, (4, 16, 2))
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        module(ids.to(device)).square().sum().backward()  # warm-up: error record, kernels
    torch.cuda.synchronize()
    gpu_ids = ids.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu(gpu_ids).square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu(ids).square().sum().backward()
    torch.testing.assert_close(gpu.embedding.weight.detach().cpu(), cpu.embedding.weight.detach(),
                               rtol=1e-6, atol=1e-6)
    del opts
