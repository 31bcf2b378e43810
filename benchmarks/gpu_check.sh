#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool's H200, 16 cores, no
# network), most important answers first, within 8 minutes:
#   1. build      the op library (with CUDA) and engram._engine side by side,
#                 in place, objects kept in build/gpu-check so a rerun is incremental
#   2. smoke      benchmarks/gpu_smoke.py: every op once on CUDA against the CPU, an
#                 EngramLayer forward+backward in float32 and bfloat16 (~20 s)
#   3. tests      the CUDA test files in parallel (pytest-xdist, per-test timeout)
#   4. bench      benchmarks/bench_cuda.py: bfloat16 first, torch.compile last
#   5. memcheck, initcheck  compute-sanitizer over the smoke script: every kernel
#                 once at odd sizes and with bad ids
#   6. extras     offload and optimizer benchmarks, a tiny training run, if time is left
# Each step has its own time limit (never more than what is left of the budget,
# less what the later steps are guaranteed), writes its log into $OUT as it
# runs, and $OUT/summary.json is rewritten after every step: pass/fail per
# step, smoke items, test counts, the benchmark's headline ratios. $OUT holds at
# most 8 files (the device tool returns no more).
#
#   CXX=/usr/bin/g++ CC=/usr/bin/gcc bash benchmarks/gpu_check.sh     # on the GPU machine
#   ENGRAM_GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh         # here: GPU steps stubbed
#
# Settings: OUT (default /tmp/engram_gpu), ENGRAM_GPU_CHECK_SECONDS (budget, 480),
# ENGRAM_GPU_CHECK_STEPS (comma list: run only these, e.g. smoke,tests for a rerun),
# ENGRAM_GPU_CHECK_LIMIT_<step> (that step's limit in seconds), and for the
# rehearsal test ENGRAM_GPU_CHECK_HANG=<step> (that step sleeps: its timeout must fire).
# Long commands write to files, never into a pipe, so that a timeout keeps their output.
set -uo pipefail
script=$(realpath "$0")
cd "$(dirname "$0")/.."
# Helpers that run under `timeout` (a program, not a shell function): the
# script calls itself with --fn NAME ARGS.
build_one() {  # build_one EXT JOBS: one extension in place, its objects in build/gpu-check/EXT
  ENGRAM_EXTENSIONS=$1 MAX_JOBS=$2 python3 setup.py build_ext --inplace --build-temp "build/gpu-check/$1"
}
build_both() {
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  # torch's headers include cusparse.h and friends, which some toolkits lack;
  # the nvidia wheels torch depends on carry them.
  local inc
  inc=$(python3 -c "import nvidia, os, glob; print(':'.join(glob.glob(os.path.join(nvidia.__path__[0], '*', 'include'))))" 2> /dev/null)
  [ -n "$inc" ] && export CPATH=$inc${CPATH:+:$CPATH}
  # _engine is small: a few jobs; the op library (with the .cu files) takes the rest.
  build_one _engine 3 > "$ENGRAM_GPU_CHECK_WORK/build_engine.log" 2>&1 &
  local engine=$!
  local cores
  cores=$(nproc 2> /dev/null || echo 4)
  build_one ops $(( cores > 4 ? cores - 3 : 1 ))
  local rc_c=$?
  wait $engine
  local rc_e=$?
  echo "== engram._engine build (rc=$rc_e):"
  cat "$ENGRAM_GPU_CHECK_WORK/build_engine.log"
  [ $rc_c -eq 0 ] && [ $rc_e -eq 0 ] || return 1
  python3 -c "
import torch, engram
assert engram.ops._C._built_with_cuda(), 'engram/lib/libengram_ops.so was built without its CUDA kernels'
print('engram', engram.__file__, 'built with CUDA')"
}
sanitize() {  # sanitize TOOL: the smoke script under compute-sanitizer
  # No caching allocator: memcheck then sees each tensor's own bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --target-processes all --error-exitcode 9 --print-limit 30 \
    python3 benchmarks/gpu_smoke.py --device cuda --json "$ENGRAM_GPU_CHECK_WORK/smoke_$1.json"
}
if [ "${1:-}" = --fn ]; then
  shift
  "$@"
  exit
