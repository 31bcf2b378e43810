"""Loads the compiled extensions, failing loudly with the likely causes."""

from __future__ import annotations

import importlib


def _explain(module: str, err: BaseException) -> ImportError:
    import torch

    return ImportError(
        f"engram: could not load the compiled extension engram.{module} ({err}).\n"
        "Likely causes:\n"
        "  1. engram was not built: run `pip install --no-build-isolation .` (or `-e .`) in the repo,\n"
        "     after installing torch.\n"
        f"  2. engram was built against another torch than the one imported now (torch {torch.__version__}):\n"
        "     rebuild it with `pip install --no-build-isolation --force-reinstall --no-deps .`.\n"
        "  3. you are importing from the source tree of a non-editable install: run from another folder\n"
        "     or use `pip install -e`.\n"
        "  4. a CUDA build of engram on a machine without the matching CUDA runtime libraries."
    )


def load(module: str):
    try:
        return importlib.import_module(f"engram.{module}")
    except ImportError as err:  # OSError from dlopen surfaces as ImportError
        raise _explain(module, err) from err
    except OSError as err:
        raise _explain(module, err) from err
