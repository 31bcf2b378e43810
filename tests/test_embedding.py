"""multihead_embedding: forward, dense and sparse backward against nn.functional.embedding."""

import pytest
import torch
from torch.library import opcheck

from engram import ops
from engram import reference as ref

SIZES = [13, 17, 19, 23]  # a tiny K = 4 layer


def make(dtype=torch.float32, batch=(2, 5), dh=8, sizes=SIZES):
    offsets = ref.head_offsets(sizes)
    weight = torch.randn(sum(sizes), dh, dtype=dtype)
    ids = torch.stack([torch.randint(0, s, batch) for s in sizes], dim=-1)
    return weight, ids, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_offsets", [True, False])
def test_forward_equals_reference(dtype, with_offsets):
    weight, ids, offsets = make(dtype)
    if not with_offsets:
        ids, offsets = ids + offsets, None
    out = ops.multihead_embedding(weight, ids, offsets)
    assert out.shape == (2, 5, 4, 8) and out.dtype == dtype
    assert torch.equal(out, ref.multihead_embedding(weight, ids, offsets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dense_backward_equals_reference(dtype):
    weight, ids, offsets = make(dtype, batch=(3, 40), sizes=[5, 7, 11, 3])  # many repeated rows
    grad_out = torch.randn(3, 40, 4, 8, dtype=dtype)
    w1 = weight.clone().requires_grad_()
    ops.multihead_embedding(w1, ids, offsets).backward(grad_out)
    assert w1.grad.layout == torch.strided and w1.grad.dtype == dtype
    # Exact gradient in float64; ours accumulates in float32 (opmath) for
    # reduced types, so it is one rounding of the exact sum.
    w64 = weight.double().requires_grad_()
    ref.multihead_embedding(w64, ids, offsets).backward(grad_out.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(w1.grad.double(), w64.grad, atol=tol, rtol=tol)


def _table_gradient(ids, grad_out, rows):
    return torch.ops.engram.multihead_embedding_backward(grad_out, ids, None, rows)


def _expected_table_gradient(ids, grad_out, rows, dh):
    return torch.zeros(rows, dh, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), grad_out.reshape(-1, dh).double())


@pytest.mark.parametrize("rows", [301, 9001])  # 75 KiB (from the heap) and 2.2 MiB (mapped) of float32
def test_table_gradient_is_zero_wherever_no_entry_hits(rows):
    # The gradient is allocated without a memset (calloc): memory that an
    # earlier gradient wrote all over (clipping, accumulation, anything in
    # place) and freed must still come back as zeros.
    dh = 64
    ids_a = torch.randint(0, rows, (2, 300, 4))
    ids_b = torch.randint(0, rows // 3, (2, 30, 4))  # leaves most rows unhit
    grad_a, grad_b = torch.randn(2, 300, 4, dh), torch.randn(2, 30, 4, dh)
    first = _table_gradient(ids_a, grad_a, rows)
    kept = first.clone()
    second = _table_gradient(ids_b, grad_b, rows)
    assert torch.equal(first, kept)  # a live gradient is never written by the next call
    first.fill_(7.0)
    del first
    third = _table_gradient(ids_b, grad_b, rows)
    want = _expected_table_gradient(ids_b, grad_b, rows, dh)
    torch.testing.assert_close(third.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.double(), want, atol=1e-5, rtol=1e-5)


def test_sparse_and_dense_gradients_agree():
    weight, ids, offsets = make(batch=(2, 30), sizes=[5, 7, 11, 3])
    grad_out = torch.randn(2, 30, 4, 8)
    dense_w = weight.clone().requires_grad_()
    ops.multihead_embedding(dense_w, ids, offsets, sparse=False).backward(grad_out)
    sparse_w = weight.clone().requires_grad_()
    ops.multihead_embedding(sparse_w, ids, offsets, sparse=True).backward(grad_out)
    assert sparse_w.grad.is_sparse
    torch.testing.assert_close(sparse_w.grad.to_dense(), dense_w.grad)
    # Same layout as nn.Embedding(sparse=True) gives.
    emb_w = weight.clone().requires_grad_()
    torch.nn.functional.embedding(ids + offsets, emb_w, sparse=True).backward(grad_out)
    torch.testing.assert_close(sparse_w.grad.coalesce().to_dense(), emb_w.grad.coalesce().to_dense())


def test_gradcheck_float64():
    weight, ids, offsets = make(torch.float64, batch=(2, 3), dh=3)
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda w: ops.multihead_embedding(w, ids, offsets), (weight,))
    assert torch.autograd.gradcheck(lambda w: ops.multihead_embedding(w, ids + offsets, None), (weight,))


def test_gradcheck_backward_op_is_linear_in_grad():
    # The backward op is a scatter-add: check it against its own adjoint (the gather).
    weight, ids, offsets = make(torch.float64, batch=(2, 3), dh=3)
    grad = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    scattered = torch.ops.engram.multihead_embedding_backward(grad, ids, offsets, weight.shape[0])
    # <scatter(g), w> == <g, gather(w)>
    lhs = (scattered * weight).sum()
    rhs = (grad * ops.multihead_embedding(weight, ids, offsets)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_non_contiguous_ids_and_weight():
    weight, ids, offsets = make(batch=(5, 2))
    ids_t = ids.transpose(0, 1)
    weight_t = weight.t().contiguous().t()
    assert not ids_t.is_contiguous() and not weight_t.is_contiguous()
    out = ops.multihead_embedding(weight_t, ids_t, offsets)
    assert torch.equal(out, ref.multihead_embedding(weight, ids_t, offsets))


def test_opcheck():
    for dtype in [torch.float32, torch.bfloat16]:
        weight, ids, offsets = make(dtype)
        weight.requires_grad_()
        opcheck(torch.ops.engram.multihead_embedding.default, (weight, ids, offsets, False))
        opcheck(torch.ops.engram.multihead_embedding.default, (weight, ids + offsets, None, False))
        grad = torch.randn(*ids.shape, weight.shape[1], dtype=dtype)
        opcheck(torch.ops.engram.multihead_embedding_backward.default, (grad, ids, offsets, weight.shape[0]))


def test_row_out_of_range():
    weight, ids, offsets = make()
    ids[1, 2, 3] = SIZES[3]  # one past head 3's last row: lands past the table end
    with pytest.raises(IndexError, match=r"multihead_embedding: ids holds 72 at flat index 31 \(after adding offsets\); "
                       r"expected values in \[0, 72\)"):
        ops.multihead_embedding(weight, ids, offsets)


def test_negative_id():
    weight, ids, offsets = make()
    ids[0, 0, 0] = -1
    with pytest.raises(IndexError, match=r"ids holds -1 at flat index 0"):
        ops.multihead_embedding(weight, ids, offsets)


def test_backward_row_out_of_range():
    weight, ids, offsets = make()
    grad = torch.randn(*ids.shape, 8)
    with pytest.raises(IndexError, match=r"multihead_embedding_backward: ids holds .* for num_rows=10"):
        torch.ops.engram.multihead_embedding_backward(grad, ids, offsets, 10)


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        (lambda w, i, o: (w.long(), i, o), TypeError, r"weight must be a floating-point tensor, got Long"),
        (lambda w, i, o: (w, i.int(), o), TypeError, r"ids must be Long, got Int"),
        (lambda w, i, o: (w, i[..., :3], o), ValueError, r"offsets has 4 entries but ids has K=3"),
        (lambda w, i, o: (w, i[:0], o), ValueError, r"ids is empty \(shape \[0, 5, 4\]\)"),
        (lambda w, i, o: (w[0], i, o), ValueError, r"weight must have 2 dims, got shape \[8\]"),
        (lambda w, i, o: (w, i, o.to("meta")), RuntimeError, r"offsets is on meta but ids is on cpu"),
    ],
)
def test_bad_arguments(args, error, pattern):
    weight, ids, offsets = make()
    with pytest.raises(error, match=pattern):
        ops.multihead_embedding(*args(weight, ids, offsets))
