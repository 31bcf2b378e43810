"""The built extension itself: properties a broken toolchain would break."""

import os
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


# ENGRAM_EXPECT_CUDA=1 (CI's CUDA build stage) turns the skip into a failure:
# a build that silently dropped its CUDA sources must not pass there.
expect_cuda = os.environ.get("ENGRAM_EXPECT_CUDA") == "1"


@pytest.mark.skipif(not expect_cuda and not ops._C._built_with_cuda(), reason="engram was built without CUDA")
def test_every_op_has_a_cuda_kernel():
    # Needs no GPU: the registrations exist as soon as the CUDA build loads.
    assert ops._C._built_with_cuda(), "ENGRAM_EXPECT_CUDA=1 but engram._C was built without its CUDA kernels"
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("engram::"))
    assert len(names) >= 12, names
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    assert not missing, f"engram ops without a CUDA kernel: {missing}"
    # ... and each is a compiled kernel, not a Python registration (no
    # composite may stand in for a CUDA kernel).
    def cuda_registration(name):
        return next(line for line in torch._C._dispatch_dump(name).splitlines() if line.startswith("CUDA:"))

    python_kernels = [n for n in names if ".py:" in cuda_registration(n)]
    assert not python_kernels, f"engram ops whose CUDA kernel is registered from Python: {python_kernels}"


def test_cuda_sync_check_setting():
    # The switch exists in every build (CPU builds have nothing to check).
    assert engram.cuda_sync_checks() is False
    try:
        engram.set_cuda_sync_checks(True)
        assert engram.cuda_sync_checks() is True
    finally:
        engram.set_cuda_sync_checks(False)
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        engram.set_cuda_sync_checks(1)
    engram.check_cuda_errors()  # nothing pending


@pytest.mark.parametrize("value, expected", [("1", "True"), ("0", "False"), ("yes", "ENGRAM_CUDA_SYNC_CHECKS='yes'")])
def test_cuda_sync_checks_environment(value, expected):
    result = subprocess.run(
        [sys.executable, "-c", "import engram; print(engram.cuda_sync_checks())"],
        env={**os.environ, "ENGRAM_CUDA_SYNC_CHECKS": value}, capture_output=True, text=True,
    )
    assert expected in (result.stdout + result.stderr)
    assert (result.returncode == 0) == (value in ("0", "1"))
