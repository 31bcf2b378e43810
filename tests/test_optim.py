"""engram.optim: dedup + row-wise updates against torch.optim.SGD, torch.optim.SparseAdam
and the float64 rules of engram.reference; the fused backward, make_rowwise,
checkpoints, opcheck and bad input.

Bit-exactness on the CPU:
- dedup_row_grads: the row sums equal the dense table gradient's rows (torch's
  and engram's) bit for bit: both add a row's entries in entry order.
- SGD equals torch.optim.SGD bit for bit (both round w - lr*g as one fused
  multiply-add; torch does on AVX2/AVX-512 CPUs, which every test machine is).
- Adam: given the same per-row gradient sums, the moments equal
  torch.optim.SparseAdam's bit for bit, and the weights equal SparseAdam's
  operations run with an IEEE (correctly rounded) square root bit for bit.
  SparseAdam itself is within a few ulp of the weights: torch's float32 sqrt
  on the CPU goes through a vector math library that is not correctly rounded
  everywhere (1 ulp off in ~17% of elements on the AMD test machine), and that
  ulp only enters the weight update. Fed the raw sparse gradient, SparseAdam's
  coalesce() adds a row's duplicates in the order of an unstable sort (not
  entry order), so there the sums, and everything after, agree to rounding.
- Against the float64 textbook rules: float32 kernels within 1e-6 relative,
  float64 kernels within 1e-12 (the kernels use SparseAdam's order of
  operations, the reference the textbook's).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import engram
from engram import optim, reference as ref
from engram.layer import MultiHeadEmbedding

ops = torch.ops.engram


def batch_ids(gen, shape, num_rows, hot=4):
    """ids of `shape` in [0, num_rows): half from `hot` rows (repeated within
    the batch), half spread over the whole table (mostly touched once)."""
    spread = torch.randint(0, num_rows, shape, generator=gen)
    hot_rows = torch.randint(0, hot, shape, generator=gen) * (num_rows // hot)
    pick = torch.rand(shape, generator=gen) < 0.5
    return torch.where(pick, hot_rows, spread)


def entry_counts(ids, num_rows):
    return torch.bincount(ids.reshape(-1), minlength=num_rows)


# --------------------------------------------------------------------------
# dedup_row_grads
# --------------------------------------------------------------------------


@pytest.mark.parametrize("with_offsets", [True, False])
def test_dedup_float32_equals_dense_gradient_rows_bitwise(with_offsets):
    gen = torch.Generator().manual_seed(1)
    sizes = [7, 11, 13, 5]
    offsets = ref.head_offsets(sizes)
    ids = torch.stack([torch.randint(0, s, (6, 30), generator=gen) for s in sizes], dim=-1)
    if not with_offsets:
        ids, offsets = ids + offsets, None
    num_rows = sum(sizes)
    grad = torch.randn(6, 30, 4, 8, generator=gen)
    rows, row_grads = optim.dedup_row_grads(grad, ids, offsets, num_rows)
    flat = (ids if offsets is None else ids + offsets).reshape(-1)
    assert torch.equal(rows, torch.unique(flat))
    assert rows.dtype == torch.int64 and row_grads.dtype == torch.float32 and row_grads.shape == (rows.numel(), 8)
    dense = ops.multihead_embedding_backward(grad, ids, offsets, num_rows)
    assert torch.equal(row_grads, dense[rows])
    weight = torch.zeros(num_rows, 8, requires_grad=True)
    F.embedding(flat, weight).backward(grad.reshape(-1, 8))
    assert torch.equal(row_grads, weight.grad[rows])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dedup_other_dtypes_against_float64_sum(dtype):
    gen = torch.Generator().manual_seed(2)
    ids = batch_ids(gen, (4, 50, 3), 40)
    grad = torch.randn(4, 50, 3, 16, generator=gen).to(dtype)
    rows, row_grads = optim.dedup_row_grads(grad, ids, None, 40)
    want_rows, want = ref.dedup_row_grads(grad, ids, None, 40)
    assert torch.equal(rows, want_rows) and row_grads.dtype == dtype
    # float64 sums exactly enough; reduced types are summed in float32 and
    # rounded once to the storage type.
    tol = {torch.float64: 1e-12, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(row_grads.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_dedup_sums_in_entry_order():
    # Entry order matters in float32: (1e8 + 1) - 1e8 = 0, 1 + (1e8 - 1e8) = 1.
    ids = torch.tensor([[3], [0], [3], [3]])
    grad = torch.tensor([1e8, 5.0, 1.0, -1e8]).reshape(4, 1, 1)
    rows, row_grads = optim.dedup_row_grads(grad, ids, None, 4)
    assert rows.tolist() == [0, 3]
    # Row 3 gets entries 0, 2, 3: (1e8 + 1) + -1e8, which is 0 in float32.
    assert row_grads.flatten().tolist() == [5.0, 0.0]
    coalesced = torch.sparse_coo_tensor(ids.reshape(1, -1), grad.reshape(4, 1), (4, 1)).coalesce()
    assert torch.equal(row_grads, coalesced.values())


@pytest.mark.parametrize("num_rows, threads", [(3000, 2), (1_000_000, 2), (2**40, 2), (3000, 1)])
def test_dedup_large_batches_parallel_sort(num_rows, threads):
    # > 2 radix-sort chunks: the parallel passes; 2^40 rows: five 8-bit passes.
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, min(num_rows, 2**62), (64, 300, 4), generator=gen)
    ids[:, ::7] = ids[0, 0]  # a hot row
    grad = torch.randn(64, 300, 4, 4, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, row_grads = optim.dedup_row_grads(grad, ids, None, num_rows)
    finally:
        torch.set_num_threads(previous)
    flat = ids.reshape(-1)
    unique, inverse = torch.unique(flat, return_inverse=True)
    assert torch.equal(rows, unique)
    want = torch.zeros(unique.numel(), 4).index_add_(0, inverse, grad.reshape(-1, 4))
    assert torch.equal(row_grads, want)  # index_add_ also adds in entry order


def test_dedup_opcheck():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 9, (3, 5, 2), generator=gen)
    offsets = torch.tensor([0, 9])
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(3, 5, 2, 4, generator=gen).to(dtype)
        opcheck(ops.dedup_row_grads.default, (grad, ids, offsets, 18))
        opcheck(ops.dedup_row_grads.default, (grad, ids + offsets, None, 18))


def test_dedup_row_out_of_range():
    ids = torch.tensor([[0, 1], [2, 3]])
    offsets = torch.tensor([0, 5])
    grad = torch.randn(2, 2, 3)
    with pytest.raises(IndexError, match=r"dedup_row_grads: ids holds 8 at flat index 3 \(after adding offsets\); "
                       r"expected values in \[0, 8\) for num_rows=8"):
        optim.dedup_row_grads(grad, ids, offsets, 8)
    with pytest.raises(IndexError, match=r"ids holds -1 at flat index 2"):
        optim.dedup_row_grads(grad, torch.tensor([[0, 1], [-1, 3]]), None, 8)


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        (lambda g, i: (g, i.int(), None, 10), TypeError, r"ids must be Long, got Int"),
        (lambda g, i: (g.long(), i, None, 10), TypeError, r"grad must be a floating-point tensor, got Long"),
        (lambda g, i: (g[:1], i, None, 10), ValueError, r"grad has shape \[1, 2, 3\]; expected ids.shape \+ \[Dh\]"),
        (lambda g, i: (g, i, torch.tensor([0]), 10), ValueError, r"offsets has 1 entries but ids has K=2"),
        (lambda g, i: (g, i, None, 0), ValueError, r"num_rows=0; expected >= 1"),
        (lambda g, i: (g, i[:0], None, 10), ValueError, r"ids is empty"),
        (lambda g, i: (g, i.to("meta"), None, 10), RuntimeError, r"ids is on meta but grad is on cpu"),
    ],
)
def test_dedup_bad_arguments(args, error, pattern):
    grad, ids = torch.randn(2, 2, 3), torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(error, match=pattern):
        optim.dedup_row_grads(*args(grad, ids))


# --------------------------------------------------------------------------
# update rules against torch and the float64 reference
# --------------------------------------------------------------------------


def fma_rounding() -> bool:
    # torch's vectorised add(alpha=) is a fused multiply-add on AVX2/AVX-512.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_equals_torch_sgd_bitwise(weight_decay):
    gen = torch.Generator().manual_seed(5)
    num_rows, dh = 300, 16
    emb = torch.nn.Embedding(num_rows, dh)
    table = emb.weight.detach().clone()
    sgd = torch.optim.SGD(emb.parameters(), lr=0.37, weight_decay=weight_decay)
    for step in range(4):
        ids = batch_ids(gen, (40, 3), num_rows)
        grad = torch.randn(40, 3, dh, generator=gen)
        sgd.zero_grad()
        emb(ids).backward(grad)
        sgd.step()
        rows, row_grads = optim.dedup_row_grads(grad, ids, None, num_rows)
        before = table.clone()
        optim.rowwise_sgd_update(table, rows, row_grads, 0.37, weight_decay)
        untouched = torch.ones(num_rows, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(table[untouched], before[untouched])
        if weight_decay:
            # Dense SGD also decays the rows no token touched; put them back,
            # so that the tables agree wherever the two SGDs do.
            emb.weight.data[untouched] = table[untouched]
        if fma_rounding():
            assert torch.equal(table, emb.weight.detach())
        else:
            torch.testing.assert_close(table, emb.weight.detach(), rtol=2**-23, atol=0)


def sparse_adam_ieee_sqrt(w, m, v, rows, g, lr, beta1, beta2, eps, step):
    """torch.optim.SparseAdam's operations, in its order, with a correctly
    rounded square root (float64 sqrt rounded to float32 is)."""
    mo, vo = m[rows], v[rows]
    d1 = g.sub(mo).mul_(1 - beta1)
    d2 = g.pow(2).sub_(vo).mul_(1 - beta2)
    m[rows] = mo + d1
    v[rows] = vo + d2
    denom = (d2 + vo).double().sqrt().float().add_(eps)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    w[rows] = w[rows] + -step_size * (d1 + mo).div_(denom)


def test_adam_equals_sparse_adam():
    gen = torch.Generator().manual_seed(6)
    num_rows, dh, lr, betas, eps, steps = 400, 16, 0.05, (0.9, 0.99), 1e-8, 6
    emb = torch.nn.Embedding(num_rows, dh, sparse=True)
    start = emb.weight.detach().clone()
    # SparseAdam fed the same per-row sums (a coalesced gradient), and SparseAdam
    # as users run it (on the embedding's raw sparse gradient).
    same_sums = torch.nn.Parameter(start.clone())
    adam_same_sums = torch.optim.SparseAdam([same_sums], lr=lr, betas=betas, eps=eps)
    adam_raw = torch.optim.SparseAdam(emb.parameters(), lr=lr, betas=betas, eps=eps)
    w, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    w_ieee, m_ieee, v_ieee = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    touched_once = None
    for step in range(1, steps + 1):
        ids = batch_ids(gen, (50, 3), num_rows)
        grad = torch.randn(50, 3, dh, generator=gen)
        rows, row_grads = optim.dedup_row_grads(grad, ids, None, num_rows)
        optim.rowwise_adam_update(w, m, v, rows, row_grads, lr, *betas, eps, 0.0, False, step)
        sparse_adam_ieee_sqrt(w_ieee, m_ieee, v_ieee, rows, row_grads, lr, *betas, eps, step)
        same_sums.grad = torch.sparse_coo_tensor(rows[None], row_grads, (num_rows, dh))
        adam_same_sums.step()
        adam_raw.zero_grad()
        emb(ids).backward(grad)
        adam_raw.step()
        counts = entry_counts(ids, num_rows)
        assert counts.max() > 1  # repeated rows within the batch
        if touched_once is None:
            touched_once = counts == 1
    assert touched_once.any()
    assert torch.equal(w, w_ieee) and torch.equal(m, m_ieee) and torch.equal(v, v_ieee)
    state = adam_same_sums.state[same_sums]
    assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"])
    # torch's own sqrt may be an ulp off: each step's weight update may differ
    # by an ulp of the update and the sum by an ulp of the weight.
    weight_tol = dict(rtol=steps * 2**-23, atol=steps * lr * 2**-20)
    torch.testing.assert_close(w, same_sums.detach(), **weight_tol)
    # SparseAdam's coalesce() adds a row's duplicates in the order of an
    # unstable sort of the indices, not in entry order: sums differ by roundings.
    state = adam_raw.state[emb.weight]
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, emb.weight.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
@pytest.mark.parametrize("dh", [64, 20])
def test_rules_match_float64_reference(dtype, rule, weight_decay, dh):
    gen = torch.Generator().manual_seed(7)
    num_rows, lr, betas, eps = 200, 0.05, (0.9, 0.99), 1e-6
    w = torch.randn(num_rows, dh, generator=gen).to(dtype)
    state = {
        "sgd": [],
        "adagrad": [torch.zeros(num_rows, dtype=dtype)],
        "adam": [torch.zeros_like(w), torch.zeros_like(w)],
        "adamw": [torch.zeros_like(w), torch.zeros_like(w)],
    }[rule]
    w_ref, state_ref = w.double().clone(), [s.double().clone() for s in state]
    for step in range(1, 6):
        ids = batch_ids(gen, (30, 4), num_rows)
        grad = torch.randn(30, 4, dh, generator=gen).to(dtype)
        rows, row_grads = optim.dedup_row_grads(grad, ids, None, num_rows)
        rows_ref, row_grads_ref = ref.dedup_row_grads(grad, ids, None, num_rows)
        assert torch.equal(rows, rows_ref)
        if rule == "sgd":
            optim.rowwise_sgd_update(w, rows, row_grads, lr, weight_decay)
            w_ref = ref.rowwise_sgd(w_ref, rows, row_grads_ref, lr, weight_decay)
        elif rule == "adagrad":
            optim.rowwise_adagrad_update(w, state[0], rows, row_grads, lr, eps, weight_decay)
            w_ref, acc = ref.rowwise_adagrad(w_ref, state_ref[0], rows, row_grads_ref, lr, eps, weight_decay)
            state_ref = [acc]
        else:
            decoupled = rule == "adamw"
            optim.rowwise_adam_update(w, *state, rows, row_grads, lr, *betas, eps, weight_decay, decoupled, step)
            w_ref, m, v = ref.rowwise_adam(w_ref, *state_ref, rows, row_grads_ref, lr, betas, eps, weight_decay,
                                           decoupled, step)
            state_ref = [m, v]
    tol = {torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(w.double(), w_ref, rtol=tol, atol=tol)
    for s, s_ref in zip(state, state_ref):
        torch.testing.assert_close(s.double(), s_ref, rtol=tol, atol=tol * s_ref.abs().max().item())


def test_untouched_rows_and_state_do_not_change():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(50, 8, generator=gen)
    m, v, acc = torch.rand(50, 8), torch.rand(50, 8), torch.rand(50)
    before = [t.clone() for t in (w, m, v, acc)]
    rows = torch.tensor([3, 17, 42])
    row_grads = torch.randn(3, 8, generator=gen)
    optim.rowwise_adam_update(w, m, v, rows, row_grads, 0.1, 0.9, 0.999, 1e-8, 0.1, True, 7)
    optim.rowwise_adagrad_update(w, acc, rows, row_grads, 0.1, 1e-8, 0.1)
    keep = torch.ones(50, dtype=torch.bool)
    keep[rows] = False
    for t, t0 in zip((w, m, v, acc), before):
        assert torch.equal(t[keep], t0[keep])
        assert not torch.equal(t[rows], t0[rows])


def test_empty_rows_is_a_no_op():
    w = torch.randn(5, 4)
    before = w.clone()
    optim.rowwise_sgd_update(w, torch.empty(0, dtype=torch.int64), torch.empty(0, 4), 0.1)
    assert torch.equal(w, before)


def update_args(rule, dtype=torch.float32):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(12, 8, generator=gen).to(dtype)
    rows = torch.tensor([0, 5, 11])
    row_grads = torch.randn(3, 8, generator=gen).to(dtype)
    if rule == "sgd":
        return ops.rowwise_sgd_update.default, (w, rows, row_grads, 0.1, 0.01)
    if rule == "adagrad":
        return ops.rowwise_adagrad_update.default, (w, torch.rand(12).to(dtype), rows, row_grads, 0.1, 1e-8, 0.0)
    return ops.rowwise_adam_update.default, (w, torch.zeros_like(w), torch.zeros_like(w), rows, row_grads, 0.1, 0.9,
                                             0.999, 1e-8, 0.0, rule == "adamw", 1)


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "adamw"])
def test_update_opcheck(rule):
    for dtype in (torch.float32, torch.float64):
        op, args = update_args(rule, dtype)
        opcheck(op, args)
        if rule.startswith("adam"):  # the step count as a tensor
            opcheck(op, (*args[:11], 0, torch.tensor(3)))


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_step_count_tensor_equals_the_int_step(decoupled, dtype):
    """step_count (read by the kernel: what a CUDA graph replays) gives the int
    step's update bit for bit, over several steps."""
    op, args = update_args("adamw" if decoupled else "adam", dtype)
    w, m, v, rows, grads = args[:5]
    by_int = [t.clone() for t in (w, m, v)]
    by_tensor = [t.clone() for t in (w, m, v)]
    count = torch.zeros((), dtype=torch.int64)
    for step in range(1, 5):
        op(*by_int, rows, grads * step, *args[5:11], step)
        count += 1
        op(*by_tensor, rows, grads * step, *args[5:11], 0, count)
        for a, b in zip(by_int, by_tensor):
            assert torch.equal(a, b), step
    ref_w, _, _ = ref.rowwise_adam(w, m, v, rows, grads, 0.1, (0.9, 0.999), 1e-8, 0.0, decoupled, 1)
    once = [t.clone() for t in (w, m, v)]
    op(*once, rows, grads, *args[5:11], 0, torch.tensor(1))
    torch.testing.assert_close(once[0].double(), ref_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "rule, change, error, pattern",
    [
        ("sgd", lambda a: (a[0], torch.tensor([0, 5, 12]), *a[2:]), IndexError,
         r"rowwise_sgd_update: rows holds 12 at flat index 2; expected values in \[0, 12\) for weight.size\(0\)=12"),
        ("adam", lambda a: (*a[:3], torch.tensor([0, -1, 11]), *a[4:]), IndexError, r"rows holds -1 at flat index 1"),
        ("adam", lambda a: (*a[:3], torch.tensor([0, 5, 5]), *a[4:]), ValueError,
         r"rows holds 5 then 5 at indices 1 and 2; expected strictly increasing rows"),
        ("adagrad", lambda a: (a[0], a[1], torch.tensor([5, 0, 11]), *a[3:]), ValueError,
         r"rows holds 5 then 0 at indices 0 and 1"),
        ("sgd", lambda a: (a[0].bfloat16(), *a[1:]), TypeError, r"weight must be Float or Double, got BFloat16"),
        ("sgd", lambda a: (a[0], a[1].int(), *a[2:]), TypeError, r"rows must be Long, got Int"),
        ("sgd", lambda a: (a[0], a[1], a[2].double(), *a[3:]), TypeError,
         r"row_grads is Double but weight is Float; expected one dtype"),
        ("sgd", lambda a: (a[0], a[1], a[2][:2], *a[3:]), ValueError,
         r"row_grads has shape \[2, 8\]; expected \[U, Dh\] = \[3, 8\]"),
        ("sgd", lambda a: (a[0].t(), *a[1:]), ValueError, r"weight .* must be contiguous"),
        ("sgd", lambda a: (a[0][0], *a[1:]), ValueError, r"weight must have 2 dims"),
        ("sgd", lambda a: (a[0], a[1].to("meta"), *a[2:]), RuntimeError, r"rows is on meta but weight is on cpu"),
        ("sgd", lambda a: (*a[:3], -0.1, a[4]), ValueError, r"lr=-0.1; expected a finite value >= 0"),
        ("adagrad", lambda a: (a[0], a[1][:5], *a[2:]), ValueError, r"sum_sq has shape \[5\]; expected \[R\] = \[12\]"),
        ("adagrad", lambda a: (*a[:5], 0.0, a[6]), ValueError, r"eps=0; expected a finite value > 0"),
        ("adam", lambda a: (a[0], a[1][:, :4], *a[2:]), ValueError, r"exp_avg has shape \[12, 4\]"),
        ("adam", lambda a: (a[0], a[1], a[1], *a[3:]), ValueError, r"exp_avg and exp_avg_sq share memory"),
        ("adam", lambda a: (a[0], a[0], *a[2:]), ValueError, r"weight and exp_avg share memory"),
        ("adam", lambda a: (*a[:6], 1.0, *a[7:]), ValueError, r"beta1=1; expected a value in \[0, 1\)"),
        ("adam", lambda a: (*a[:11], 0), ValueError, r"step=0; expected >= 1"),
        ("adam", lambda a: (*a[:11], 0, torch.tensor(0)), ValueError,
         r"rowwise_adam_update: step_count holds 0; expected >= 1 \(the number of this update"),
        ("adam", lambda a: (*a[:11], 0, torch.tensor([2])), ValueError,
         r"step_count is a Long tensor of shape \[1\]; expected a 0-dim int64 tensor"),
        ("adam", lambda a: (*a[:11], 0, torch.tensor(2.0)), ValueError, r"step_count is a Float tensor"),
        ("adam", lambda a: (*a[:11], 0, torch.tensor(2, device="meta")), ValueError,
         r"step_count is on meta but weight is on cpu"),
        ("adam", lambda a: (*a[:11], 2, torch.tensor(2)), ValueError,
         r"step=2 with step_count given; expected step=0"),
        ("adam", lambda a: (a[0], a[1].double(), *a[2:]), TypeError, r"exp_avg is Double but weight is Float"),
    ],
)
def test_update_bad_arguments(rule, change, error, pattern):
    op, args = update_args(rule)
    snapshot = [a.clone() if torch.is_tensor(a) else a for a in args]
    with pytest.raises(error, match=pattern):
        op(*change(args))
    # Checked before anything is written.
    for a, s in zip(args, snapshot):
        if torch.is_tensor(a):
            assert torch.equal(a, s)


