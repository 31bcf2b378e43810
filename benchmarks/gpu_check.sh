#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool's H200): build engram with
# CUDA, run every test file in its own process (one crash cannot hide the
# rest), compute-sanitizer over the CUDA tests, the GPU benchmarks with their
# ratios, an ncu profile and a short GPU training run; within 8 minutes.
#   bash benchmarks/gpu_check.sh        # logs to $OUT (or /tmp/engram_gpu)
# Every step writes its own log under $OUT and has its own time limit, taken
# from what is left of the budget (ENGRAM_GPU_CHECK_SECONDS, default 450 s).
# Long commands write to files, never into a pipe, so a timeout keeps them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engram_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# There `c++` links libstdc++ statically (engram's C++ errors would then kill
# the process); setup.py also detects that, this just skips the probe.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
budget=${ENGRAM_GPU_CHECK_SECONDS:-450}
start=$(date +%s)
summary=$OUT/summary.txt
: > "$summary"

# step NAME SECONDS CMD...: runs CMD with a limit of min(SECONDS, time left),
# output to $OUT/NAME.log; prints one status line and the log's last lines.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 15 ]; then
    echo "SKIPPED  $name (budget spent)" | tee -a "$summary"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -ne 0 ] && status="FAILED rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT after ${limit} s"
  echo "$(printf '%-28s' "$name") $status  ($(( $(date +%s) - t0 )) s)" | tee -a "$summary"
  tail -n "${TAIL_LINES:-4}" "$OUT/$name.log" | sed 's/^/    /'
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  echo "CXX=${CXX:-c++} $(${CXX:-c++} --version | head -1)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

step build 200 python3 -m pip install -v --no-build-isolation --no-deps -e .
step test_build 60 python3 -m pytest -q -p no:cacheprovider tests/test_build.py

# CUDA test files first, each in its own process.
for f in test_cuda test_layer_cuda test_cuda_graphs test_optim_cuda; do
  [ -f "tests/$f.py" ] && step "$f" 150 python3 -m pytest -q -p no:cacheprovider "tests/$f.py"
done
step test_offload 120 python3 -m pytest -q -p no:cacheprovider tests/test_offload.py

TAIL_LINES=30 step bench_cuda 240 python3 benchmarks/bench_cuda.py --min-run-time 0.5
TAIL_LINES=24 step bench_offload 150 python3 benchmarks/bench_offload.py --device cuda --placement host --workers 8 \
  --steps 8 --rounds 2 --gpu-path both --hit-batches 100
TAIL_LINES=12 step bench_table_optim 90 python3 benchmarks/bench_table_optim.py --device cuda

if command -v compute-sanitizer > /dev/null; then
  # Small shapes only: the sanitizers slow kernels down 10-100x.
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_layer_cuda.py -k "not gradcheck and not opcheck"
  step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider -x tests/test_layer_cuda.py -k "float32 and not gradcheck and not opcheck"
else
  echo "SKIPPED  compute-sanitizer (not on PATH)" | tee -a "$summary"
fi

if command -v ncu > /dev/null; then
  # Where the time of one EngramLayer forward+backward (reference size, bf16) goes.
  TAIL_LINES=40 step ncu 120 ncu --target-processes all --launch-skip 40 --launch-count 40 --section SpeedOfLight \
    --print-summary per-kernel python3 -c "
import torch, engram
cfg = engram.EngramConfig(engram_vocab_size=[646400, 646400])
layer = engram.EngramLayer(cfg, cfg.layer_ids[0], 1024, hc_mult=4).cuda().bfloat16()
h = torch.randn(4, 4096, 4, 1024, device='cuda', dtype=torch.bfloat16, requires_grad=True)
ids = torch.randint(0, 129280, (4, 4096), device='cuda')
for _ in range(3):
    layer(h, ids).float().square().mean().backward()
torch.cuda.synchronize()"
fi

# A host table larger than the GPU's memory cannot exist there (128 GiB of RAM, 139 GiB of GPU memory, 64 GiB of
# disk): two sparse 80 GiB mmap files (only the pages read are materialised), forward only, staged path.
TAIL_LINES=12 step bench_offload_big 150 python3 benchmarks/bench_offload.py --device cuda --sparse-table-gib 80 \
  --workers 8 --steps 4 --rounds 1
TAIL_LINES=8 step train_tiny_lm 90 python3 examples/train_tiny_lm.py --device cuda --steps 60 --out "$OUT/tiny_lm"

# The CPU test files last: CI runs them on every change already.
for path in tests/test_*.py; do
  f=$(basename "$path" .py)
  [ -f "$OUT/$f.log" ] && continue
  TAIL_LINES=1 step "$f" 90 python3 -m pytest -q -p no:cacheprovider "$path"
done

echo "== summary ($(( $(date +%s) - start )) s of $budget s)"
cat "$summary"
