"""CUDA kernels of the layer ops, for now as compositions of PyTorch ops.

The hash and embedding ops have hand-written CUDA kernels (csrc/cuda); the
fused context gate and short convolution have fused CPU kernels only. On a GPU
these registrations run the plain-PyTorch statement of each op (the same
formulas as engram.reference), so an EngramLayer works on CUDA, unfused.
Backward ops take the gradient of that statement with autograd.
"""

from __future__ import annotations

import torch

from . import _checks, reference


def context_gate(key, hidden, key_norm_weight, hidden_norm_weight, eps=None):
    _checks.context_gate_args("context_gate", key, hidden, key_norm_weight, hidden_norm_weight, eps)
    return reference.context_gate(key, hidden, key_norm_weight, hidden_norm_weight, eps)


def context_gate_backward(grad_gate, key, hidden, key_norm_weight, hidden_norm_weight, eps=None):
    op = "context_gate_backward"
    b, t, g, _ = _checks.context_gate_args(op, key, hidden, key_norm_weight, hidden_norm_weight, eps)
    _checks.grad_like_args(op, "grad_gate", grad_gate, key, (b, t, g))
    inputs = [t.detach().requires_grad_() for t in (key, hidden, key_norm_weight, hidden_norm_weight)]
    with torch.enable_grad():
        gate = reference.context_gate(*inputs, eps)
        return tuple(torch.autograd.grad(gate, inputs, grad_gate))


# Taps that reach before the sequence start read zeros: any dilation >= T
# gives the result of dilation T, without padding by (kernel_size-1)*dilation.
def gated_short_conv(value, gate, norm_weight, conv_weight, dilation, eps):
    _checks.gated_short_conv_args("gated_short_conv", value, gate, norm_weight, conv_weight, dilation, eps)
    dilation = min(dilation, value.shape[1])
    return reference.gated_short_conv(value, gate, norm_weight, conv_weight, dilation, eps)


def gated_short_conv_backward(grad_out, value, gate, norm_weight, conv_weight, dilation, eps):
    op = "gated_short_conv_backward"
    b, t, g, d, _ = _checks.gated_short_conv_args(op, value, gate, norm_weight, conv_weight, dilation, eps)
    _checks.grad_like_args(op, "grad_out", grad_out, value, (b, t, g, d))
    dilation = min(dilation, t)
    inputs = [x.detach().requires_grad_() for x in (value, gate, norm_weight, conv_weight)]
    with torch.enable_grad():
        out = reference.gated_short_conv(*inputs, dilation, eps)
        return tuple(torch.autograd.grad(out, inputs, grad_out))


COMPOSITES = {
    "engram::context_gate": context_gate,
    "engram::context_gate_backward": context_gate_backward,
    "engram::gated_short_conv": gated_short_conv,
    "engram::gated_short_conv_backward": gated_short_conv_backward,
}


def register() -> None:
    for name, fn in COMPOSITES.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            torch.library.register_kernel(name, "cuda", fn)
