#!/usr/bin/env bash
# The CPU op tests under each CPU ISA level of the kernels (ENGRAM_CPU_ISA =
# scalar, avx2, avx512), one pytest process per level. A level this machine's
# CPU lacks is skipped with a note; scripts/check_isa_code.py checks the
# machine code of every level first. Extra arguments go to pytest.
# Run from anywhere after building engram (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TESTS=(tests/test_hash.py tests/test_embedding.py tests/test_layer_ops.py tests/test_compression.py)
# In the same process: the level asked for is the one in use.
LEVEL_CHECKS=(tests/test_isa.py::test_levels_and_default tests/test_isa.py::test_environment_level_is_in_use)

# The machine code of every level, including those this CPU cannot run.
if [[ "$(uname -m)" == x86_64 ]]; then
  "$PYTHON" scripts/check_isa_code.py
else
  echo "not x86-64: one version of each kernel, no per-level code to check"
fi

# The levels this CPU runs, e.g. "scalar avx2 avx512" (ENGRAM_CPU_ISA unset).
levels="$(env -u ENGRAM_CPU_ISA "$PYTHON" -c 'from engram import ops; print(" ".join(ops.cpu_isa_levels()))')"
echo "CPU ISA levels of this machine: $levels"

ran=0
for level in scalar avx2 avx512; do
  if [[ " $levels " != *" $level "* ]]; then
    echo "== ENGRAM_CPU_ISA=$level: skipped, this machine's CPU lacks it"
    continue
  fi
  echo "== ENGRAM_CPU_ISA=$level"
  ENGRAM_CPU_ISA="$level" "$PYTHON" -m pytest -q "${TESTS[@]}" "${LEVEL_CHECKS[@]}" "$@"
  ran=$((ran + 1))
done
echo "ran the op tests under $ran CPU ISA level(s)"
# test_isa.py switches between all levels itself: once is enough.
echo "== tests/test_isa.py: every op at every level, against the reference and each other"
env -u ENGRAM_CPU_ISA "$PYTHON" -m pytest -q tests/test_isa.py "$@"
