"""context_gate and gated_short_conv: forward and backward against the plain
PyTorch statements in engram.reference, gradcheck, opcheck, edge cases, errors."""

import statistics

import pytest
import torch
from torch.library import opcheck

from engram import ops
from engram import reference as ref

F64 = torch.float64


def gate_inputs(b=2, t=5, g=3, d=12, dtype=F64, strided=False):
    if strided:
        # key as the layer passes it: a view of one fused projection [B, T, (G+1)*D]
        proj = torch.randn(b, t, (g + 1) * d, dtype=dtype)
        key = proj[..., d:].unflatten(-1, (g, d))
    else:
        key = torch.randn(b, t, g, d, dtype=dtype)
    hidden = torch.randn(b, t, g, d, dtype=dtype)
    key_weight = 1 + 0.3 * torch.randn(g, d, dtype=dtype)
    hidden_weight = 1 + 0.3 * torch.randn(g, d, dtype=dtype)
    return key, hidden, key_weight, hidden_weight


def conv_inputs(b=2, t=7, g=3, d=12, kernel_size=4, dtype=F64, strided=False):
    if strided:
        value = torch.randn(b, t, 2 * d, dtype=dtype)[..., :d]
    else:
        value = torch.randn(b, t, d, dtype=dtype)
    gate = torch.rand(b, t, g, dtype=dtype)
    norm_weight = 1 + 0.3 * torch.randn(g, d, dtype=dtype)
    conv_weight = torch.randn(g * d, kernel_size, dtype=dtype) / kernel_size
    return value, gate, norm_weight, conv_weight


def grads(fn, inputs, grad_out):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out)


# Tolerances, shared with tests/test_layer.py.
#
# float32: |ours - reference| <= 1e-5 + 1e-5 * |reference| + 2 * |reference - truth|
# elementwise, truth = the reference in float64 on the same values. Where the
# float32 reference is accurate this is atol = rtol = 1e-5; it widens only
# where float32 itself cannot resolve the value (a gate score s near 0, whose
# gradient scales like 1/sqrt|s|), and then by twice the reference's own error.
#
# bf16 / fp16: FlashAttention's criterion (error against the float64 truth at
# most twice the reference's own error in the same dtype), made independent of
# the CPU model. One draw's maximum error is a coin flip wherever a gate score
# s is near 0: the gate gradient goes like 1/sqrt|s|, so the rounding of s
# decides which of the two lands closer, and BLAS kernels that differ between
# Intel and AMD change that rounding. So each tensor's error is measured in
# units of its dtype's epsilon at its magnitude (max |truth|), over
# REDUCED_PRECISION_SEEDS draws, and the medians are compared:
#     median(ours) <= 2 * median(reference) + 1 ulp.
# The fused ops compute in float32 and round once, so their tests also bound
# every draw's error by 1 ulp. A real precision bug (a sum accumulated in bf16)
# raises every draw's error several-fold.


def assert_float32_matches(ours, reference, truth, atol=1e-5, rtol=1e-5):
    reference = reference.double()
    allowed = atol + rtol * reference.abs() + 2 * (reference - truth).abs()
    excess = (ours.double() - reference).abs() - allowed
    assert excess.max().item() <= 0, (
        f"float32 mismatch: max |ours - reference| = {(ours.double() - reference).abs().max().item():.3g}, "
        f"max |reference - float64| = {(reference - truth).abs().max().item():.3g}"
    )


REDUCED_PRECISION_SEEDS = range(16)


def ulp_error(x, truth):
    """max |x - truth| in units of x.dtype's epsilon at the magnitude of truth."""
    scale = torch.finfo(x.dtype).eps * truth.abs().max().item()
    return (x.double() - truth).abs().max().item() / max(scale, torch.finfo(torch.float64).tiny)


