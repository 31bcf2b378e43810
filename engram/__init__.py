"""engram: Engram conditional-memory layers for PyTorch (arXiv 2601.07372)."""

import os as _os

from .config import EngramConfig
from .compression import CompressionTable
from . import ops
from .ops import check_cuda_errors, cpu_isa, cuda_sync_checks, set_cuda_sync_checks
from .hashing import NgramHasher
from .layer import EngramLayer, TableFileChangedError
from .prefetch import Prefetcher
from . import optim
from . import moe
from . import tokenizer
from .tokenizer import build_compression

__all__ = [
    "EngramConfig",
    "CompressionTable",
    "NgramHasher",
    "EngramLayer",
    "TableFileChangedError",
    "Prefetcher",
    "build_compression",
    "check_cuda_errors",
    "cuda_sync_checks",
    "set_cuda_sync_checks",
    "cpu_isa",
    "ops",
    "moe",
    "optim",
    "tokenizer",
]
__version__ = "0.1.0"

# For C++: find_package(engram CONFIG) looks under this prefix (as
# torch.utils.cmake_prefix_path is for Torch), and this is the op library a
# C++ program links or loads (no Python in it).
cmake_prefix_path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "share", "cmake")
from ._loader import OPS_LIBRARY as ops_library_path  # noqa: E402
