"""Builds engram._C (the operator library) and engram._engine (pybind11 helpers).

Install torch first, then: pip install --no-build-isolation .
CUDA sources are compiled only when a CUDA toolkit and a CUDA build of torch
are both present (or ENGRAM_CUDA=0 turns them off).
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for people installing wrongly
    sys.exit(
        "engram builds against the torch you already have. Install torch first "
        "(e.g. pip install torch==2.13.0), then run: pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("MAX_JOBS", "2")


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    if os.environ.get("ENGRAM_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


# No -std flag: torch.utils.cpp_extension picks the standard its headers need
# (C++17 up to torch 2.13, C++20 from 2.14).
cxx_flags = ["-O3", "-fvisibility=hidden"]
link_flags = []
# at::parallel_for is a header template: with torch's OpenMP backend it only
# runs in parallel when the extension itself is compiled with OpenMP. The
# loader then reuses the libgomp.so.1 torch already loaded (one thread pool).
if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
# ENGRAM_SANITIZE=address: an AddressSanitizer + UBSan build, for
# scripts/sanitize.sh --python (python must then run with libasan preloaded).
sanitize = os.environ.get("ENGRAM_SANITIZE", "")
if sanitize not in ("", "address"):
    sys.exit(f"ENGRAM_SANITIZE={sanitize!r}: expected 'address' or unset")
san_flags = []
if sanitize:
    san_flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cxx_flags += san_flags
    link_flags += san_flags
op_sources = sources("csrc/*.cpp")
define_macros = []
Extension = cpp_extension.CppExtension
extra_compile_args = {"cxx": cxx_flags}
if want_cuda():
    Extension = cpp_extension.CUDAExtension
    op_sources += sources("csrc/cuda/*.cu")
    define_macros.append(("ENGRAM_WITH_CUDA", "1"))
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]

ext_modules = [
    Extension(
        "engram._C",
        op_sources,
        include_dirs=[ROOT],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_flags,
    ),
    cpp_extension.CppExtension(
        "engram._engine",
        sources("python/*.cpp"),
        include_dirs=[ROOT],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=san_flags,
    ),
]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
