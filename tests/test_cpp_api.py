"""engram.cpp_io, the Python side of the C++ API's layer files.

The C++ reader (include/engram/layer.h) is tested against these files by
scripts/cpp_api_tests.sh (a CMake build, over a minute on 2 cores, so not
here); these tests cover the writer and the Python reader, which the C++
test takes its expected messages from."""

from __future__ import annotations

import os
import pickletools
import zipfile

import pytest
import torch

import engram
from engram import CompressionTable, EngramConfig, EngramLayer
from engram import cpp_io

CONFIG = EngramConfig(engram_vocab_size=[31, 37], max_ngram_size=3, n_embed_per_ngram=12, n_head_per_ngram=3,
                      layer_ids=[0, 3], pad_id=2, seed=2**40 + 3, kernel_size=4, hash="xxh64")


def make_layer(dtype=torch.float32, hc_mult=2):
    torch.manual_seed(3)
    compression = CompressionTable(torch.tensor([0, 1, 2, 1, 3, 0, 4, 4, 2, 5]))
    layer = EngramLayer(CONFIG, 3, 7, hc_mult, compression)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norm weights away from 1
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_saved_layer_loads_with_the_same_state_and_outputs(tmp_path, dtype):
    layer = make_layer(dtype)
    path = tmp_path / "layer.pt"
    cpp_io.save_layer(layer, path)
    loaded = cpp_io.load_layer(path)
    assert loaded.config == layer.config and loaded.compression == layer.compression
    assert (loaded.layer_id, loaded.hidden_size, loaded.hc_mult) == (3, 7, 2)
    expected = layer.state_dict()
    assert list(loaded.state_dict()) == list(expected)
    for key, value in loaded.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    ids = torch.randint(0, 10, (2, 9))
    hidden = torch.randn(2, 9, 2, 7, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(hidden, ids), layer(hidden, ids))


def test_ints_outside_int32_are_written_as_8_byte_values(tmp_path):
    # LibTorch's unpickler reads LONG1 only with 8 bytes; a seed of 2^40+3
    # would take 6. pickle_safe writes it as a 0-d int64 tensor instead.
    path = tmp_path / "layer.pt"
    cpp_io.save_layer(make_layer(), path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    long1 = [arg for op, arg, _ in pickletools.genops(data) if op.name == "LONG1"]
    assert long1 == [], long1
    assert cpp_io.load_layer(path).config.seed == 2**40 + 3
    assert cpp_io.pickle_safe({"a": [2**31, 5, -(2**31) - 1]})["a"][1] == 5
    assert torch.equal(cpp_io.pickle_safe(2**31), torch.tensor(2**31))


def test_save_layer_refuses_host_tables(tmp_path):
    layer = EngramLayer(CONFIG, 0, 5, compression=CompressionTable.identity(10), table_placement="host")
    with pytest.raises(ValueError, match="table_placement='host' is not supported: the C.. API holds the table"):
        cpp_io.save_layer(layer, tmp_path / "layer.pt")


def test_load_layer_names_the_key_and_the_shapes(tmp_path):
    layer = make_layer()
    path = tmp_path / "layer.pt"
    cpp_io.save_layer(layer, path)
    file = torch.load(path, weights_only=True)
    file["state_dict"]["key_projs.1.weight"] = torch.zeros(7, 23)
    torch.save(file, path)
    with pytest.raises(ValueError) as err:
        cpp_io.load_layer(path)
    assert str(err.value) == (
        f"load_layer: {str(path)!r}: state_dict['key_projs.1.weight'] has shape [7, 23]; the layer expects [7, 24]"
    )
    del file["state_dict"]["key_projs.1.weight"]
    torch.save(file, path)
    with pytest.raises(ValueError, match=r"state_dict has no 'key_projs.1.weight'; the layer expects a tensor of "
                                         r"shape \[7, 24\] there"):
        cpp_io.load_layer(path)
    file["format"] = 2
    torch.save(file, path)
    with pytest.raises(ValueError, match="has format=2; expected format=1"):
        cpp_io.load_layer(path)
    with pytest.raises(FileNotFoundError, match="does not exist or is not a file"):
        cpp_io.load_layer(tmp_path / "missing.pt")


def test_the_cmake_package_ships_the_cpp_api_headers():
    # engramConfig.cmake takes include/ next to the package (a wheel, which
    # setup.py's BuildPy fills from include/engram/*.h) or the checkout's (editable).
    package = os.path.dirname(engram.__file__)
    for include in (os.path.join(package, "include"), os.path.join(os.path.dirname(package), "include")):
        if os.path.exists(os.path.join(include, "engram", "runtime.h")):
            break
    for header in ("ops.h", "hasher.h", "layer.h"):
        assert os.path.exists(os.path.join(include, "engram", header)), header
