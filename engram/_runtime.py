"""Process-wide switches of engram's kernels and the environment variables
that set them at import: ENGRAM_CPU_ISA (engram/_cpu_isa.py) and
ENGRAM_CUDA_SYNC_CHECKS. A bad value fails `import engram`."""

from __future__ import annotations

import os

import torch

from . import _cpu_isa, _loader

_C = _loader.load("_C")

# The kinds a CUDA kernel reports (EngramErrorKind, include/engram/runtime.h).
_CUDA_ERROR_TYPES = {
    _loader.ErrorKind.INDEX: IndexError,
    _loader.ErrorKind.VALUE: ValueError,
    _loader.ErrorKind.INTERNAL: RuntimeError,
}


def set_cuda_sync_checks(enabled: bool) -> None:
    """Chooses when a bad id read by a CUDA kernel raises.

    Off (the default): the CUDA ops never synchronise with the host, so a
    training step stays asynchronous and CUDA graphs can capture it. A kernel
    that meets an id outside its table reads that entry as zeros and leaves a
    report; the next engram CUDA op on that device (or check_cuda_errors())
    raises it as an IndexError naming the op, the id, its flat index and the
    table size. On: every op that checks ids waits for its kernel and raises
    at the call itself, like the CPU ops (slower; for debugging). The
    environment variable ENGRAM_CUDA_SYNC_CHECKS=1 turns it on at import.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cuda_sync_checks: enabled must be a bool, got {type(enabled).__name__}")
    _C.set_cuda_sync_checks(enabled)


def cuda_sync_checks() -> bool:
    """Whether CUDA ops synchronise to raise bad ids at the call (see set_cuda_sync_checks)."""
    return _C.cuda_sync_checks()


def check_cuda_errors(synchronize: bool = True) -> None:
    """Raises the report a CUDA kernel left for a bad id, if any (see
    set_cuda_sync_checks), and clears it. synchronize=True first waits for
    all work on every initialised CUDA device, so nothing queued is missed;
    call it e.g. once per logging interval or at the end of training."""
    if synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)
    error = _C._take_cuda_error()
    if error is not None:
        kind, message = error
        raise _CUDA_ERROR_TYPES[kind](message)


def _cuda_sync_checks_from_environment() -> None:
    value = os.environ.get("ENGRAM_CUDA_SYNC_CHECKS")
    if value is None or value == "":
        return
    if value not in ("0", "1"):
        raise ValueError(
            f"ENGRAM_CUDA_SYNC_CHECKS={value!r}: expected 0 (raise bad ids at the next call, the default) "
            "or 1 (synchronise and raise at the call)"
        )
    set_cuda_sync_checks(value == "1")


def apply_environment() -> None:
    """Applies the ENGRAM_* variables (once, at import)."""
    _cpu_isa.apply_environment()
    _cuda_sync_checks_from_environment()


apply_environment()
