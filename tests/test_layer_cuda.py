"""The CUDA kernels of the layer ops (csrc/cuda/layer_ops.cu) against the CPU
kernels (which tests/test_layer_ops.py tests against the reference), through
the ops and autograd: forward and every gradient in every dtype, gradcheck,
opcheck, errors, determinism, CUDA-graph capture, and a whole EngramLayer.

Every test here needs a GPU and a CUDA build of engram; without one they skip.
Tolerances are those of tests/test_layer_ops.py: float64 1e-10 relative;
float32 |cuda - cpu| <= 1e-5 + 1e-5 * |cpu| + 2 * |cpu - float64|; bf16 and
fp16 at most 1 ulp from the float64 truth in every draw (both kernels compute
in float32 and round once) and, in the median, at most 2 x the CPU kernel's
error + 1 ulp.
"""

import pytest
import torch
from test_layer_ops import ReducedPrecisionErrors, assert_float32_matches
from torch.library import opcheck

from engram import CompressionTable, EngramConfig, EngramLayer, ops
from engram import reference as ref

has_cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "engram::gated_short_conv", "CUDA"
)
pytestmark = pytest.mark.skipif(not has_cuda_kernels, reason="needs a CUDA GPU and a CUDA build of engram")

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16, F64]


# --------------------------------------------------------------------------
# inputs: CPU tensors, and how each device views them
# --------------------------------------------------------------------------


def gate_case(b, t, g, d, dtype, strided):
    """(bases, view): the tensors to move, and the function that makes the op's
    inputs from them on a device. strided: key as the layer passes it, a view
    of one fused projection [B, T, (G+1)*D]."""
    key = torch.randn(b, t, (g + 1) * d if strided else g * d, dtype=F64)
    hidden = torch.randn(b, t, g, d, dtype=F64)
    wk = 1 + 0.3 * torch.randn(g, d, dtype=F64)
    wq = 1 + 0.3 * torch.randn(g, d, dtype=F64)

    def view(key, hidden, wk, wq):
        key = key[..., d:] if strided else key
        return key.unflatten(-1, (g, d)), hidden, wk, wq

    return [x.to(dtype) for x in (key, hidden, wk, wq)], view


def conv_case(b, t, g, d, kernel_size, dtype, strided):
    value = torch.randn(b, t, 2 * d if strided else d, dtype=F64)
    gate = torch.rand(b, t, g, dtype=F64)
    wn = 1 + 0.3 * torch.randn(g, d, dtype=F64)
    wc = torch.randn(g * d, kernel_size, dtype=F64) / kernel_size

    def view(value, gate, wn, wc):
        return (value[..., :d] if strided else value), gate, wn, wc

    return [x.to(dtype) for x in (value, gate, wn, wc)], view


def run(fn, bases, view, grad_out, device):
    """fn's output and the gradients of sum(grad_out * out) for each input
    (the views, not their bases), on `device`, back on the CPU."""
    leaves = [x.detach().to(device).requires_grad_() for x in bases]
    inputs = view(*leaves)
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device))
    return [out.detach().cpu(), *(g.cpu() for g in grads)]


def compare_devices(fn, ref_fn, bases, view, grad_out, name, errors=None):
    """CUDA against the CPU kernels, output and every input gradient."""
    cpu = run(fn, bases, view, grad_out, "cpu")
    gpu = run(fn, bases, view, grad_out, "cuda")
    dtype = bases[0].dtype
    if dtype == F64:
        for c, g in zip(cpu, gpu, strict=True):
            torch.testing.assert_close(g, c, atol=1e-12, rtol=1e-10)
        return
    truth = run(ref_fn, [x.double() for x in bases], view, grad_out.double(), "cpu")
    for i, (c, g, t) in enumerate(zip(cpu, gpu, truth, strict=True)):
        assert g.dtype == dtype
        if dtype == torch.float32:
            assert_float32_matches(g, c, t)
        else:
            errors.add(f"{name} {'output' if i == 0 else f'grad of input {i - 1}'}", g, c, t)


# --------------------------------------------------------------------------
# CUDA against CPU
# --------------------------------------------------------------------------

