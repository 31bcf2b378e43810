#!/usr/bin/env bash
# Builds engram's CUDA variant against a CUDA build of torch (2.14.1+cu130,
# installed from this machine's disk into its own venv) with nvcc, then checks
# that the extension loads and that every engram op has a compiled CUDA kernel.
# No GPU needed, and none of the kernels runs: this catches CUDA code that no
# longer compiles or links, and ops that lost their CUDA registration.
#   bash scripts/check_cuda_build.sh   # venv in build/venv-cuda (ENGRAM_CUDA_VENV)
# The CPU build in engram/ is left alone: this one goes to build/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${ENGRAM_CUDA_VENV:-build/venv-cuda}")
torch_version=${ENGRAM_CUDA_TORCH:-2.14.1}

if ! command -v nvcc > /dev/null; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do
    [ -x "$dir/nvcc" ] && PATH=$dir:$PATH && break
  done
fi
command -v nvcc > /dev/null || { echo "check_cuda_build: nvcc not found; the CUDA build needs a CUDA toolkit" >&2; exit 1; }
# torch finds the toolkit through CUDA_HOME, else two levels above `nvcc`. Here
# nvcc is a wrapper script in /usr/local/bin, and /usr/local has no libcudart.
if [ -z "${CUDA_HOME:-}" ]; then
  for home in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [ -x "$home/bin/nvcc" ] && ls "$home"/lib*/libcudart.so > /dev/null 2>&1; then
      export CUDA_HOME=$home
      break
    fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset, torch guesses}"

# The venv sees the system site-packages (numpy, pytest, ninja, setuptools);
# its own torch shadows the system's CPU torch.
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version' or torch.version.cuda is None)" 2> /dev/null; then
  echo "installing torch==$torch_version (CUDA build) into $venv"
  "$venv/bin/python" -m pip install -q "torch==$torch_version"
fi
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| nvcc:', end=' ')"
nvcc --version | tail -1

# The toolkit here lacks cusparse.h, cublas_v2.h and friends that torch's
# headers include; the nvidia wheels torch depends on carry them. nvidia is a
# namespace package (no __file__), hence __path__.
include=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'include'))")
export CPATH=$include${CPATH:+:$CPATH}

# sm_90 (the H200) only, to keep the build short; nvcc through ccache when
# there is one, like the C++ compiler.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
if command -v ccache > /dev/null; then
  export PYTORCH_NVCC="ccache nvcc" PATH=/usr/lib/ccache:$PATH CCACHE_BASEDIR=$PWD
fi
start=$(date +%s)
"$venv/bin/python" setup.py -q build --build-base build/cuda > build/cuda-build.log 2>&1 || {
  tail -60 build/cuda-build.log
  echo "check_cuda_build: the CUDA build failed (full log: build/cuda-build.log)" >&2
  exit 1
}
lib=$(ls -d build/cuda/lib.*/ | head -1)
echo "built the CUDA variant in $(( $(date +%s) - start )) s into $lib"
grep -E "warning" build/cuda-build.log | grep -E "csrc/|kernels/" && { echo "check_cuda_build: engram's CUDA sources compile with warnings (above)" >&2; exit 1; }

# From inside $lib, so that `import engram` is the CUDA build, not the CPU one in ./engram.
tests=$PWD/tests
(cd "$lib" && ENGRAM_EXPECT_CUDA=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  "$tests/test_build.py" -k "cuda_kernel or cpp_error or libstdcxx or cuda_sync")

# SASS of the built kernels: registers, spills, and 64-bit division in loops
# (scripts/check_sass.py). This toolkit has no cuobjdump; the pip wheels carry
# it and nvdisasm (which it runs).
if ! "$venv/bin/python" -c "import glob, nvidia, sys; sys.exit(not all(any(glob.glob(p + '/*/bin/' + t) for p in nvidia.__path__) for t in ('cuobjdump', 'nvdisasm')))" 2> /dev/null; then
  echo "installing nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm into $venv"
  "$venv/bin/python" -m pip install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
fi
"$venv/bin/python" scripts/check_sass.py "$lib"engram/*.so "$lib"engram/lib/*.so
