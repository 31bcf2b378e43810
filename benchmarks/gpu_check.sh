#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool's H200): build engram with
# CUDA, run the CUDA tests and the GPU benchmarks. Meant to finish in < 8 min.
#   bash benchmarks/gpu_check.sh            # logs to $OUT (or /tmp/engram_gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engram_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

echo "== build"
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

echo "== CUDA tests, then the rest"
python3 -m pytest -q -x tests/test_cuda.py tests/test_optim_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -5
timeout 240 python3 -m pytest -q 2>&1 | tee "$OUT/test_all.log" | tail -5

echo "== GPU benchmarks"
timeout 120 python3 benchmarks/bench_hash.py --device cuda --batch 64 --seq 4096 --min-run-time 1 2>&1 | tee "$OUT/bench_hash_cuda.log"
if python3 benchmarks/bench_layer.py --help 2>/dev/null | grep -q -- "--device"; then
  timeout 180 python3 benchmarks/bench_layer.py --device cuda 2>&1 | tee "$OUT/bench_layer_cuda.log"
fi
timeout 240 python3 benchmarks/bench_table_optim.py --device cuda 2>&1 | tee "$OUT/bench_table_optim_cuda.log"
if [ -f benchmarks/bench_offload.py ]; then
  echo "== host-table offload (issue 11)"
  timeout 240 python3 benchmarks/bench_offload.py --device cuda --placement host --workers 8 --steps 8 --rounds 2 \
    2>&1 | tee "$OUT/bench_offload_cuda.log"
fi
