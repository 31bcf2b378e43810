"""engram.optim on CUDA against the CPU kernels (tested against torch and the
float64 rules in tests/test_optim.py). Every test needs a GPU and a CUDA build
of engram; without one they skip.

What must agree bit for bit: the update rules (the same IEEE operations,
never fused, on both devices; Adagrad's row reduction uses one lane tree on
both) and the row sums of rows with at most 32 entries (entry order on both).
Hotter rows are summed in pieces of 32 entries on the GPU: close, not equal.
"""

import pytest
import torch
from torch.library import opcheck

import engram
from engram import optim

has_cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "engram::dedup_row_grads", "CUDA"
)
pytestmark = pytest.mark.skipif(not has_cuda_kernels, reason="needs a CUDA GPU and a CUDA build of engram")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [50, 100_000])
def test_dedup_matches_cpu(dtype, num_rows):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, num_rows, (64, 200, 4), generator=gen)
    ids[:, :, 0] = torch.randint(0, 3, (64, 200), generator=gen)  # three rows with thousands of entries
    grad = torch.randn(64, 200, 4, 16, generator=gen).to(dtype)
    rows, row_grads = optim.dedup_row_grads(grad, ids, None, num_rows)
    rows_gpu, row_grads_gpu = optim.dedup_row_grads(grad.cuda(), ids.cuda(), None, num_rows)
    assert torch.equal(rows_gpu.cpu(), rows)
    counts = torch.bincount(ids.reshape(-1), minlength=num_rows)[rows]
    few = counts <= 32
    assert few.any() and (~few).any()
    assert torch.equal(row_grads_gpu.cpu()[few], row_grads[few])
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(row_grads_gpu.cpu().double(), row_grads.double(), rtol=tol, atol=tol * 100)


def test_dedup_with_offsets_and_errors_on_cuda():
    ids = torch.tensor([[0, 1], [2, 3]], device="cuda")
    offsets = torch.tensor([0, 5], device="cuda")
    grad = torch.randn(2, 2, 3, device="cuda")
    rows, _ = optim.dedup_row_grads(grad, ids, offsets, 9)
    assert rows.tolist() == [0, 2, 6, 8]
    with pytest.raises(IndexError, match=r"ids holds 8 at flat index 3 \(after adding offsets\)"):
        optim.dedup_row_grads(grad, ids, offsets, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "adamw"])
@pytest.mark.parametrize("dh", [64, 20])
def test_updates_match_cpu_bitwise(dtype, rule, dh):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(500, dh, generator=gen).to(dtype)
    state = {"sgd": [], "adagrad": [torch.rand(500).to(dtype)],
             "adam": [torch.randn(500, dh).to(dtype), torch.rand(500, dh).to(dtype)]}[rule if rule != "adamw" else "adam"]
    cpu = [w.clone(), *[s.clone() for s in state]]
    gpu = [w.cuda(), *[s.cuda() for s in state]]
    for step in range(1, 4):
        rows = torch.randperm(500, generator=gen)[:120].sort().values
        row_grads = torch.randn(120, dh, generator=gen).to(dtype)
        for tensors, device in ((cpu, "cpu"), (gpu, "cuda")):
            r, g = rows.to(device), row_grads.to(device)
            if rule == "sgd":
                optim.rowwise_sgd_update(tensors[0], r, g, 0.1, 0.01)
            elif rule == "adagrad":
                optim.rowwise_adagrad_update(tensors[0], tensors[1], r, g, 0.1, 1e-8, 0.01)
            else:
                optim.rowwise_adam_update(*tensors, r, g, 0.01, 0.9, 0.999, 1e-8, 0.01, rule == "adamw", step)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_update_errors_on_cuda():
    w = torch.randn(10, 4, device="cuda")
    before = w.clone()
    zeros = torch.zeros(2, 4, device="cuda")
    engram.set_cuda_sync_checks(True)  # raised at the call, as on the CPU
    try:
        with pytest.raises(ValueError, match=r"rows holds 3 then 3 at indices 0 and 1"):
            optim.rowwise_sgd_update(w, torch.tensor([3, 3], device="cuda"), zeros, 0.1)
        with pytest.raises(IndexError, match=r"rows holds 10 at flat index 1"):
            optim.rowwise_sgd_update(w, torch.tensor([3, 10], device="cuda"), zeros, 0.1)
    finally:
        engram.set_cuda_sync_checks(False)
    # Default: checked on the device without a host sync, raised later; in
    # both modes nothing is written.
    optim.rowwise_adam_update(w, torch.zeros_like(w), torch.zeros_like(w), torch.tensor([5, 2], device="cuda"),
                              zeros, 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1)
    with pytest.raises(ValueError, match=r"rowwise_adam_update: rows holds 5 then 2 at indices 0 and 1"):
        engram.check_cuda_errors()
    assert torch.equal(w, before)
    with pytest.raises(RuntimeError, match=r"rows is on cpu but weight is on cuda"):
        optim.rowwise_sgd_update(w, torch.tensor([3]), torch.zeros(1, 4, device="cuda"), 0.1)


def test_opcheck_on_cuda():
    ids = torch.randint(0, 9, (3, 5, 2), device="cuda")
    grad = torch.randn(3, 5, 2, 4, device="cuda")
    opcheck(torch.ops.engram.dedup_row_grads.default, (grad, ids, None, 9))
    w = torch.randn(9, 4, device="cuda")
    rows = torch.tensor([1, 4], device="cuda")
    g = torch.randn(2, 4, device="cuda")
    opcheck(torch.ops.engram.rowwise_adam_update.default,
            (w, torch.zeros_like(w), torch.zeros_like(w), rows, g, 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1))
    opcheck(torch.ops.engram.rowwise_adagrad_update.default, (w, torch.zeros(9, device="cuda"), rows, g, 0.1, 1e-8, 0.0))
    opcheck(torch.ops.engram.rowwise_sgd_update.default, (w, rows, g, 0.1, 0.0))


def test_fused_layer_on_cuda_matches_cpu():
    cfg = engram.EngramConfig(engram_vocab_size=[101, 103], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    torch.manual_seed(0)
    cpu_layer = engram.EngramLayer(cfg, 1, 24, compression=engram.CompressionTable.identity(64))
    gpu_layer = engram.EngramLayer(cfg, 1, 24, compression=engram.CompressionTable.identity(64))
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    gpu_layer = gpu_layer.cuda()
    cpu_opt = optim.make_rowwise(cpu_layer, "adam", lr=0.01)
    gpu_opt = optim.make_rowwise(gpu_layer, "adam", lr=0.01)
    for _ in range(3):
        x, ids = torch.randn(2, 12, 24), torch.randint(0, 64, (2, 12))
        cpu_layer(x, ids).square().mean().backward()
        gpu_layer(x.cuda(), ids.cuda()).square().mean().backward()
    table = gpu_layer.multi_head_embedding.embedding.weight
    assert table.grad is None and gpu_opt.state[table]["exp_avg"].is_cuda
    # The gradients reaching the table come from cuBLAS vs the CPU: close, not equal.
    torch.testing.assert_close(table.cpu(), cpu_layer.multi_head_embedding.embedding.weight, rtol=1e-4, atol=1e-5)
    assert cpu_opt.state[cpu_layer.multi_head_embedding.embedding.weight]["step"] == 3
