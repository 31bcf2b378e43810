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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic section: Linux only")
def test_op_library_links_no_python():
    # C++ programs link or dlopen libengram_ops.so: it must not need libpython
    # (absent from a LibTorch deployment) nor libtorch_python.
    readelf = shutil.which("readelf")
    assert readelf is not None, "readelf (binutils) is needed to inspect the extension"
    assert ops._C.__file__ == engram.ops_library_path and engram.ops_library_path.endswith("lib/libengram_ops.so")
    dynamic = subprocess.run([readelf, "-d", engram.ops_library_path], check=True, capture_output=True, text=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert "libtorch_cpu.so" in needed, needed
    python_libraries = [lib for lib in needed if "python" in lib]
    assert not python_libraries, f"{engram.ops_library_path} needs {python_libraries}"
    assert "Library soname: [libengram_ops.so]" in dynamic, dynamic


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


def test_cmake_package_version_matches_the_package():
    config = os.path.join(engram.cmake_prefix_path, "engram", "engramConfigVersion.cmake")
    with open(config) as f:
        assert f'set(PACKAGE_VERSION "{engram.__version__}")' in f.read()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.timeout(600)
def test_a_cpp_program_finds_the_cmake_package_and_calls_ops(tmp_path):
    # What a LibTorch user does: find_package(Torch) and find_package(engram)
    # with the two prefixes Python prints, link engram::ops, call the ops
    # through the dispatcher. The program runs without Python.
    import torch.utils

    source = os.path.join(os.path.dirname(__file__), "cmake_package")
    build = tmp_path / "build"
    prefix = f"{torch.utils.cmake_prefix_path};{engram.cmake_prefix_path}"
    configure = [
        "cmake", "-S", source, "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    if shutil.which("ccache"):
        configure.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
    for command in (configure, ["cmake", "--build", str(build)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=540)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run(
        [str(build / "ops_from_cpp"), "0", "4", "2"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    expected = engram.ops.compress_ids(torch.tensor([0, 4, 2]), torch.tensor([3, 3, 1, 0, 2]))
    lines = result.stdout.splitlines()
    assert lines[0] == " ".join(str(int(v)) for v in expected), result.stdout
    with pytest.raises(IndexError) as python_error:
        engram.ops.compress_ids(torch.tensor([7]), torch.tensor([3, 3, 1, 0, 2]))
    # The same message as Python's, as a c10::Error.
    assert lines[1] == f"c10::Error: {python_error.value}", result.stdout