class ReducedPrecisionErrors:
    """Collects, per named tensor and draw, the ulp errors of ours and of the
    reference against the float64 truth; check() applies the median criterion."""

    def __init__(self):
        self.errors = {}

    def add(self, name, ours, reference, truth):
        assert ours.dtype == reference.dtype, name
        self.errors.setdefault(name, []).append((ulp_error(ours, truth), ulp_error(reference, truth)))

    def check(self, max_ulp=None):
        """max_ulp: also bound every draw's error, for kernels that compute in
        float32 from the rounded inputs and round once at the end."""
        assert self.errors
        for name, pairs in self.errors.items():
            ours = statistics.median(o for o, _ in pairs)
            reference = statistics.median(r for _, r in pairs)
            assert ours <= 2 * reference + 1, (
                f"{name}: median error {ours:.3g} ulp over {len(pairs)} draws > 2 x the reference's "
                f"{reference:.3g} ulp + 1"
            )
            if max_ulp is not None:
                worst = max(o for o, _ in pairs)
                assert worst <= max_ulp, f"{name}: error {worst:.3g} ulp in one of {len(pairs)} draws > {max_ulp}"


# --------------------------------------------------------------------------
# against the reference
# --------------------------------------------------------------------------


def check_against_reference(fn, ref_fn, inputs, grad_out):
    out, got = grads(fn, inputs, grad_out)
    want_out, want = grads(ref_fn, inputs, grad_out)
    assert out.dtype == inputs[0].dtype
    if inputs[0].dtype == F64:
        for g, w in zip((out, *got), (want_out, *want)):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
        return
    truth_out, truth = grads(ref_fn, [x.double() for x in inputs], grad_out.double())
    for g, w, t in zip((out, *got), (want_out, *want), (truth_out, *truth)):
        assert_float32_matches(g, w, t)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d", [12, 64])  # 12: the row loops' scalar tails
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_context_gate_matches_reference(dtype, d, strided, eps):
    inputs = gate_inputs(d=d, dtype=dtype, strided=strided)
    check_against_reference(lambda *a: ops.context_gate(*a, eps), lambda *a: ref.context_gate(*a, eps), inputs,
                            torch.randn(2, 5, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("t, dilation, kernel_size", [(7, 2, 4), (2, 3, 4), (1, 3, 4), (9, 1, 3), (6, 4, 1)])
@pytest.mark.parametrize("strided", [False, True])
def test_gated_short_conv_matches_reference(dtype, t, dilation, kernel_size, strided):
    inputs = conv_inputs(t=t, kernel_size=kernel_size, dtype=dtype, strided=strided)
    check_against_reference(lambda *a: ops.gated_short_conv(*a, dilation), lambda *a: ref.gated_short_conv(*a, dilation),
                            inputs, torch.randn(2, t, 3, 12, dtype=dtype))


def test_short_conv_is_causal_and_per_sequence():
    value, gate, norm_weight, conv_weight = conv_inputs(b=2, t=10)
    out = ops.gated_short_conv(value, gate, norm_weight, conv_weight, 2)
    changed = value.clone()
    changed[:, 6:] += 1.0  # the future of t < 6
    changed[1] += 1.0  # another sequence
    out2 = ops.gated_short_conv(changed, gate, norm_weight, conv_weight, 2)
    assert torch.equal(out[0, :6], out2[0, :6])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_within_twice_the_reference_error(dtype):
    eps = torch.finfo(dtype).eps  # what eps=None means in `dtype`; the float64 truth keeps it
    errors = ReducedPrecisionErrors()
    for seed in REDUCED_PRECISION_SEEDS:
        torch.manual_seed(seed)
        for op, fn, ref_fn, inputs, grad_shape in [
            ("context_gate", ops.context_gate, lambda *a: ref.context_gate(*a, eps), gate_inputs(t=64, d=64),
             (2, 64, 3)),
            ("gated_short_conv", lambda *a: ops.gated_short_conv(*a, 3), lambda *a: ref.gated_short_conv(*a, 3),
             conv_inputs(t=64, d=64), (2, 64, 3, 64)),
        ]:
            low = [x.to(dtype) for x in inputs]
            grad_out = torch.randn(grad_shape, dtype=F64).to(dtype)
            truth_out, truth = grads(ref_fn, [x.double() for x in low], grad_out.double())
            ours_out, ours = grads(fn, low, grad_out)
            theirs_out, theirs = grads(ref_fn, low, grad_out)
            for i, (a, b, t) in enumerate(zip((ours_out, *ours), (theirs_out, *theirs), (truth_out, *truth))):
                errors.add(f"{op} {'output' if i == 0 else f'grad of input {i - 1}'}", a, b, t)
    # The fused kernels compute in float32 and round once (<= 0.44 ulp measured);
    # the reference rounds every intermediate (2-70 ulp on the gradients).
    errors.check(max_ulp=1)


# --------------------------------------------------------------------------
# the signed square root at and near s = 0
# --------------------------------------------------------------------------


def test_gate_gradient_at_zero_and_below_the_floor_matches_autograd():
    # Unit weights; key and hidden orthogonal (s = 0 exactly, sign(0) = 0) or
    # nearly so (0 < |s| < 1e-6, where clamp_min passes no gradient), and one
    # ordinary row.
    d = 4
    key = torch.zeros(1, 3, 1, d, dtype=F64)
    hidden = torch.zeros(1, 3, 1, d, dtype=F64)
    key[0, :, 0, 0] = 1.0
    hidden[0, 0, 0, 1] = 1.0  # s = 0
    hidden[0, 1, 0, :2] = torch.tensor([1e-9, 1.0], dtype=F64)  # |s| ~ 1e-9 * D / sqrt(D)
    hidden[0, 2, 0, :2] = torch.tensor([0.7, 0.3], dtype=F64)
    weights = torch.ones(1, d, dtype=F64), torch.ones(1, d, dtype=F64)
    inputs = (key, hidden, *weights)
    grad_out = torch.ones(1, 3, 1, dtype=F64)
    out, got = grads(ops.context_gate, inputs, grad_out)
    want_out, want = grads(ref.context_gate, inputs, grad_out)
    assert out[0, 0, 0].item() == 0.5  # sigmoid(sign(0) * sqrt(1e-6))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    assert got[0][0, :2].abs().max().item() == 0.0 and got[1][0, :2].abs().max().item() == 0.0
    assert got[0][0, 2].abs().max().item() > 0.0


# --------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# --------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_context_gate_gradcheck(eps):
    inputs = [x.requires_grad_() for x in gate_inputs(b=1, t=3, g=2, d=6)]
    assert torch.autograd.gradcheck(lambda *a: ops.context_gate(*a, eps), inputs)


@pytest.mark.parametrize("t, dilation", [(7, 2), (2, 3)])  # (2, 3): T shorter than the conv's reach
def test_gated_short_conv_gradcheck(t, dilation):
    inputs = [x.requires_grad_() for x in conv_inputs(b=2, t=t, g=2, d=5)]
    assert torch.autograd.gradcheck(lambda *a: ops.gated_short_conv(*a, dilation, 1e-5), inputs)


def opcheck_samples():
    key, hidden, wk, wq = gate_inputs(dtype=torch.float32)
    value, gate, wn, wc = conv_inputs(dtype=torch.float32)
    strided = gate_inputs(dtype=torch.float32, strided=True)
    grad_gate = torch.randn(2, 5, 3)
    grad_out = torch.randn(2, 7, 3, 12)
    req = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    return [
        (torch.ops.engram.context_gate.default, (*req(key, hidden, wk, wq), None)),
        (torch.ops.engram.context_gate.default, (*req(*strided), 1e-5)),
        (torch.ops.engram.context_gate_backward.default, (grad_gate, key, hidden, wk, wq, None)),
        (torch.ops.engram.gated_short_conv.default, (*req(value, gate, wn, wc), 3, 1e-5)),
        (torch.ops.engram.gated_short_conv.default, (*req(value[:, :2], gate[:, :2], wn, wc), 3, 1e-5)),
        (torch.ops.engram.gated_short_conv_backward.default, (grad_out, value, gate, wn, wc, 2, 1e-5)),
    ]


@pytest.mark.parametrize("op, args", opcheck_samples(), ids=lambda x: str(x) if not isinstance(x, tuple) else "")
def test_opcheck(op, args):
    opcheck(op, args)


def test_double_backward_is_a_clear_error():
    key, hidden, wk, wq = [x.requires_grad_() for x in gate_inputs(b=1, t=3)]
    (grad_key,) = torch.autograd.grad(ops.context_gate(key, hidden, wk, wq).sum(), [key], create_graph=True)
    with pytest.raises(RuntimeError, match="context_gate_backward: double backward .* is not implemented"):
        grad_key.sum().backward()
    value, gate, wn, wc = [x.requires_grad_() for x in conv_inputs(b=1, t=3)]
    (grad_value,) = torch.autograd.grad(ops.gated_short_conv(value, gate, wn, wc, 2).sum(), [value], create_graph=True)
    with pytest.raises(RuntimeError, match="gated_short_conv_backward: double backward .* is not implemented"):
        grad_value.sum().backward()


# --------------------------------------------------------------------------
# determinism: weight gradients do not depend on the thread count
# --------------------------------------------------------------------------


def test_weight_gradients_identical_across_thread_counts():
    torch.manual_seed(3)
    gate_args = gate_inputs(b=2, t=300, g=2, d=16, dtype=torch.float32)
    conv_args = conv_inputs(b=2, t=300, g=2, d=16, dtype=torch.float32)
    grad_gate, grad_out = torch.randn(2, 300, 2), torch.randn(2, 300, 2, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append((torch.ops.engram.context_gate_backward(grad_gate, *gate_args, None),
                            torch.ops.engram.gated_short_conv_backward(grad_out, *conv_args, 3, 1e-5)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], results[1]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# --------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------


def test_context_gate_rejects_bad_inputs():
    key, hidden, wk, wq = gate_inputs(dtype=torch.float32)
    with pytest.raises(TypeError, match=r"context_gate: hidden is Double but key is Float"):
        ops.context_gate(key, hidden.double(), wk, wq)
    with pytest.raises(ValueError, match=r"context_gate: key must have 4 dims, got shape \[2, 5, 36\]"):
        torch.ops.engram.context_gate(key.flatten(2), hidden, wk, wq, None)
    with pytest.raises(ValueError, match=r"context_gate: hidden has shape \[2, 5, 3, 11\]; expected the shape of key"):
        ops.context_gate(key, hidden[..., :11], wk, wq)
    with pytest.raises(ValueError, match=r"context_gate: key_norm_weight has shape \[2, 12\]; expected \[G, D\] = \[3, 12\]"):
        ops.context_gate(key, hidden, wk[:2], wq)
    with pytest.raises(ValueError, match=r"context_gate: eps=-1; expected a finite value >= 0"):
        ops.context_gate(key, hidden, wk, wq, -1.0)
    with pytest.raises(TypeError, match=r"context_gate: key must be a floating-point tensor, got Long"):
        ops.context_gate(key.long(), hidden.long(), wk.long(), wq.long())
    with pytest.raises(ValueError, match=r"context_gate: key is empty"):
        ops.context_gate(key[:, :0], hidden[:, :0], wk, wq)
    with pytest.raises(ValueError, match=r"context_gate_backward: grad_gate has shape \[2, 5\]; expected the shape"):
        torch.ops.engram.context_gate_backward(torch.zeros(2, 5), key, hidden, wk, wq, None)


def test_gated_short_conv_rejects_bad_inputs():
    value, gate, wn, wc = conv_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"gated_short_conv: dilation=0; expected >= 1"):
        ops.gated_short_conv(value, gate, wn, wc, 0)
    with pytest.raises(ValueError, match=r"gated_short_conv: gate has shape \[2, 6, 3\]; expected \[B, T, G\]"):
        ops.gated_short_conv(value, gate[:, :6], wn, wc, 2)
    with pytest.raises(ValueError, match=r"gated_short_conv: conv_weight has shape \[35, 4\]; expected \[G\*D, kernel_size\] = \[36"):
        ops.gated_short_conv(value, gate, wn, wc[:35], 2)
    with pytest.raises(ValueError, match=r"gated_short_conv: conv_weight must have 2 dims, got shape \[36, 1, 4\]"):
        torch.ops.engram.gated_short_conv(value, gate, wn, wc.unsqueeze(1), 2, 1e-5)
    with pytest.raises(TypeError, match=r"gated_short_conv: norm_weight is BFloat16 but value is Float"):
        ops.gated_short_conv(value, gate, wn.bfloat16(), wc, 2)
    with pytest.raises(ValueError, match=r"gated_short_conv: eps=nan; expected a finite value >= 0"):
        ops.gated_short_conv(value, gate, wn, wc, 2, float("nan"))
    with pytest.raises(ValueError, match=r"gated_short_conv_backward: grad_out has shape \[2, 7, 3, 11\]"):
        torch.ops.engram.gated_short_conv_backward(torch.zeros(2, 7, 3, 11), value, gate, wn, wc, 2, 1e-5)