# --------------------------------------------------------------------------
# optimizers, the fused backward and make_rowwise
# --------------------------------------------------------------------------


def small_layer(seed=0, layer_id=1):
    torch.manual_seed(seed)
    cfg = engram.EngramConfig(engram_vocab_size=[101, 103], n_embed_per_ngram=16, n_head_per_ngram=2,
                              layer_ids=[1, 2])
    return engram.EngramLayer(cfg, layer_id, 24, compression=engram.CompressionTable.identity(64))


def layer_batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 12, 24, generator=gen), torch.randint(0, 64, (2, 12), generator=gen)) for _ in range(n)]


def table_of(layer):
    return layer.multi_head_embedding.embedding.weight


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "adamw"])
def test_fused_equals_unfused_equals_manual(rule):
    hyper = {"lr": 0.05} if rule != "adamw" else {"lr": 0.05, "weight_decay": 0.1}
    fused_layer, unfused_layer, manual_layer = small_layer(), small_layer(), small_layer()
    fused = optim.make_rowwise(fused_layer, rule, **hyper)
    unfused = optim.make_rowwise(unfused_layer, rule, fused=False, **hyper)
    manual = optim._RULES[rule]([table_of(manual_layer)], **hyper)
    for x, ids in layer_batches(3):
        fused_layer(x, ids).square().mean().backward()
        assert table_of(fused_layer).grad is None
        fused.step()

        unfused_layer(x, ids).square().mean().backward()
        assert table_of(unfused_layer).grad.is_sparse
        unfused.step()
        unfused.zero_grad()

        manual_layer(x, ids).square().mean().backward()
        dense = table_of(manual_layer).grad
        rows = dense.abs().sum(1).nonzero().flatten()
        manual.update(table_of(manual_layer), rows, dense[rows])
        manual_layer.zero_grad()
    assert fused.state[table_of(fused_layer)]["step"] == 3
    for other, opt in ((unfused_layer, unfused), (manual_layer, manual)):
        assert torch.equal(table_of(fused_layer), table_of(other))
        for name, value in fused.state[table_of(fused_layer)].items():
            got = opt.state[table_of(other)][name]
            assert torch.equal(value, got) if torch.is_tensor(value) else value == got


