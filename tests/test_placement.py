"""Table placements (device / host / mmap) and engram::gather_rows, the op that reads
host rows: equal to the device placement bit for bit on the CPU."""

import gc
import os

import numpy as np
import pytest
import torch

import engram
from engram import ops
from engram import reference as ref
from table_testing import assert_same, forward_backward, inputs, make_layer, needs_cuda


# --------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["host", "mmap"])
@pytest.mark.parametrize("g", [1, 2])
def test_placements_equal_device_forward_backward(tmp_path, placement, g):
    path = str(tmp_path / "t.npy") if placement == "mmap" else None
    device = make_layer(g=g)
    other = make_layer(placement, path, g=g)
    assert other.multi_head_embedding.placement == placement
    # Same seed -> the same table and every other weight, without copying.
    for (n1, p1), (n2, p2) in zip(device.state_dict().items(), other.state_dict().items()):
        assert n1 == n2
        assert_same(p1, p2)
    hidden, ids = inputs(g=g)
    out1, gh1, grads1 = forward_backward(device, hidden, ids)
    out2, gh2, grads2 = forward_backward(other, hidden, ids)
    assert_same(out1, out2)
    assert_same(gh1, gh2)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        assert_same(grads1[name], grads2[name])


def test_mmap_created_then_reopened_with_contents(tmp_path):
    path = str(tmp_path / "table.npy")
    first = make_layer("mmap", path)
    assert os.path.exists(path)
    with torch.no_grad():
        first.multi_head_embedding.embedding.weight[5].fill_(3.5)
    first.multi_head_embedding.flush()
    expected = first.multi_head_embedding.embedding.weight.detach().clone()
    del first
    gc.collect()
    again = make_layer("mmap", path, seed=123)  # another seed: the file's contents win
    assert_same(again.multi_head_embedding.embedding.weight.detach(), expected)
    assert torch.all(expected[5] == 3.5)
    # The file is a plain .npy table.
    assert_same(torch.from_numpy(np.load(path)), expected)


def test_host_and_mmap_tables_stay_on_host_when_the_layer_moves(tmp_path):
    for placement, path in (("host", None), ("mmap", str(tmp_path / "m.npy"))):
        layer = make_layer(placement, path)
        table = layer.multi_head_embedding.embedding.weight
        ptr = table.data_ptr()
        layer.to(torch.float64)
        assert layer.value_proj.weight.dtype == torch.float64
        assert layer.multi_head_embedding.embedding.weight.dtype == torch.float32
        assert layer.multi_head_embedding.embedding.weight.data_ptr() == ptr
        hidden, ids = inputs()
        device = make_layer().to(torch.float64)
        assert_same(layer(hidden.double(), ids), device(hidden.double(), ids))


def test_load_state_dict_writes_into_the_mmap_file(tmp_path):
    path = str(tmp_path / "s.npy")
    source = make_layer(seed=7)
    target = make_layer("mmap", path)
    target.load_state_dict(source.state_dict())
    target.multi_head_embedding.flush()
    assert_same(torch.from_numpy(np.load(path)), source.multi_head_embedding.embedding.weight.detach())


def test_placement_errors(tmp_path):
    with pytest.raises(ValueError, match="table_placement='cuda'"):
        make_layer("cuda")
    with pytest.raises(ValueError, match="needs table_path"):
        make_layer("mmap")
    with pytest.raises(ValueError, match="only used with table_placement='mmap'"):
        make_layer("host", str(tmp_path / "x.npy"))
    path = str(tmp_path / "other.npy")
    make_layer("mmap", path, layer_id=1)
    rows, dim = make_layer(layer_id=1).multi_head_embedding.embedding.weight.shape
    with pytest.raises(ValueError, match=rf"float32 table of shape \[\d+, {dim}\]; expected a C-order float32 table "
                                         rf"of shape \[\d+, {dim}\]"):
        make_layer("mmap", path, layer_id=3)  # another layer's head sizes
    wrong_dtype = str(tmp_path / "f64.npy")
    np.save(wrong_dtype, np.zeros((rows, dim), dtype=np.float64))
    with pytest.raises(ValueError, match="float64 table"):
        make_layer("mmap", wrong_dtype)
    garbage = str(tmp_path / "raw.bin")
    with open(garbage, "wb") as f:
        f.write(b"\0" * 64)
    with pytest.raises(ValueError, match="not an .npy table file"):
        make_layer("mmap", garbage)


