"""Loads the compiled parts, failing loudly with the likely causes.

The op library, engram/lib/libengram_ops.so, is a plain shared library free of
Python (C++ programs link it too): loading it registers the torch.ops.engram
ops, and its few runtime controls (include/engram/runtime.h) are reached with
ctypes. engram._engine is a pybind11 module.
"""

from __future__ import annotations

import ctypes
import enum
import importlib
import os

OPS_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "libengram_ops.so")
# include/engram/runtime.h's ENGRAM_OPS_ABI_VERSION, which this package expects.
OPS_ABI_VERSION = 3


class ErrorKind(enum.IntEnum):
    """EngramErrorKind of include/engram/runtime.h."""

    NONE = 0
    INDEX = 1
    VALUE = 2
    INTERNAL = 3


def _explain(what: str, err: BaseException) -> ImportError:
    import torch

    return ImportError(
        f"engram: could not load the compiled {what} ({err}).\n"
        "Likely causes:\n"
        "  1. engram was not built: run `pip install --no-build-isolation .` (or `-e .`) in the repo,\n"
        "     after installing torch.\n"
        f"  2. engram was built against another torch than the one imported now (torch {torch.__version__}):\n"
        "     rebuild it with `pip install --no-build-isolation --force-reinstall --no-deps .`.\n"
        "  3. you are importing from the source tree of a non-editable install: run from another folder\n"
        "     or use `pip install -e`.\n"
        "  4. a CUDA build of engram on a machine without the matching CUDA runtime libraries."
    )


class OpsLibrary:
    """libengram_ops.so, loaded: its C API under the names engram used when
    the op library was a Python module (engram._C)."""

    def __init__(self, path: str) -> None:
        import torch

        if not os.path.exists(path):
            raise _explain("op library", FileNotFoundError(f"{path} does not exist"))
        try:
            torch.ops.load_library(path)  # registers the ops (once per process)
            lib = ctypes.CDLL(path)
        except OSError as err:
            raise _explain("op library", err) from err
        self.__file__ = path
        signatures = {
            "engram_ops_abi_version": (ctypes.c_int, []),
            "engram_built_with_cuda": (ctypes.c_int, []),
            "engram_take_cuda_error": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_size_t]),
            "engram_set_cuda_sync_checks": (None, [ctypes.c_int]),
            "engram_cuda_sync_checks": (ctypes.c_int, []),
            "engram_cpu_isa": (ctypes.c_int, []),
            "engram_best_cpu_isa": (ctypes.c_int, []),
            "engram_set_cpu_isa": (ctypes.c_int, [ctypes.c_int]),
            "engram_cpu_isa_calls": (ctypes.c_int64, [ctypes.c_int]),
        }
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        self._lib = lib
        version = lib.engram_ops_abi_version()
        if version != OPS_ABI_VERSION:
            raise ImportError(
                f"engram: {path} has op ABI version {version}; this engram package expects {OPS_ABI_VERSION} "
                "(a stale build: rebuild with `pip install --no-build-isolation -e .`)"
            )

    def _built_with_cuda(self) -> bool:
        return bool(self._lib.engram_built_with_cuda())

    def _take_cuda_error(self):
        """None, or (ErrorKind, message) of a CUDA kernel's pending report."""
        message = ctypes.create_string_buffer(4096)
        kind = ErrorKind(self._lib.engram_take_cuda_error(message, len(message)))
        return None if kind == ErrorKind.NONE else (kind, message.value.decode(errors="replace"))

    def set_cuda_sync_checks(self, enabled: bool) -> None:
        self._lib.engram_set_cuda_sync_checks(1 if enabled else 0)

    def cuda_sync_checks(self) -> bool:
        return bool(self._lib.engram_cuda_sync_checks())

    def _cpu_isa_state(self):
        """(level in use, best level, (kernel calls per level)), levels 0 scalar, 1 avx2, 2 avx512."""
        lib = self._lib
        return lib.engram_cpu_isa(), lib.engram_best_cpu_isa(), tuple(lib.engram_cpu_isa_calls(i) for i in range(3))

    def _set_cpu_isa(self, level: int) -> None:
        if not isinstance(level, int) or not self._lib.engram_set_cpu_isa(level):
            raise ValueError(
                f"_set_cpu_isa: level {level} is not available; this CPU and build go up to "
                f"{self._lib.engram_best_cpu_isa()}"
            )


_ops_library = None


def load(module: str):
    """engram._engine, or for "_C" the op library."""
    global _ops_library
    if module == "_C":
        if _ops_library is None:
            _ops_library = OpsLibrary(OPS_LIBRARY)
        return _ops_library
    try:
        return importlib.import_module(f"engram.{module}")
    except (ImportError, OSError) as err:  # OSError from dlopen surfaces as ImportError
        raise _explain(f"extension engram.{module}", err) from err
