"""Shared pieces of the placement and prefetcher tests (tests/test_placement.py,
tests/test_prefetcher.py): a small config, layers in each placement, inputs."""

import pytest
import torch

from engram import CompressionTable, EngramConfig, EngramLayer

VOCAB = 300
D = 16


def config(**changes):
    return EngramConfig(engram_vocab_size=[997, 1009], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                        layer_ids=[1, 3], **changes)


def make_layer(placement="device", path=None, layer_id=1, seed=0, g=1):
    torch.manual_seed(seed)
    return EngramLayer(config(), layer_id, D, hc_mult=g, compression=CompressionTable.identity(VOCAB),
                       table_placement=placement, table_path=path)


def inputs(b=2, t=12, seed=1, g=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=gen)
    shape = (b, t, D) if g == 1 else (b, t, g, D)
    return torch.randn(shape, generator=gen), ids


def forward_backward(layer, hidden, ids):
    hidden = hidden.clone().requires_grad_(True)
    out = layer(hidden, ids)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad, grads


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


has_cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "engram::gather_rows", "CUDA"
)
needs_cuda = pytest.mark.skipif(not has_cuda_kernels, reason="needs a CUDA GPU and a CUDA build of engram")
