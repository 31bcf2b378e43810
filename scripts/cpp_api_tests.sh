#!/usr/bin/env bash
# The C++ API tests: Python writes layers and their outputs
# (tests/cpp_api/make_fixtures.py), CMake builds tests/cpp_api against the
# installed engram and LibTorch, and the GoogleTest binary checks the C++
# layer against them. Run from anywhere after `pip install -e .` (or a
# setup.py build_ext --inplace with PYTHONPATH at the checkout).
#   ENGRAM_CPP_BENCH=1  also time one layer's forward in C++ and in Python.
# Exits nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=$root/build/cpp_api
fixtures=$build/fixtures
python=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "cpp_api_tests: $1 ($(( $(date +%s) - start )) s)"; }

# The engram Python imports is the one whose library and headers CMake uses.
prefix=$("$python" -c 'import torch.utils, engram
print(torch.utils.cmake_prefix_path + ";" + engram.cmake_prefix_path)')

rm -rf "$fixtures"
mkdir -p "$build"
bench=()
if [[ "${ENGRAM_CPP_BENCH:-0}" == 1 ]]; then bench=(--bench); fi
timeout 600 "$python" tests/cpp_api/make_fixtures.py "$fixtures" "${bench[@]}"
stamp "fixtures written"

generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
launcher=()
if command -v ccache > /dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
timeout 600 cmake -S tests/cpp_api -B "$build" "${generator[@]}" "${launcher[@]}" \
  -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$prefix" > "$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
timeout 900 cmake --build "$build" -j "${MAX_JOBS:-2}"
stamp "built"

# No PYTHON* variables: the binaries need no Python.
env -u PYTHONPATH -u PYTHONHOME timeout 300 "$build/test_cpp_api" "$fixtures"
stamp "GoogleTest passed"
if [[ "${ENGRAM_CPP_BENCH:-0}" == 1 ]]; then
  # Python and C++ in turn, twice: on a shared machine one pair alone misleads.
  env -u PYTHONPATH -u PYTHONHOME timeout 300 "$build/cpp_api_bench" "$fixtures"
  timeout 300 "$python" tests/cpp_api/make_fixtures.py "$fixtures" --time-python
  env -u PYTHONPATH -u PYTHONHOME timeout 300 "$build/cpp_api_bench" "$fixtures"
  stamp "bench done"
fi