def test_fused_table_matches_sparse_adam_through_the_layer():
    ours, theirs = small_layer(), small_layer()
    opt = optim.make_rowwise(ours, "adam", lr=0.01)
    theirs.multi_head_embedding.sparse = True
    sparse_adam = torch.optim.SparseAdam([table_of(theirs)], lr=0.01)
    for x, ids in layer_batches(4):
        ours(x, ids).sum().backward()
        theirs(x, ids).sum().backward()
        sparse_adam.step()
        sparse_adam.zero_grad()
    # Close, not equal: SparseAdam adds a row's duplicates in another order and
    # takes a square root that may be an ulp off (see test_adam_equals_sparse_adam).
    state = sparse_adam.state[table_of(theirs)]
    torch.testing.assert_close(opt.state[table_of(ours)]["exp_avg"], state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(opt.state[table_of(ours)]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(table_of(ours), table_of(theirs), rtol=1e-5, atol=1e-6)


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = small_layer(0, 1), small_layer(1, 2)

    def forward(self, x, ids):
        x = x + self.a(x, ids)
        return x + self.b(x, ids)


def test_make_rowwise_on_a_model_and_remove():
    model = TwoLayers()
    opt = optim.make_rowwise(model, "adagrad", lr=0.1)
    tables = optim.table_parameters(model)
    assert [id(t) for t in tables] == [id(table_of(model.a)), id(table_of(model.b))]
    assert opt.fused_backward and len(opt.param_groups[0]["params"]) == 2
    before = [t.detach().clone() for t in tables]
    x, ids = layer_batches(1)[0]
    model(x, ids).sum().backward()
    for t, t0 in zip(tables, before):
        assert t.grad is None and not torch.equal(t, t0)
    assert model.a.value_proj.weight.grad is not None  # dense weights train as usual
    with pytest.raises(ValueError, match=r"already trains row-wise"):
        optim.make_rowwise(model.a, "sgd")
    opt.remove()
    model(x, ids).sum().backward()
    assert all(t.grad is not None and t.grad.layout == torch.strided for t in tables)
    again = optim.make_rowwise(model, "sgd", lr=0.1)  # allowed after remove()
    assert isinstance(again, optim.RowwiseSGD)


def test_lr_changes_reach_the_fused_update_and_scheduler_works():
    layer = small_layer()
    opt = optim.make_rowwise(layer, "sgd", lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    assert opt.param_groups[0]["lr"] == 0.0
    before = table_of(layer).detach().clone()
    x, ids = layer_batches(1)[0]
    layer(x, ids).sum().backward()
    opt.step()
    scheduler.step()
    assert torch.equal(table_of(layer), before)
    opt.param_groups[0]["lr"] = 0.5
    layer(x, ids).sum().backward()
    assert not torch.equal(table_of(layer), before)


def test_no_grad_forward_does_not_update():
    layer = small_layer()
    optim.make_rowwise(layer, "adam", lr=0.5)
    before = table_of(layer).detach().clone()
    x, ids = layer_batches(1)[0]
    with torch.no_grad():
        out = layer(x, ids)
    assert torch.equal(table_of(layer), before) and out.grad_fn is None


def train_run(rule, steps, resume_at=None):
    """Train a two-layer model with a row-wise table optimizer and AdamW for the
    rest; with resume_at, checkpoint there to bytes, rebuild everything from
    scratch and continue from the checkpoint."""

    def build():
        model = TwoLayers()
        table_opt = optim.make_rowwise(model, rule, lr=0.05)
        tables = {id(t) for t in optim.table_parameters(model)}
        dense_opt = torch.optim.AdamW([p for p in model.parameters() if id(p) not in tables], lr=0.01)
        return model, table_opt, dense_opt

    model, table_opt, dense_opt = build()
    for i, (x, ids) in enumerate(layer_batches(steps, seed=11)):
        if i == resume_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "table_opt": table_opt.state_dict(),
                        "dense_opt": dense_opt.state_dict()}, buffer)
            del model, table_opt, dense_opt
            buffer.seek(0)
            checkpoint = torch.load(buffer)
            model, table_opt, dense_opt = build()
            model.load_state_dict(checkpoint["model"])
            table_opt.load_state_dict(checkpoint["table_opt"])
            dense_opt.load_state_dict(checkpoint["dense_opt"])
        model(x, ids).square().mean().backward()
        table_opt.step()
        dense_opt.step()
        dense_opt.zero_grad()
    return model, table_opt


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam"])
def test_resume_from_checkpoint_is_bit_identical(rule):
    straight, straight_opt = train_run(rule, 6)
    resumed, resumed_opt = train_run(rule, 6, resume_at=3)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = straight_opt.state_dict(), resumed_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key in sa["state"]:
        assert sa["state"][key]["step"] == sb["state"][key]["step"] == 6
        for name, value in sa["state"][key].items():
            assert torch.equal(value, sb["state"][key][name]) if torch.is_tensor(value) else value == sb["state"][key][name]


@pytest.mark.parametrize("rule", ["adam", "adamw"])
def test_capturable_adam_counts_on_the_device_and_trains_identically(rule):
    """capturable=True keeps the step count as a 0-dim tensor beside the table
    (what a captured CUDA graph needs); on the CPU it trains bit for bit like the
    int count, and checkpoints move between the two."""
    plain_layer, capt_layer = small_layer(), small_layer()
    plain = optim.make_rowwise(plain_layer, rule, lr=0.05)
    capt = optim.make_rowwise(capt_layer, rule, lr=0.05, capturable=True)
    for x, ids in layer_batches(4):
        plain_layer(x, ids).square().mean().backward()
        capt_layer(x, ids).square().mean().backward()
    assert torch.equal(table_of(plain_layer), table_of(capt_layer))
    step = capt.state[table_of(capt_layer)]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.int64 and step.dim() == 0 and int(step) == 4
    assert plain.state[table_of(plain_layer)]["step"] == 4
    # Checkpoints carry the flag (as torch.optim.Adam's do) and the count in its form; turned on
    # after a load, the next step counts on the device.
    capt.load_state_dict(plain.state_dict())
    assert capt.state[table_of(capt_layer)]["step"] == 4 and not capt.param_groups[0]["capturable"]
    capt.param_groups[0]["capturable"] = True
    x, ids = layer_batches(1, seed=5)[0]
    capt_layer(x, ids).square().mean().backward()
    plain_layer(x, ids).square().mean().backward()
    assert torch.equal(table_of(plain_layer), table_of(capt_layer))
    assert torch.is_tensor(capt.state[table_of(capt_layer)]["step"]) and int(capt.state[table_of(capt_layer)]["step"]) == 5
    plain.load_state_dict(capt.state_dict())
    loaded = plain.state[table_of(plain_layer)]["step"]
    assert torch.is_tensor(loaded) and int(loaded) == 5 and plain.param_groups[0]["capturable"]
    with pytest.raises(ValueError, match="capturable='yes'; expected True or False"):
        optim.RowwiseAdam([torch.zeros(4, 2)], capturable="yes")


def test_state_dict_before_any_step_is_complete_and_load_copies():
    layer = small_layer()
    opt = optim.make_rowwise(layer, "adam", lr=0.01)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["exp_avg"].shape == table_of(layer).shape
    other = optim.RowwiseAdam([table_of(small_layer())], lr=0.01)
    other.load_state_dict(sd)
    loaded = other.state[other.param_groups[0]["params"][0]]["exp_avg"]
    assert loaded.data_ptr() != sd["state"][0]["exp_avg"].data_ptr()


def test_load_state_dict_checks_rule_and_shapes():
    layer = small_layer()
    adam = optim.RowwiseAdam([table_of(layer)])
    sgd = optim.RowwiseSGD([table_of(layer)])
    with pytest.raises(ValueError, match=r"the state is of rule 'adam'; this optimizer's rule is 'sgd'"):
        sgd.load_state_dict(adam.state_dict())
    small = optim.RowwiseAdam([torch.nn.Parameter(torch.zeros(10, table_of(layer).shape[1]))])
    with pytest.raises(ValueError, match=r"state 'exp_avg' of a table of shape \[10, 8\] has shape \[420, 8\]"):
        small.load_state_dict(adam.state_dict())


def test_optimizer_bad_arguments():
    layer = small_layer()
    with pytest.raises(ValueError, match=r"make_rowwise: rule='lamb'; expected one of"):
        optim.make_rowwise(layer, "lamb")
    with pytest.raises(ValueError, match=r"holds no Engram table"):
        optim.make_rowwise(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        optim.make_rowwise("layer")
    with pytest.raises(ValueError, match=r"RowwiseAdam: betas\[1\]=1.0; expected a finite number >= 0.0 and < 1.0"):
        optim.RowwiseAdam([table_of(layer)], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"RowwiseAdagrad: eps=0.0; expected a finite number > 0.0"):
        optim.RowwiseAdagrad([table_of(layer)], eps=0.0)
    with pytest.raises(ValueError, match=r"RowwiseSGD: lr=-1; expected a finite number >= 0.0"):
        optim.RowwiseSGD([table_of(layer)], lr=-1)
    with pytest.raises(ValueError, match=r"a table must be a 2-D float32 or float64 tensor, got a torch.bfloat16"):
        optim.RowwiseSGD([torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))])
    dense = optim.RowwiseSGD([table_of(layer)])
    x, ids = layer_batches(1)[0]
    layer(x, ids).sum().backward()  # not attached: a dense gradient
    with pytest.raises(TypeError, match=r"a table has a dense .grad; row-wise optimizers take sparse gradients"):
        dense.step()
    with pytest.raises(ValueError, match=r"not one of this optimizer's tables"):
        dense.update(torch.zeros(3, 3), torch.tensor([0]), torch.zeros(1, 3))


