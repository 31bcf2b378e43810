"""The CPU instruction-set level of the CPU kernels (kernels/cpu_isa.h).

The hot CPU kernels are compiled for three levels and the one in use is picked
at run time: the best this CPU has, unless the environment variable
ENGRAM_CPU_ISA (read once, when engram is imported) or set_cpu_isa() asks for
a lower one.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List

from . import _loader

_C = _loader.load("_C")

ENV_VAR = "ENGRAM_CPU_ISA"
# In order: each level's kernels need the CPU features of the ones before it.
LEVELS = ("scalar", "avx2", "avx512")
_DESCRIPTIONS = {
    "scalar": "baseline x86-64",
    "avx2": "x86-64-v3: AVX2 and FMA",
    "avx512": "x86-64-v4: AVX-512",
}

def _state():
    current, best, calls = _C._cpu_isa_state()
    return LEVELS[current], LEVELS[best], calls


def cpu_isa() -> str:
    """The CPU ISA level the CPU kernels use now: 'scalar', 'avx2' or 'avx512'."""
    return _state()[0]


def cpu_isa_levels() -> List[str]:
    """The levels this CPU (and this build of engram) can run, lowest first."""
    best = _state()[1]
    return list(LEVELS[: LEVELS.index(best) + 1])


def _resolve(level: str, source: str) -> int:
    """Index of `level` ('auto' = the best); ValueError naming `source` otherwise."""
    if not isinstance(level, str):
        raise TypeError(f"{source} must be a str, one of {', '.join(LEVELS)} or auto; got {type(level).__name__}")
    name = level.strip().lower()
    best = _state()[1]
    if name == "auto":
        return LEVELS.index(best)
    if name not in LEVELS:
        raise ValueError(
            f"{source}={level!r} is not a CPU ISA level; expected one of {', '.join(LEVELS)} or auto"
        )
    if LEVELS.index(name) > LEVELS.index(best):
        supported = ", ".join(LEVELS[: LEVELS.index(best) + 1])
        raise ValueError(
            f"{source}={level!r} asks for {_DESCRIPTIONS[name]}, but this CPU's best level is {best!r} "
            f"({_DESCRIPTIONS[best]}); expected one of {supported} or auto"
        )
    return LEVELS.index(name)


def set_cpu_isa(level: str) -> str:
    """Makes later CPU kernel calls use `level` ('scalar', 'avx2', 'avx512' or
    'auto' for the best this CPU has); returns the level used before.

    Raises ValueError for an unknown level or one this CPU lacks. Calls already
    running finish with the level they started with. Meant for tests and
    benchmarks: the kernels of every level compute the same results up to
    float rounding (hash ids are bit-identical).
    """
    index = _resolve(level, "set_cpu_isa: level")
    previous = cpu_isa()
    _C._set_cpu_isa(index)
    return previous


@contextlib.contextmanager
def use_cpu_isa(level: str) -> Iterator[str]:
    """`with use_cpu_isa('scalar'):` runs the block at `level`, then restores the level before."""
    previous = set_cpu_isa(level)
    try:
        yield cpu_isa()
    finally:
        _C._set_cpu_isa(LEVELS.index(previous))


def cpu_isa_calls() -> Dict[str, int]:
    """Calls of the CPU kernels per compiled level since import, e.g. {'scalar': 3, 'avx2': 0, 'avx512': 12}.

    A debugging aid: it counts what ran, so a test can check that the level it
    asked for is the one that computed its results. The n-gram hash counts as
    'avx512' when it ran the AVX-512 reduction and as 'scalar' otherwise.
    """
    return dict(zip(LEVELS, _state()[2]))


def apply_environment() -> None:
    """Applies ENGRAM_CPU_ISA (unset or empty: auto)."""
    value = os.environ.get(ENV_VAR, "")
    if value.strip():
        _C._set_cpu_isa(_resolve(value, ENV_VAR))
