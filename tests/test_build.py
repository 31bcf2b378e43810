"""The built extension itself: properties a broken toolchain would break."""

import shutil
import subprocess
import sys

import pytest
import torch

import engram
from engram import ops


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic section: Linux only")
def test_extension_loads_libstdcxx_dynamically():
    # A toolchain that links libstdc++ statically gives engram its own C++
    # runtime; torch then cannot catch engram's C++ errors and the process
    # dies (seen on the GPU machine). setup.py refuses such a compiler.
    readelf = shutil.which("readelf")
    assert readelf is not None, "readelf (binutils) is needed to inspect the extension"
    dynamic = subprocess.run([readelf, "-d", ops._C.__file__], check=True, capture_output=True, text=True).stdout
    assert "libstdc++.so" in dynamic, f"{ops._C.__file__} does not load libstdc++.so:\n{dynamic}"


def test_a_cpp_error_from_engram_is_a_python_exception():
    with pytest.raises(IndexError, match="input_ids holds 7"):
        engram.ops.compress_ids(torch.tensor([7]), torch.arange(5))
