// Torch-free CUDA kernels of the row-wise optimizer ops (engram.optim). The
// launchers (checks, guard, stream, allocation, sort, scans) are in
// csrc/cuda/optim.cu; the math is kernels/optim_math.h, shared with the CPU.
//
// Deduplication on the GPU: keys (row << entry_bits | entry) are sorted, so a
// row's entries are contiguous and in entry order. Each row's entries are cut
// into pieces of at most kPieceEntries, counted from the row's first entry;
// one warp sums a piece in entry order, then one warp per row adds the row's
// pieces in order. Deterministic (no atomics, fixed order) for any schedule;
// a row with at most kPieceEntries entries is summed exactly as on the CPU
// (pure entry order), a hotter row (n-grams are Zipfian) in pieces, so a hot
// row does not serialise the whole step on one warp.
#pragma once

#include <cstdint>

#include "kernels/optim_math.h"

namespace engram {
namespace cuda_optim {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kPieceEntries = 32;

inline unsigned blocks_for(int64_t threads, int64_t max_blocks = 65535) {
  const int64_t b = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

// One warp per item, grid-stride: the loop bound is warp-uniform, so every
// lane of a warp takes part in every shuffle.
#define ENGRAM_WARP_STRIDE(item, n)                                                          \
  for (int64_t item = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; item < (n); \
       item += int64_t(gridDim.x) * blockDim.x / kWarp)

#define ENGRAM_THREAD_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// keys[e] = (row << entry_bits) | e, as int64 (the launcher keeps keys below
// 2^63); a row outside [0, num_rows) raises *bad. The entry's head e % K is
// stepped with e (a 64-bit % per entry is a ~20-instruction slow path): two
// remainders per thread, in 32 bits whenever the values fit (always, at the
// launcher's grids).
__device__ __forceinline__ int64_t rem_small(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<int64_t>(static_cast<uint32_t>(a) % static_cast<uint32_t>(b));
  return a % b;
}

static __global__ void dedup_keys_kernel(const int64_t* ids, const int64_t* offsets, int64_t num_heads,
                                         int64_t entries, int64_t num_rows, optim::KeyLayout layout, int64_t* keys,
                                         int* bad) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t heads = offsets ? num_heads : 1;
  int64_t head = rem_small(first, heads);
  const int64_t head_step = rem_small(stride, heads);
  for (int64_t e = first; e < entries; e += stride) {
    const int64_t row = optim::entry_row_of_head(ids, offsets, head, e, num_rows);
    if (row < 0) {
      *bad = 1;
      keys[e] = 0;
    } else {
      keys[e] = static_cast<int64_t>(layout.pack(static_cast<uint64_t>(row), static_cast<uint64_t>(e)));
    }
    head += head_step;
    if (head >= heads) head -= heads;
  }
}

// head_pos[i] = i where a row's run of sorted keys starts, else 0 (a running
// max over it gives each position its row's first position).
static __global__ void run_heads_kernel(const int64_t* sorted, int64_t entries, optim::KeyLayout layout, int64_t* head_pos) {
  ENGRAM_THREAD_STRIDE(i, entries) {
    const bool head =
        i == 0 || layout.row(static_cast<uint64_t>(sorted[i])) != layout.row(static_cast<uint64_t>(sorted[i - 1]));
    head_pos[i] = head ? i : 0;
  }
}

// flags[i] = 1 where a row starts, flags[entries + i] = 1 where a piece starts.
static __global__ void run_flags_kernel(const int64_t* run_start, int64_t entries, int64_t* flags) {
  ENGRAM_THREAD_STRIDE(i, entries) {
    const int64_t offset = i - run_start[i];
    flags[i] = offset == 0;
    flags[entries + i] = offset % kPieceEntries == 0;
  }
}

// From the inclusive scans of the flags: the unique rows, each row's first
// piece, each piece's first sorted position (with end markers).
static __global__ void segments_kernel(const int64_t* sorted, const int64_t* scans, int64_t entries, int64_t num_unique,
                                int64_t num_pieces, optim::KeyLayout layout, int64_t* unique_rows,
                                int64_t* row_first_piece, int64_t* piece_start) {
  const int64_t* row_scan = scans;
  const int64_t* piece_scan = scans + entries;
  ENGRAM_THREAD_STRIDE(i, entries) {
    const bool row_head = i == 0 || row_scan[i] != row_scan[i - 1];
    const bool piece_head = i == 0 || piece_scan[i] != piece_scan[i - 1];
    if (piece_head) piece_start[piece_scan[i] - 1] = i;
    if (row_head) {
      unique_rows[row_scan[i] - 1] = static_cast<int64_t>(layout.row(static_cast<uint64_t>(sorted[i])));
      row_first_piece[row_scan[i] - 1] = piece_scan[i] - 1;
    }
    if (i == 0) {
      piece_start[num_pieces] = entries;
      row_first_piece[num_unique] = num_pieces;
    }
  }
}

// partial[p] = sum of the gradient rows of piece p's entries, in entry order
// (the first copied, as on the CPU).
template <typename scalar_t, typename acc_t>
__global__ void piece_sums_kernel(const scalar_t* grad, int64_t dim, const int64_t* sorted, optim::KeyLayout layout,
                                  const int64_t* piece_start, int64_t num_pieces, acc_t* partial) {
  const int lane = threadIdx.x % kWarp;
  ENGRAM_WARP_STRIDE(p, num_pieces) {
    const int64_t begin = piece_start[p], end = piece_start[p + 1];
    for (int64_t d = lane; d < dim; d += kWarp) {
      acc_t sum = static_cast<acc_t>(grad[static_cast<int64_t>(layout.entry(sorted[begin])) * dim + d]);
      for (int64_t i = begin + 1; i < end; ++i) {
        sum = optim::rn_add(sum, static_cast<acc_t>(grad[static_cast<int64_t>(layout.entry(sorted[i])) * dim + d]));
      }
      partial[p * dim + d] = sum;
    }
  }
}

// row_grads[u] = the sum of row u's pieces, in order.
template <typename scalar_t, typename acc_t>
__global__ void row_sums_kernel(const acc_t* partial, int64_t dim, const int64_t* row_first_piece, int64_t num_unique,
                                scalar_t* row_grads) {
  const int lane = threadIdx.x % kWarp;
  ENGRAM_WARP_STRIDE(u, num_unique) {
    const int64_t first = row_first_piece[u], last = row_first_piece[u + 1];
    for (int64_t d = lane; d < dim; d += kWarp) {
      acc_t sum = partial[first * dim + d];
      for (int64_t p = first + 1; p < last; ++p) sum = optim::rn_add(sum, partial[p * dim + d]);
      row_grads[u * dim + d] = static_cast<scalar_t>(sum);
    }
  }
}

// The update kernels write nothing when *skip is set: the rows' check
// (kernels/update_rows_cuda.cuh) found a bad row and reported it. A row of -1
// (dedup_row_grads_padded's padding, a suffix) is skipped; one warp per row,
// so the whole warp skips it together and no shuffle loses a lane.
template <typename T>
__global__ void sgd_rows_kernel(T* weight, const int64_t* rows, const T* row_grads, int64_t n, int64_t dim,
                                optim::SgdCoeffs<T> c, const int* skip) {
  if (*skip) return;
  const int lane = threadIdx.x % kWarp;
  ENGRAM_WARP_STRIDE(u, n) {
    if (rows[u] < 0) continue;
    T* w = weight + rows[u] * dim;
    const T* g = row_grads + u * dim;
    for (int64_t d = lane; d < dim; d += kWarp) optim::sgd_update(w[d], g[d], c);
  }
}

// device_neg_step_size: when set, replaces c.neg_step_size (the step count
// is on the device: adam_step_size_kernel ran before on the stream).
template <typename T>
__global__ void adam_rows_kernel(T* weight, T* exp_avg, T* exp_avg_sq, const int64_t* rows, const T* row_grads,
                                 int64_t n, int64_t dim, optim::AdamCoeffs<T> c, const int* skip,
                                 const T* device_neg_step_size = nullptr) {
  if (*skip) return;
  if (device_neg_step_size != nullptr) c.neg_step_size = *device_neg_step_size;
  const int lane = threadIdx.x % kWarp;
  ENGRAM_WARP_STRIDE(u, n) {
    if (rows[u] < 0) continue;
    const int64_t base = rows[u] * dim;
    const T* g = row_grads + u * dim;
    for (int64_t d = lane; d < dim; d += kWarp) {
      optim::adam_update(weight[base + d], exp_avg[base + d], exp_avg_sq[base + d], g[d], c);
    }
  }
}

// Lane l sums g^2 over d = l, l + 32, ...; the xor-shuffle tree then gives
// every lane the row's sum, in the order optim::reduce_row_lanes uses.
template <typename T>
__global__ void adagrad_rows_kernel(T* weight, T* sum_sq, const int64_t* rows, const T* row_grads, int64_t n,
                                    int64_t dim, optim::AdagradCoeffs<T> c, const int* skip) {
  if (*skip) return;
  const int lane = threadIdx.x % kWarp;
  ENGRAM_WARP_STRIDE(u, n) {
    const int64_t r = rows[u];
    if (r < 0) continue;
    T* w = weight + r * dim;
    const T* g = row_grads + u * dim;
    T lane_sum = T(0);
    for (int64_t d = lane; d < dim; d += kWarp) {
      const T gd = optim::adagrad_decayed_grad(w[d], g[d], c);
      lane_sum = optim::rn_add(lane_sum, optim::rn_mul(gd, gd));
    }
    for (int offset = kWarp / 2; offset >= 1; offset /= 2) {
      lane_sum = optim::rn_add(lane_sum, __shfl_xor_sync(0xffffffffu, lane_sum, offset));
    }
    T acc = sum_sq[r];
    const T multiplier = optim::adagrad_accumulate(acc, lane_sum, dim, c);
    __syncwarp();  // every lane has read sum_sq[r] before lane 0 writes it
    if (lane == 0) sum_sq[r] = acc;
    for (int64_t d = lane; d < dim; d += kWarp) {
      optim::adagrad_apply(w[d], optim::adagrad_decayed_grad(w[d], g[d], c), multiplier);
    }
  }
}

}  // namespace cuda_optim
}  // namespace engram
