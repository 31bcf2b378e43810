"""The composite CUDA kernels of the layer ops (engram/_cuda_composite.py),
checked on the CPU against the fused CPU kernels: the same formulas must give
the same values and gradients wherever they run."""

import torch

from engram import _cuda_composite as composite


def test_context_gate_composite_matches_fused_kernel():
    key, hidden = torch.randn(2, 5, 3, 16, dtype=torch.float64), torch.randn(2, 5, 3, 16, dtype=torch.float64)
    wk, wq = torch.rand(3, 16, dtype=torch.float64) + 0.5, torch.rand(3, 16, dtype=torch.float64) + 0.5
    args = (key, hidden, wk, wq, None)
    torch.testing.assert_close(composite.context_gate(*args), torch.ops.engram.context_gate(*args))
    grad = torch.randn(2, 5, 3, dtype=torch.float64)
    for got, want in zip(composite.context_gate_backward(grad, *args),
                         torch.ops.engram.context_gate_backward(grad, *args)):
        torch.testing.assert_close(got, want)


def test_gated_short_conv_composite_matches_fused_kernel():
    value, gate = torch.randn(2, 11, 16, dtype=torch.float64), torch.rand(2, 11, 3, dtype=torch.float64)
    norm_w, conv_w = torch.rand(3, 16, dtype=torch.float64) + 0.5, torch.randn(48, 4, dtype=torch.float64)
    args = (value, gate, norm_w, conv_w, 3, 1e-5)
    torch.testing.assert_close(composite.gated_short_conv(*args), torch.ops.engram.gated_short_conv(*args))
    grad = torch.randn(2, 11, 3, 16, dtype=torch.float64)
    for got, want in zip(composite.gated_short_conv_backward(grad, *args),
                         torch.ops.engram.gated_short_conv_backward(grad, *args)):
        torch.testing.assert_close(got, want)
