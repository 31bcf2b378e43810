// Torch-free CUDA kernels of the hash and embedding ops. Launchers (guards,
// streams, checks, allocation) live in csrc/cuda/ops.cu.
#pragma once

#include <cstdint>

#include "kernels/hash.h"

namespace engram {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t work, int64_t max_blocks = 65535) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

#define ENGRAM_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// ids >= vocab set *bad (reported by the launcher); negative ids pass through.
__global__ void compress_kernel(const int64_t* ids, int64_t n, const int64_t* lookup, int64_t vocab, int64_t* out,
                                int* bad) {
  ENGRAM_GRID_STRIDE(i, n) {
    const int64_t id = ids[i];
    if (id >= vocab) {
      *bad = 1;
      out[i] = 0;
    } else {
      out[i] = id >= 0 ? lookup[id] : id;
    }
  }
}

struct HashArgs {
  const int64_t* canonical;  // [B, T]
  int64_t batch, seq_len, pad;
  int num_layers, max_ngram_size, heads_per_order, num_heads;
  bool xxh64;
  const int64_t* keys;     // [L, N] multipliers or [L, N-1] seeds
  const FastMod* mods;     // [L, K]
  const int64_t* offsets;  // [L, K] or null
  int64_t* out;            // [L, B, T, K]
};

// One thread per token, all layers: the window is loaded once.
__global__ void ngram_hash_kernel(HashArgs a) {
  const int64_t tokens = a.batch * a.seq_len;
  const int N = a.max_ngram_size, K = a.num_heads;
  ENGRAM_GRID_STRIDE(i, tokens) {
    const int64_t t = i % a.seq_len;
    int64_t window[kMaxNgramSize];
    for (int k = 0; k < N; ++k) window[k] = t >= k ? a.canonical[i - k] : a.pad;
    for (int l = 0; l < a.num_layers; ++l) {
      int64_t* dst = a.out + (l * tokens + i) * K;
      const int64_t* offsets = a.offsets ? a.offsets + l * K : nullptr;
      if (a.xxh64) {
        xxh64_hash_token(window, N, a.heads_per_order, reinterpret_cast<const uint64_t*>(a.keys) + l * (N - 1),
                         a.mods + l * K, offsets, dst);
      } else {
        deepseek_hash_token(window, N, a.heads_per_order, a.keys + l * N, a.mods + l * K, offsets, dst);
      }
    }
  }
}

// The row of entry e, or -1 (out of range) when id + offset overflows: two
// negative values could otherwise wrap into a valid row.
__device__ __forceinline__ int64_t table_row(const int64_t* ids, const int64_t* offsets, int64_t K, int64_t e) {
  if (!offsets) return ids[e];
  const int64_t a = ids[e], b = offsets[e % K];
  const int64_t sum = static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
  return ((a ^ sum) & (b ^ sum)) < 0 ? -1 : sum;
}

// out[e, :] = weight[row(e), :]; one thread per element.
template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* weight, int64_t num_rows, int64_t dh, const int64_t* ids,
                                   const int64_t* offsets, int64_t K, int64_t entries, scalar_t* out, int* bad) {
  ENGRAM_GRID_STRIDE(idx, entries * dh) {
    const int64_t e = idx / dh, d = idx - e * dh;
    const int64_t row = table_row(ids, offsets, K, e);
    if (row < 0 || row >= num_rows) {
      *bad = 1;
      out[idx] = scalar_t(0);
    } else {
      out[idx] = weight[row * dh + d];
    }
  }
}

// acc[row(e), :] += grad[e, :] in opmath precision (atomic: rows repeat).
template <typename scalar_t, typename acc_t>
__global__ void scatter_add_rows_kernel(const scalar_t* grad, int64_t num_rows, int64_t dh, const int64_t* ids,
                                        const int64_t* offsets, int64_t K, int64_t entries, acc_t* acc, int* bad) {
  ENGRAM_GRID_STRIDE(idx, entries * dh) {
    const int64_t e = idx / dh, d = idx - e * dh;
    const int64_t row = table_row(ids, offsets, K, e);
    if (row < 0 || row >= num_rows) {
      *bad = 1;
    } else {
      atomicAdd(acc + row * dh + d, static_cast<acc_t>(grad[idx]));
    }
  }
}

}  // namespace cuda
}  // namespace engram