fi

root=$PWD
OUT=${OUT:-/tmp/engram_gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/engram_gpu_check.XXXXXX")
export ENGRAM_GPU_CHECK_WORK=$work  # for the --fn helpers
rehearsal=${ENGRAM_GPU_CHECK_REHEARSAL:-0}
budget=${ENGRAM_GPU_CHECK_SECONDS:-480}
only=${ENGRAM_GPU_CHECK_STEPS:-}
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# There `c++` links libstdc++ statically (engram's C++ errors would then kill
# the process); setup.py detects that too, this only skips its probe.
[ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
cores=$(nproc 2> /dev/null || echo 4)
: > "$work/steps.tsv"

summarize() {
  python3 "$root/benchmarks/gpu_check_summary.py" --work "$work" --out "$OUT" --budget "$budget" \
    --elapsed "$(( $(date +%s) - start ))" --rehearsal "$rehearsal" --only "$only" > /dev/null 2>> "$OUT/summary_errors.log" || true
  [ -s "$OUT/summary_errors.log" ] || rm -f "$OUT/summary_errors.log"
}

# step NAME LOG LIMIT RESERVE CMD...: runs CMD with a limit of
# min(LIMIT, time left - RESERVE), appending to $OUT/LOG; records the outcome
# in $work/steps.tsv and prints one status line and the log's last lines.
step() {
  local name=$1 log=$2 limit=$3 reserve=$4
  shift 4
  local override="ENGRAM_GPU_CHECK_LIMIT_$name"
  limit=${!override:-$limit}
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
    return 0
  fi
  local left=$(( budget - ($(date +%s) - start) ))
  local room=$(( left - reserve ))
  if [ "$room" -lt 5 ]; then
    printf '%s\tskipped\t-\t0\t0\t%s\tbudget spent\n' "$name" "$log" >> "$work/steps.tsv"
    echo "$(printf '%-10s' "$name") SKIPPED (budget spent)"
    summarize
    return 0
  fi
  [ "$room" -lt "$limit" ] && limit=$room
  if [ "${ENGRAM_GPU_CHECK_HANG:-}" = "$name" ]; then
    set -- sleep 3600
  fi
  echo "== $name: $* (limit ${limit} s)" >> "$OUT/$log"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >> "$OUT/$log" 2>&1 < /dev/null
  local rc=$? status=ok
  [ $rc -ne 0 ] && status=failed
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status=timeout
  local took=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$took" "$limit" "$log" >> "$work/steps.tsv"
  echo "$(printf '%-10s' "$name") $status rc=$rc (${took} s of ${limit} s)"
  tail -n "${TAIL_LINES:-3}" "$OUT/$log" | cut -c1-200 | sed 's/^/    /'
  summarize
  return $rc
}

# skip NAME LOG REASON: records a step that cannot run.
skip() {
  if [ -n "$only" ] && [[ ",$only," != *",$1,"* ]]; then return 0; fi
  printf '%s\tskipped\t-\t0\t0\t%s\t%s\n' "$1" "$2" "$3" >> "$work/steps.tsv"
  echo "$(printf '%-10s' "$1") SKIPPED ($3)"
  summarize
}

{
  echo "date $(date -u +%FT%TZ), $cores cores, rehearsal=$rehearsal, budget ${budget} s"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "no nvidia-smi"
  fi
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
  echo "CXX=${CXX:-c++}: $(${CXX:-c++} --version 2>&1 | head -1)"
  command -v nvcc > /dev/null && nvcc --version | tail -1
  command -v compute-sanitizer > /dev/null || echo "no compute-sanitizer on PATH"
  python3 -c "import xdist, pytest_timeout; print('pytest-xdist', xdist.__version__)" 2>&1 | tail -1
} > "$work/machine.txt" 2>&1
cat "$work/machine.txt"
summarize

# --- 1. build -----------------------------------------------------------------
if [ "$rehearsal" = 1 ]; then
  step build build.log 240 200 echo "rehearsal: build skipped (GPU step)"
else
  step build build.log 240 200 bash "$script" --fn build_both
fi
built=$?

# --- 2. smoke -----------------------------------------------------------------
device=cuda
[ "$rehearsal" = 1 ] && device=cpu
if [ $built -ne 0 ]; then
  skip smoke smoke.log "the build failed"
else
  step smoke smoke.log 60 160 python3 benchmarks/gpu_smoke.py --device "$device" --json "$work/smoke.json"
fi

# --- 3. CUDA tests in parallel ----------------------------------------------------
cuda_tests=(tests/test_cuda.py tests/test_layer_cuda.py tests/test_cuda_graphs.py tests/test_optim_cuda.py
            tests/test_sync_free.py tests/test_placement.py tests/test_prefetcher.py tests/test_build.py)
pytest_args=(-v -p no:cacheprovider -rfE)
workers=$(( cores > 8 ? 8 : cores ))
[ "$rehearsal" = 1 ] && workers=2
if python3 -c "import xdist" 2> /dev/null; then
  pytest_args+=(-n "$workers")
else
  echo "pytest-xdist not installed: the tests run one at a time" >> "$OUT/tests.log"
fi
if python3 -c "import pytest_timeout" 2> /dev/null; then
  pytest_args+=(--timeout 120)  # torch.compile tests compile side by side
else
  echo "pytest-timeout not installed: no per-test timeout, only the step's" >> "$OUT/tests.log"
fi
if [ "$rehearsal" = 1 ]; then
  # Every test in these files skips without a GPU: the command line and the
  # plugins are rehearsed, not the tests.
  cuda_tests=(tests/test_cuda.py tests/test_layer_cuda.py tests/test_cuda_graphs.py tests/test_optim_cuda.py)
fi
if [ $built -ne 0 ]; then
  skip tests tests.log "the build failed"
else
  ENGRAM_EXPECT_CUDA=$(( 1 - rehearsal )) step tests tests.log 150 110 python3 -m pytest "${pytest_args[@]}" "${cuda_tests[@]}"
fi

# --- 4. benchmark -------------------------------------------------------------------
if [ $built -ne 0 ]; then
  skip bench bench.log "the build failed"
elif [ "$rehearsal" = 1 ]; then
  step bench bench.log 60 60 python3 benchmarks/bench_cuda.py --help
else
  TAIL_LINES=24 step bench bench.log 170 60 python3 benchmarks/bench_cuda.py --min-run-time 0.3 \
    --json "$work/bench.json"
fi

# --- 5. sanitizers: every kernel once, odd sizes, bad ids ------------------------------
for tool in memcheck initcheck; do
  reserve=0
  [ "$tool" = memcheck ] && reserve=30  # initcheck's share
  if [ $built -ne 0 ]; then
    skip "$tool" sanitizer.log "the build failed"
  elif [ "$rehearsal" = 1 ]; then
    step "$tool" sanitizer.log 60 "$reserve" echo "rehearsal: compute-sanitizer --tool $tool skipped (GPU step)"
  elif ! command -v compute-sanitizer > /dev/null; then
    skip "$tool" sanitizer.log "compute-sanitizer is not on PATH"
  else
    step "$tool" sanitizer.log 60 "$reserve" bash "$script" --fn sanitize "$tool"
  fi
done

# --- 6. extras, while time is left ------------------------------------------------------
if [ $built -eq 0 ] && [ "$rehearsal" != 1 ]; then
  step bench_offload extras.log 60 0 python3 benchmarks/bench_offload.py --device cuda --placement host \
    --workers 8 --steps 4 --rounds 1 --gpu-path both --hit-batches 50
  step bench_table_optim extras.log 40 0 python3 benchmarks/bench_table_optim.py --device cuda
  step train_tiny_lm extras.log 60 0 python3 examples/train_tiny_lm.py --device cuda --steps 40 --out "$work/tiny_lm"
fi

summarize
echo "== $(( $(date +%s) - start )) s of $budget s; summary: $OUT/summary.json"
python3 -c "
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({k: s[k] for k in ('ok', 'failed_steps', 'headline') if k in s}, indent=1))
sys.exit(0 if s.get('ok') else 1)" "$OUT/summary.json"
rc=$?
rm -rf "$work"
exit $rc
