import io

import pytest
import torch

from engram import CompressionTable


def test_identity_and_apply():
    table = CompressionTable.identity(10)
    assert (table.vocab_size, table.num_canonical) == (10, 10)
    ids = torch.tensor([[0, 9, 3]])
    assert torch.equal(table.apply(ids), ids)


def test_apply_maps_and_passes_negatives_through():
    table = CompressionTable(torch.tensor([0, 1, 0, 2, 1]))
    assert table.num_canonical == 3
    ids = torch.tensor([[4, 3, -1, 2, -100]])
    assert table.apply(ids).tolist() == [[1, 2, -1, 0, -100]]


def test_apply_non_contiguous():
    table = CompressionTable(torch.tensor([0, 1, 0, 2, 1]))
    ids = torch.tensor([[4, 3], [2, 1]]).t()
    assert not ids.is_contiguous()
    assert table.apply(ids).tolist() == [[1, 0], [2, 1]]


def test_id_beyond_vocabulary_is_a_clear_error():
    table = CompressionTable.identity(5)
    with pytest.raises(IndexError, match=r"compress_ids: input_ids holds 7 at flat index 2.*< 5"):
        table.apply(torch.tensor([1, 2, 7]))


@pytest.mark.parametrize("bad", [torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]), torch.tensor([], dtype=torch.long)])
def test_bad_lookup(bad):
    with pytest.raises(ValueError, match="CompressionTable"):
        CompressionTable(bad)


def test_wrong_dtype_ids():
    with pytest.raises(TypeError, match="compress_ids: input_ids must be Long"):
        CompressionTable.identity(5).apply(torch.tensor([1.0]))


def test_round_trips_through_torch_save_and_state_dict():
    table = CompressionTable(torch.tensor([0, 1, 0, 2, 1, 3]))
    buf = io.BytesIO()
    torch.save(table, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False) == table
    buf = io.BytesIO()
    torch.save(table.state_dict(), buf)
    buf.seek(0)
    loaded = CompressionTable.from_state_dict(torch.load(buf))
    assert loaded == table and loaded.num_canonical == 4
    other = CompressionTable.identity(2)
    other.load_state_dict(table.state_dict())
    assert other == table