GATE_SHAPES = [(1, 1, 1, 1), (2, 5, 3, 12), (2, 7, 2, 37), (1, 3, 4, 64), (3, 40, 2, 200)]
CONV_SHAPES = [  # (b, t, g, d, kernel_size, dilation)
    (1, 1, 1, 1, 4, 1),  # one token
    (2, 7, 3, 12, 4, 2),
    (2, 5, 2, 37, 4, 9),  # dilation >= T: only the last tap reaches
    (1, 6, 1, 33, 1, 1),  # kernel_size 1
    (2, 150, 2, 70, 4, 3),  # several weight-gradient chunks of 64 tokens
    (1, 4, 2, 8, 3, 2**62),  # a dilation whose reach would overflow int64
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_context_gate_matches_cpu(dtype, strided, eps):
    errors = ReducedPrecisionErrors()
    for seed in range(4 if dtype in (torch.bfloat16, torch.float16) else 1):
        torch.manual_seed(seed)
        for b, t, g, d in GATE_SHAPES:
            if d == 1 and dtype in (torch.bfloat16, torch.float16):
                continue  # one value per row: the gradients cancel to rounding noise, no ulp bound holds
            bases, view = gate_case(b, t, g, d, dtype, strided)
            # eps=None is the dtype's epsilon: the float64 truth keeps it.
            ref_eps = torch.finfo(dtype).eps if eps is None else eps
            grad_gate = torch.randn(b, t, g, dtype=F64).to(dtype)
            compare_devices(lambda *a: ops.context_gate(*a, eps), lambda *a: ref.context_gate(*a, ref_eps), bases,
                            view, grad_gate, f"context_gate {(b, t, g, d)}", errors)
    if dtype in (torch.bfloat16, torch.float16):
        errors.check(max_ulp=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_gated_short_conv_matches_cpu(dtype, strided):
    errors = ReducedPrecisionErrors()
    for seed in range(4 if dtype in (torch.bfloat16, torch.float16) else 1):
        torch.manual_seed(seed)
        for b, t, g, d, kernel_size, dilation in CONV_SHAPES:
            if d == 1 and dtype in (torch.bfloat16, torch.float16):
                continue  # one value per row: the gradients cancel to rounding noise, no ulp bound holds
            bases, view = conv_case(b, t, g, d, kernel_size, dtype, strided)
            grad_out = torch.randn(b, t, g, d, dtype=F64).to(dtype)
            ref_dilation = min(dilation, t + 1)  # the reference pads (kernel_size-1)*dilation zeros
            compare_devices(lambda *a: ops.gated_short_conv(*a, dilation, 1e-5),
                            lambda *a: ref.gated_short_conv(*a, ref_dilation, 1e-5), bases, view, grad_out,
                            f"gated_short_conv {(b, t, g, d, kernel_size, dilation)}", errors)
    if dtype in (torch.bfloat16, torch.float16):
        errors.check(max_ulp=1)


def test_gate_gradient_at_zero_score_matches_cpu():
    # s = 0 exactly (orthogonal rows): gate 1/2 and no gradient, as on the CPU.
    key = torch.zeros(1, 2, 1, 4, dtype=F64)
    hidden = torch.zeros(1, 2, 1, 4, dtype=F64)
    key[0, :, 0, 0] = 1.0
    hidden[0, 0, 0, 1] = 1.0
    hidden[0, 1, 0, :2] = torch.tensor([0.7, 0.3], dtype=F64)
    bases = [key, hidden, torch.ones(1, 4, dtype=F64), torch.ones(1, 4, dtype=F64)]
    grad = torch.ones(1, 2, 1, dtype=F64)
    gpu = run(ops.context_gate, bases, lambda *a: a, grad, "cuda")
    cpu = run(ops.context_gate, bases, lambda *a: a, grad, "cpu")
    assert gpu[0][0, 0, 0].item() == 0.5
    assert gpu[1][0, 0].abs().max().item() == 0.0 and gpu[2][0, 0].abs().max().item() == 0.0
    for c, g in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(g, c, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------
# gradcheck (float64), opcheck
# --------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("shape", [(1, 3, 2, 6), (2, 1, 1, 35)])
def test_context_gate_gradcheck_cuda(eps, shape):
    bases, view = gate_case(*shape, F64, strided=False)
    inputs = [x.cuda().requires_grad_() for x in bases]
    assert torch.autograd.gradcheck(lambda *a: ops.context_gate(*a, eps), inputs)


@pytest.mark.parametrize("t, dilation", [(7, 2), (2, 3), (1, 1)])  # (2, 3): T shorter than the conv's reach
def test_gated_short_conv_gradcheck_cuda(t, dilation):
    bases, _ = conv_case(2, t, 2, 5, 3, F64, strided=False)
    inputs = [x.cuda().requires_grad_() for x in bases]
    assert torch.autograd.gradcheck(lambda *a: ops.gated_short_conv(*a, dilation, 1e-5), inputs)


def opcheck_samples():
    torch.manual_seed(0)
    (key, hidden, wk, wq), gate_view = gate_case(2, 5, 3, 12, torch.float32, strided=False)
    strided_bases, strided_view = gate_case(2, 5, 3, 12, torch.float32, strided=True)
    # leaves that keep the strides of the layer's views
    strided = [x.detach().requires_grad_() for x in strided_view(*[b.cuda() for b in strided_bases])]
    (value, gate, wn, wc), _ = conv_case(2, 7, 3, 12, 4, torch.float32, strided=False)
    key = key.unflatten(-1, (3, 12))
    grad_gate = torch.randn(2, 5, 3)
    grad_out = torch.randn(2, 7, 3, 12)
    req = lambda *ts: [t.cuda().requires_grad_() for t in ts]  # noqa: E731
    cuda = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    return [
        (torch.ops.engram.context_gate.default, (*req(key, hidden, wk, wq), None)),
        (torch.ops.engram.context_gate.default, (*strided, 1e-5)),
        (torch.ops.engram.context_gate_backward.default, (*cuda(grad_gate, key, hidden, wk, wq), None)),
        (torch.ops.engram.gated_short_conv.default, (*req(value, gate, wn, wc), 3, 1e-5)),
        (torch.ops.engram.gated_short_conv.default, (*req(value[:, :2], gate[:, :2], wn, wc), 3, 1e-5)),
        (torch.ops.engram.gated_short_conv_backward.default, (*cuda(grad_out, value, gate, wn, wc), 2, 1e-5)),
    ]


def test_opcheck_cuda():
    for op, args in opcheck_samples():
        opcheck(op, args)


# --------------------------------------------------------------------------
# determinism, CUDA graphs
# --------------------------------------------------------------------------


def backward_calls():
    torch.manual_seed(3)
    (key, hidden, wk, wq), _ = gate_case(2, 300, 2, 48, torch.float32, strided=False)
    (value, gate, wn, wc), _ = conv_case(2, 300, 2, 48, 4, torch.float32, strided=False)
    key, hidden, wk, wq, value, gate, wn, wc = [x.cuda() for x in (key.unflatten(-1, (2, 48)), hidden, wk, wq, value,
                                                                    gate, wn, wc)]
    grad_gate, grad_out = torch.randn(2, 300, 2, device="cuda"), torch.randn(2, 300, 2, 48, device="cuda")
    return [
        lambda: (torch.ops.engram.context_gate(key, hidden, wk, wq, None),),
        lambda: torch.ops.engram.context_gate_backward(grad_gate, key, hidden, wk, wq, None),
        lambda: (torch.ops.engram.gated_short_conv(value, gate, wn, wc, 3, 1e-5),),
        lambda: torch.ops.engram.gated_short_conv_backward(grad_out, value, gate, wn, wc, 3, 1e-5),
    ]


def test_results_are_bitwise_reproducible():
    # No atomics: weight gradients are summed in a fixed order.
    for call in backward_calls():
        first, second = call(), call()
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)


def test_ops_capture_in_a_cuda_graph():
    # A host synchronisation inside a launcher would make the capture fail.
    calls = backward_calls()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = [call() for call in calls]  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [call() for call in calls]
    graph.replay()
    torch.cuda.synchronize()
    for want, got in zip(eager, captured, strict=True):
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------
# bad inputs: the CPU's exception type and message
# --------------------------------------------------------------------------


def bad_calls():
    (key, hidden, wk, wq), _ = gate_case(2, 5, 3, 12, torch.float32, strided=False)
    key = key.unflatten(-1, (3, 12))
    (value, gate, wn, wc), _ = conv_case(2, 7, 3, 12, 4, torch.float32, strided=False)
    cg, cgb = torch.ops.engram.context_gate, torch.ops.engram.context_gate_backward
    sc, scb = torch.ops.engram.gated_short_conv, torch.ops.engram.gated_short_conv_backward
    return [
        (cg, (key, hidden.double(), wk, wq, None)),
        (cg, (key.flatten(2), hidden, wk, wq, None)),
        (cg, (key, hidden[..., :11], wk, wq, None)),
        (cg, (key, hidden, wk[:2], wq, None)),
        (cg, (key, hidden, wk, wq, -1.0)),
        (cg, (key.long(), hidden.long(), wk.long(), wq.long(), None)),
        (cg, (key[:, :0], hidden[:, :0], wk, wq, None)),
        (cgb, (torch.zeros(2, 5), key, hidden, wk, wq, None)),
        (cgb, (torch.zeros(2, 5, 3, dtype=F64), key, hidden, wk, wq, None)),
        (sc, (value, gate, wn, wc, 0, 1e-5)),
        (sc, (value, gate[:, :6], wn, wc, 2, 1e-5)),
        (sc, (value, gate, wn, wc[:35], 2, 1e-5)),
        (sc, (value, gate, wn, wc.unsqueeze(1), 2, 1e-5)),
        (sc, (value, gate, wn.bfloat16(), wc, 2, 1e-5)),
        (sc, (value, gate, wn, wc, 2, float("nan"))),
        (sc, (value[:, :, :0], gate, wn, wc, 2, 1e-5)),
        (scb, (torch.zeros(2, 7, 3, 11), value, gate, wn, wc, 2, 1e-5)),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_inputs_raise_as_on_cpu(index):
    op, args = bad_calls()[index]
    with pytest.raises(Exception) as on_cpu:
        op(*args)
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(type(on_cpu.value)) as on_cuda:
        op(*cuda_args)
    assert type(on_cuda.value) is type(on_cpu.value)
    assert str(on_cuda.value).splitlines()[0] == str(on_cpu.value).splitlines()[0]


def test_tensors_on_two_devices_are_a_clear_error():
    (key, hidden, wk, wq), _ = gate_case(1, 2, 1, 4, torch.float32, strided=False)
    key = key.unflatten(-1, (1, 4))
    with pytest.raises(RuntimeError, match=r"context_gate: hidden is on cpu but key is on cuda"):
        torch.ops.engram.context_gate(key.cuda(), hidden, wk, wq, None)
    (value, gate, wn, wc), _ = conv_case(1, 2, 1, 4, 2, torch.float32, strided=False)
    with pytest.raises(RuntimeError, match=r"gated_short_conv: conv_weight is on cpu but value is on cuda"):
        torch.ops.engram.gated_short_conv(value.cuda(), gate.cuda(), wn.cuda(), wc, 1, 1e-5)


# --------------------------------------------------------------------------
# a whole layer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("hc_mult", [1, 3])
def test_engram_layer_trains_on_cuda_like_on_cpu(dtype, hc_mult):
    torch.manual_seed(0)
    cfg = EngramConfig(engram_vocab_size=[1009, 1013], max_ngram_size=3, n_embed_per_ngram=32,
                       n_head_per_ngram=4, layer_ids=[0])
    layer = EngramLayer(cfg, 0, hidden_size=40, hc_mult=hc_mult, compression=CompressionTable.identity(500)).to(dtype)
    with torch.no_grad():  # move the RMSNorm weights off 1 so that their gradients matter
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    hidden = torch.randn(2, 13, hc_mult, 40, dtype=dtype)
    ids = torch.randint(0, 500, (2, 13))
    grad_out = torch.randn(2, 13, hc_mult, 40, dtype=dtype)

    def step(device):
        model = layer.to(device)
        model.zero_grad(set_to_none=True)
        h = hidden.to(device).requires_grad_()
        out = model(h, ids.to(device))
        out.backward(grad_out.to(device))
        grads = {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}
        return out.detach().cpu(), h.grad.cpu(), grads

    out_cpu, hidden_grad_cpu, grads_cpu = step("cpu")
    out_gpu, hidden_grad_gpu, grads_gpu = step("cuda")
    layer.cpu()
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == F64 else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_gpu, out_cpu, **tol)
    torch.testing.assert_close(hidden_grad_gpu, hidden_grad_cpu, **tol)
    assert grads_gpu.keys() == grads_cpu.keys() and len(grads_cpu) == len(list(layer.parameters()))
    for name, g in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name].to_dense(), g.to_dense(), **tol, msg=lambda m: f"{name}: {m}")