def test_unfused_step_takes_coalesced_and_accumulated_sparse_grads():
    layer = small_layer()
    opt = optim.make_rowwise(layer, "sgd", fused=False, lr=0.1)
    reference_table = table_of(layer).detach().clone()
    batches = layer_batches(2)
    for x, ids in batches:  # two backward passes accumulate into one sparse .grad
        layer(x, ids).sum().backward()
    grad = table_of(layer).grad
    want = reference_table - 0.1 * grad.to_dense()
    table_of(layer).grad = grad.coalesce()
    opt.step()
    torch.testing.assert_close(table_of(layer).detach(), want, rtol=2**-22, atol=1e-7)


def test_multihead_embedding_module_directly():
    module = MultiHeadEmbedding([5, 7], 4)
    opt = optim.make_rowwise(module, "adam", lr=0.1)
    ids = torch.tensor([[0, 6], [4, 0]])
    before = module.embedding.weight.detach().clone()
    module(ids).sum().backward()
    changed = (module.embedding.weight != before).any(1).nonzero().flatten()
    assert changed.tolist() == [0, 4, 5, 11] and opt.state[module.embedding.weight]["step"] == 1


def test_hugging_face_integration():
    transformers = pytest.importorskip("transformers")
    from engram.integrations import add_engram_layers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=2, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg)
    keys_before = set(model.state_dict())
    add_engram_layers(model, engram.EngramConfig(engram_vocab_size=[211, 211], n_embed_per_ngram=16,
                                                 n_head_per_ngram=2, layer_ids=[0, 2], pad_id=2))
    keys_with_engram = set(model.state_dict())
    opt = optim.make_rowwise(model, "adam", lr=0.01)
    tables = optim.table_parameters(model)
    assert len(tables) == 2
    before = [t.detach().clone() for t in tables]
    ids = torch.randint(3, 300, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    for t, t0 in zip(tables, before):
        assert t.grad is None and not torch.equal(t, t0)
    assert set(model.state_dict()) == keys_with_engram and keys_before < keys_with_engram  # no optimizer state in it
    assert all(s["step"] == 1 for s in opt.state.values())


def test_fused_path_under_torch_compile():
    # The fused lookup is left to eager (a graph break): its backward updates
    # the table in place, which a compiled graph does not own.
    eager, compiled = small_layer(), small_layer()
    eager_opt = optim.make_rowwise(eager, "adam", lr=0.01)
    compiled_opt = optim.make_rowwise(compiled, "adam", lr=0.01)
    run = torch.compile(compiled)
    for x, ids in layer_batches(2):
        eager(x, ids).square().mean().backward()
        run(x, ids).square().mean().backward()
    assert torch.equal(table_of(eager), table_of(compiled)) and table_of(compiled).grad is None
    assert compiled_opt.state[table_of(compiled)]["step"] == eager_opt.state[table_of(eager)]["step"] == 2


def test_the_lookup_backward_follows_the_module_state_and_runs_updates_through_listeners():
    """engram.lookup: fused update (module.table_optimizer), else sparse, else dense;
    a fused update runs inside the module's update listeners, outermost first."""
    torch.manual_seed(0)
    module = MultiHeadEmbedding([7, 5], 4)
    ids = torch.tensor([[0, 3], [6, 4], [0, 1]])
    table = module.embedding.weight

    module(ids).sum().backward()
    dense = table.grad.clone()
    assert not dense.is_sparse
    table.grad = None
    module.sparse = True
    module(ids).sum().backward()
    assert table.grad.is_sparse and torch.equal(table.grad.to_dense(), dense)
    module.sparse = False
    table.grad = None

    opt = optim.make_rowwise(module, "sgd", lr=0.5)
    assert module.table_optimizer is opt
    calls = []

    def listener(name):
        def run(t, update, rows):
            assert t is table
            before = table.detach().clone()
            calls.append((name, "before", rows.tolist()))
            update()
            calls.append((name, "after", bool((table.detach() != before).any())))
        return run

    outer, inner = module.add_update_listener(listener("outer")), module.add_update_listener(listener("inner"))
    start = table.detach().clone()
    module(ids).sum().backward()
    assert table.grad is None
    rows = sorted(set((ids + module.offsets).flatten().tolist()))
    assert calls == [("outer", "before", rows), ("inner", "before", rows), ("inner", "after", True),
                     ("outer", "after", True)]
    assert torch.equal(table.detach(), start - 0.5 * dense)
    outer.remove()
    inner.remove()
    calls.clear()
    module(ids).sum().backward()
    assert calls == []
    opt.remove()
    assert module.table_optimizer is None and not module.sparse
