"""CUDA kernels against the CPU kernels (which are tested against the reference).

Every test here needs a GPU and a CUDA build of engram; without one they skip.
"""

import pytest
import torch
from torch.library import opcheck

import engram
from engram import CompressionTable, EngramConfig, EngramLayer, NgramHasher, ops
from engram import reference as ref

has_cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "engram::ngram_hash", "CUDA"
)
pytestmark = pytest.mark.skipif(not has_cuda_kernels, reason="needs a CUDA GPU and a CUDA build of engram")


@pytest.mark.parametrize("family", ["deepseek", "xxh64"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (4, 257)])
def test_ngram_hash_matches_cpu(family, shape):
    cfg = EngramConfig(hash=family, layer_ids=[1, 15, 3])
    table = CompressionTable(torch.randint(0, 9000, (12000,)).unique(return_inverse=True)[1])
    hasher = NgramHasher(cfg, table)
    ids = torch.randint(-5, table.vocab_size, shape)
    for with_offsets in (False, True):
        cpu = hasher.hash_stacked(ids, with_offsets=with_offsets)
        gpu = hasher.hash_stacked(ids.cuda(), with_offsets=with_offsets)
        assert torch.equal(gpu.cpu(), cpu)


@pytest.fixture
def sync_checks():
    """CUDA id checks that synchronise and raise at the call, restored after the test."""
    engram.set_cuda_sync_checks(True)
    yield
    engram.set_cuda_sync_checks(False)


def _bad_hash_ids():
    ids = torch.randint(0, 100, (2, 9), device="cuda")
    ids[1, 4] = 100
    return ids


def test_ngram_hash_errors_on_cuda_at_the_call(sync_checks):
    hasher = NgramHasher(EngramConfig(), CompressionTable.identity(100))
    with pytest.raises(IndexError, match=r"^ngram_hash: input_ids holds 100 at flat index 13; expected values < 100 for vocab_size=100$"):
        hasher.hash(_bad_hash_ids())
    hasher.hash(_bad_hash_ids().clamp_max(99))  # the report was taken: the next call runs


def test_ngram_hash_errors_on_cuda_deferred():
    hasher = NgramHasher(EngramConfig(), CompressionTable.identity(100))
    hasher.hash(_bad_hash_ids())  # no sync: the kernel only leaves a report
    with pytest.raises(IndexError, match=r"ngram_hash: input_ids holds 100 at flat index 13; .*earlier engram call on cuda:0"):
        engram.check_cuda_errors()
    engram.check_cuda_errors()  # taken once
    # ... and the next op on the device raises it when it was not taken by hand
    hasher.hash(_bad_hash_ids())
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=r"input_ids holds 100"):
        hasher.hash(_bad_hash_ids().clamp_max(99))
    engram.check_cuda_errors()


