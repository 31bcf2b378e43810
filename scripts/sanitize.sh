#!/usr/bin/env bash
# The GoogleTest suite (kernels/) under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   bash scripts/sanitize.sh            # GoogleTest only, in build/asan
#   bash scripts/sanitize.sh --python   # also the pytest op tests against an
#                                       # ASan+UBSan build of the extension
#
# Any report fails the run: UBSan does not recover, ASan aborts on its first
# error. The --python mode builds the op library and engram._engine with
# ENGRAM_SANITIZE=address into build/asan-py (the in-place build is left
# alone), preloads libasan (and libstdc++) into python and turns leak
# detection off there: the interpreter and torch keep memory until exit on
# purpose, which LeakSanitizer would report.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

echo "== GoogleTest under ASan + UBSan (build/asan)"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$SAN_FLAGS" -DCMAKE_EXE_LINKER_FLAGS="$SAN_FLAGS" > /dev/null
cmake --build build/asan -j "${MAX_JOBS:-2}"
ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_init_order=1" ctest --test-dir build/asan --output-on-failure

if [ "${1:-}" = "--python" ]; then
  echo "== extension with ENGRAM_SANITIZE=address (build/asan-py)"
  ENGRAM_SANITIZE=address python3 setup.py build_ext --build-lib build/asan-py --build-temp build/asan-py-tmp \
    > build/asan-py.log 2>&1 || { tail -30 build/asan-py.log; exit 1; }
  cp engram/*.py build/asan-py/engram/
  # libstdc++ too: python itself does not link it, and ASan must find
  # __cxa_throw when it starts or it aborts on torch's first C++ exception.
  PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
  # Run from build/asan-py so that `import engram` finds the sanitized build;
  # --capture=sys leaves fd 2 alone, where the sanitizers write their reports.
  cd build/asan-py
  LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="abort_on_error=1:detect_leaks=0" \
    python3 -m pytest -q -p no:cacheprovider --capture=sys "$ROOT/tests/test_hash.py" "$ROOT/tests/test_embedding.py" \
    "$ROOT/tests/test_layer_ops.py" "$ROOT/tests/test_properties.py" "$ROOT/tests/test_concurrency.py" \
    "$ROOT/tests/test_compression.py" "${@:2}"
fi
