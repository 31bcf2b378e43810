#!/usr/bin/env bash
# The whole test suite: GoogleTest (kernels/, via CTest) then pytest.
# Run from the repo root after installing engram (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure
python3 -m pytest -q "$@"