def test_head_table_errors_on_cuda(sync_checks):
    cfg = EngramConfig(engram_vocab_size=[101, 211])
    hasher = NgramHasher(cfg, CompressionTable.identity(300))
    lookup, keys, sizes, offsets = hasher._params(torch.device("cuda"), cfg.layer_ids)
    ids = torch.randint(0, 300, (2, 11), device="cuda")
    bad_sizes = sizes.clone()
    bad_sizes[0, 3] = 0
    with pytest.raises(ValueError, match=r"head_sizes holds 0 at flat index 3; expected table sizes >= 1"):
        ops.ngram_hash(ids, lookup, keys, bad_sizes, offsets, cfg.pad_id)
    bad_offsets = offsets.clone()
    bad_offsets[1, 0] = 2**63 - 5
    with pytest.raises(ValueError, match=r"offsets holds 9223372036854775803 at flat index \d+; with head_sizes"):
        ops.ngram_hash(ids, lookup, keys, sizes, bad_offsets, cfg.pad_id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_embedding_forward_backward_match_reference(dtype):
    sizes = [5, 7, 11, 3]
    offsets = ref.head_offsets(sizes).cuda()
    weight = torch.randn(sum(sizes), 8, dtype=dtype, device="cuda", requires_grad=True)
    ids = torch.stack([torch.randint(0, s, (3, 40)) for s in sizes], dim=-1).cuda()
    out = ops.multihead_embedding(weight, ids, offsets)
    assert torch.equal(out, ref.multihead_embedding(weight.detach(), ids, offsets))
    grad = torch.randn_like(out)
    out.backward(grad)
    w64 = weight.detach().double().requires_grad_()
    ref.multihead_embedding(w64, ids, offsets).backward(grad.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dh", [5, 33])
def test_embedding_backward_long_pad_run_matches_cpu(dtype, dh):
    # 16-bit tables: each row's run of sorted entries is summed in pieces of
    # 32, then per row in a fixed order. The pad row's run here spans ~30
    # pieces; every other row has a few entries, summed exactly as on the CPU.
    weight_rows, pad_row = 50, 7
    ids = torch.randint(0, weight_rows, (4, 300))
    ids[:, 60:] = pad_row
    grad = torch.randn(4, 300, dh).to(dtype)
    cpu = torch.ops.engram.multihead_embedding_backward(grad, ids, None, weight_rows)
    grad_gpu, ids_gpu = grad.cuda(), ids.cuda()
    torch.ops.engram.multihead_embedding_backward(grad_gpu, ids_gpu, None, weight_rows)  # warm-up: allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = torch.ops.engram.multihead_embedding_backward(grad_gpu, ids_gpu, None, weight_rows)
        again = torch.ops.engram.multihead_embedding_backward(grad_gpu, ids_gpu, None, weight_rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu, again)  # the same bits every run
    gpu = gpu.cpu()
    others = torch.arange(weight_rows) != pad_row
    assert torch.equal(gpu[others], cpu[others])
    torch.testing.assert_close(gpu[pad_row].float(), cpu[pad_row].float(), atol=1e-3, rtol=2**-7)


def test_embedding_row_out_of_range_on_cuda(sync_checks):
    weight = torch.randn(10, 4, device="cuda", requires_grad=True)
    ids = torch.tensor([[1, 10]], device="cuda")
    with pytest.raises(IndexError, match=r"^multihead_embedding: ids holds 10 at flat index 1; expected values in \[0, 10\) for weight.size\(0\)=10$"):
        ops.multihead_embedding(weight, ids, None)
    offsets = torch.tensor([0, 2**63 - 1], device="cuda")
    with pytest.raises(IndexError, match=r"ids holds 10 at flat index 1; adding offsets\[1\]=9223372036854775807 overflows int64"):
        ops.multihead_embedding(weight, ids, offsets)
    grad = torch.ones(1, 2, 4, device="cuda")
    with pytest.raises(IndexError, match=r"^multihead_embedding_backward: ids holds 10 at flat index 1; expected values in \[0, 10\) for num_rows=10$"):
        torch.ops.engram.multihead_embedding_backward(grad, ids, None, 10)


def test_embedding_row_out_of_range_on_cuda_deferred():
    weight = torch.randn(10, 4, device="cuda")
    ids = torch.tensor([[1, 10]], device="cuda")
    out = ops.multihead_embedding(weight, ids, None)
    with pytest.raises(IndexError, match=r"ids holds 10 at flat index 1; .*read that entry as zeros"):
        engram.check_cuda_errors()
    assert torch.equal(out[0, 1].cpu(), torch.zeros(4)) and torch.equal(out[0, 0], weight[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("dh", [1, 3, 8, 64, 300])
@pytest.mark.parametrize("tokens", [7, 333])
def test_embedding_gather_every_row_width(dtype, dh, tokens):
    # 16-byte chunks where a row allows them, element words otherwise; a warp
    # per 32 entries (333 x 2: 21 groups, the last one partial).
    weight = torch.randn(50, dh, device="cuda").to(dtype)
    ids = torch.randint(0, 24, (tokens, 2), device="cuda")
    offsets = torch.tensor([0, 25], device="cuda")
    assert torch.equal(ops.multihead_embedding(weight, ids, offsets), weight[ids + offsets])
    assert torch.equal(ops.multihead_embedding(weight[1:], ids, offsets), weight[1:][ids + offsets])  # unaligned


def test_opcheck_cuda():
    cfg = EngramConfig(engram_vocab_size=[101, 211])
    hasher = NgramHasher(cfg, CompressionTable.identity(300))
    lookup, keys, sizes, offsets = hasher._params(torch.device("cuda"), cfg.layer_ids)
    ids = torch.randint(0, 300, (2, 11), device="cuda")
    opcheck(torch.ops.engram.compress_ids.default, (ids, lookup))
    opcheck(torch.ops.engram.ngram_hash.default, (ids, lookup, keys, sizes, offsets, cfg.pad_id, "deepseek"))
    weight = torch.randn(int(sizes[0].sum()), 4, device="cuda", requires_grad=True)
    rows = ops.ngram_hash(ids, lookup, keys[:1], sizes[:1], None, cfg.pad_id)[0]
    opcheck(torch.ops.engram.multihead_embedding.default, (weight, rows, offsets[0], False))


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_engram_layer_on_cuda_matches_cpu(hc_mult):
    cfg = EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[0])
    layer = EngramLayer(cfg, 0, hidden_size=32, hc_mult=hc_mult, compression=CompressionTable.identity(500)).double()
    hidden = torch.randn(2, 13, hc_mult, 32, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 500, (2, 13))
    out_cpu = layer(hidden, ids)
    out_cpu.sum().backward()
    grads_cpu = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer_gpu = layer.cuda()
    hidden_gpu = hidden.detach().cuda().requires_grad_()
    out_gpu = layer_gpu(hidden_gpu, ids.cuda())
    out_gpu.sum().backward()
    torch.testing.assert_close(out_gpu.cpu(), out_cpu)
    for p, g in zip(layer_gpu.parameters(), grads_cpu):
        torch.testing.assert_close(p.grad.cpu(), g)
