"""Builds engram/lib/libengram_ops.so (the operator library, free of Python)
and engram._engine (pybind11 helpers of the prefetcher).

Install torch first, then: pip install --no-build-isolation .
CUDA sources are compiled only when a CUDA toolkit and a CUDA build of torch
are both present (or ENGRAM_CUDA=0 turns them off).
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

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


def links_libstdcxx_dynamically(compiler):
    """Whether a shared library built by `compiler` loads libstdc++.so. A
    toolchain that links libstdc++ statically into the extension gives it its
    own copy of the C++ runtime: a c10::Error thrown by a TORCH_CHECK in engram
    is then not caught by torch's handlers, and the process dies instead of
    raising a Python exception. None: could not tell."""
    import shutil
    import subprocess
    import tempfile

    readelf = shutil.which("readelf")
    if readelf is None or shutil.which(compiler.split()[0]) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write('#include <stdexcept>\nvoid engram_probe() { throw std::runtime_error("probe"); }\n')
        try:
            subprocess.run([*compiler.split(), "-shared", "-fPIC", src, "-o", lib], check=True, capture_output=True)
            dynamic = subprocess.run([readelf, "-d", lib], check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    return "libstdc++.so" in dynamic


def choose_compiler():
    if not sys.platform.startswith("linux"):
        return
    compiler = os.environ.get("CXX", "c++")
    if links_libstdcxx_dynamically(compiler) is not False:
        return
    for cxx, cc in (("/usr/bin/g++", "/usr/bin/gcc"), ("g++", "gcc")):
        if cxx != compiler and links_libstdcxx_dynamically(cxx):
            print(
                f"engram: {compiler!r} links libstdc++ statically into shared libraries, so C++ errors from engram "
                f"would crash the process instead of raising; building with {cxx} instead",
                file=sys.stderr,
            )
            os.environ["CXX"], os.environ["CC"] = cxx, cc
            return
    sys.exit(
        f"engram: the C++ compiler {compiler!r} links libstdc++ statically into shared libraries. An extension "
        "built that way crashes the process on any error instead of raising a Python exception. Point CXX and CC "
        "at a compiler that links libstdc++ dynamically (e.g. the system g++, the one torch was built with)."
    )


choose_compiler()


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


def without_python(extension):
    """The op library links no libpython and no libtorch_python, so that a C++
    program can link or dlopen it (cpp_extension adds torch_python to every
    extension). Its SONAME lets programs that link it find it by name."""
    extension.libraries = [lib for lib in extension.libraries if lib != "torch_python"]
    extension.extra_link_args = [*extension.extra_link_args, "-Wl,-soname,libengram_ops.so"]
    return extension


ext_modules = [
    without_python(
        Extension(
            "engram.lib.libengram_ops",
            op_sources,
            include_dirs=[ROOT],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=link_flags,
        )
    ),
    cpp_extension.CppExtension(
        "engram._engine",
        sources("python/*.cpp"),
        include_dirs=[ROOT],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=san_flags,
    ),
]

def short_name(extension):
    """What ENGRAM_EXTENSIONS calls an extension: ops or _engine."""
    return "ops" if extension.name == "engram.lib.libengram_ops" else extension.name.split(".")[-1]


class BuildExtension(cpp_extension.BuildExtension):
    """Names the op library libengram_ops.so, not as a Python module
    (libengram_ops.cpython-3xx-....so): it is a plain shared library that C++
    programs link, and that engram/_loader.py loads."""

    def get_ext_filename(self, fullname):
        # setuptools asks with the full dotted name or with its last part.
        if fullname == "engram.lib.libengram_ops":
            return os.path.join("engram", "lib", "libengram_ops.so")
        if fullname == "libengram_ops":
            return "libengram_ops.so"
        return super().get_ext_filename(fullname)

    def copy_extensions_to_source(self):
        # --inplace / editable: engram/lib is not a package, so nothing made it.
        os.makedirs(os.path.join(ROOT, "engram", "lib"), exist_ok=True)
        super().copy_extensions_to_source()


class BuildPy(build_py):
    """Ships the public C++ headers (include/engram) inside the package, where
    engram/share/cmake/engram/engramConfig.cmake finds them in a wheel."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "engram", "include", "engram")
        os.makedirs(target, exist_ok=True)
        for header in glob.glob(os.path.join(ROOT, "include", "engram", "*.h")):
            self.copy_file(header, os.path.join(target, os.path.basename(header)))


# ENGRAM_EXTENSIONS=ops (or _engine): build only that one, so that two builds
# can run side by side (benchmarks/gpu_check.sh), each with its own --build-temp.
only = os.environ.get("ENGRAM_EXTENSIONS", "")
if only:
    names = {short_name(e) for e in ext_modules}
    unknown = set(only.split(",")) - names
    if unknown:
        sys.exit(f"ENGRAM_EXTENSIONS={only!r}: unknown {sorted(unknown)}; expected a comma-separated subset of {sorted(names)}")
    ext_modules = [e for e in ext_modules if short_name(e) in only.split(",")]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPy},
)