# --------------------------------------------------------------------------
# engram::gather_rows (the zero-copy gather's op) and the CUDA paths
# --------------------------------------------------------------------------


def test_gather_rows_cpu_matches_reference():
    from torch.library import opcheck

    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        table = torch.randn(300, 5, generator=gen).to(dtype)
        rows = torch.randint(0, 300, (4, 3, 2), generator=gen)
        assert_same(ops.gather_rows(table, rows), ref.gather_rows(table, rows))
    assert ops.gather_rows(table, torch.empty(0, dtype=torch.int64)).shape == (0, 5)
    opcheck(torch.ops.engram.gather_rows.default, (table, rows, True))
    with pytest.raises(IndexError, match=r"gather_rows: rows holds 300 at flat index 3; expected values in \[0, 300\) for table.size\(0\)=300"):
        ops.gather_rows(table, torch.tensor([1, 2, 0, 300]))
    with pytest.raises(TypeError, match="gather_rows: rows must be .*, got .*Int"):
        ops.gather_rows(table, rows.int())
    with pytest.raises(ValueError, match="table must have 2 dims"):
        ops.gather_rows(table[0], rows)
    with pytest.raises(ValueError, match="table must be contiguous"):
        ops.gather_rows(table.t(), rows)


def test_gather_rows_fake_kernel_raises_the_cpu_kernels_errors():
    """gather_rows is the one op whose fake kernel is Python (engram/ops.py): its
    checks must read as the C++ ones do, on meta tensors as in a trace."""
    table, rows = torch.randn(30, 4), torch.randint(0, 30, (2, 3))
    faults = [(table[0], rows), (table.t().contiguous().t(), rows), (table, rows.int())]
    for args in faults:
        with pytest.raises((TypeError, ValueError)) as cpu:
            ops.gather_rows(*args)
        with pytest.raises(type(cpu.value)) as meta:
            ops.gather_rows(*(a.to("meta") for a in args))
        assert str(meta.value) == str(cpu.value)
    assert ops.gather_rows(table.to("meta"), rows.to("meta")).shape == (2, 3, 4)


@needs_cuda
@pytest.mark.parametrize("dtype,dh", [(torch.float32, 32), (torch.bfloat16, 64), (torch.float16, 3),
                                      (torch.float32, 5)])
def test_gather_rows_zero_copy_reads_pinned_host_rows(dtype, dh):
    from torch.library import opcheck

    table = torch.randn(5000, dh).to(dtype).pin_memory()
    rows = torch.randint(0, 5000, (7, 33), device="cuda")
    got = ops.gather_rows(table, rows)
    assert got.device == rows.device
    assert_same(got.cpu(), table[rows.cpu()])
    assert_same(ops.gather_rows(table, rows, False).cpu(), table[rows.cpu()])
    assert_same(ops.gather_rows(table.cuda(), rows).cpu(), table[rows.cpu()])  # a device table too
    opcheck(torch.ops.engram.gather_rows.default, (table, rows, True))
    bad = rows.clone()
    bad[2, 5] = 5000
    engram.set_cuda_sync_checks(True)
    try:
        with pytest.raises(IndexError, match="rows holds 5000 at flat index 71"):
            ops.gather_rows(table, bad)
    finally:
        engram.set_cuda_sync_checks(False)
    ops.gather_rows(table, bad)  # default: reported, raised by the next check
    with pytest.raises(IndexError, match="rows holds 5000 at flat index 71"):
        engram.check_cuda_errors()
    unchecked = ops.gather_rows(table, bad, False).cpu()  # no sync, not read: zeros
    assert torch.all(unchecked[2, 5] == 0)
    with pytest.raises(ValueError, match="pageable host memory"):
        ops.gather_rows(torch.randn(10, dh).to(dtype), rows % 10)

