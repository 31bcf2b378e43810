// Torch-free CUDA kernels of the hash and embedding ops. Launchers (guards,
// streams, checks, allocation) live in csrc/cuda/hash_embedding_ops.cu.
#pragma once

#include <cstdint>

#include "kernels/device_error_record.cuh"
#include "kernels/hash.h"

namespace engram {
namespace cuda {

constexpr int kThreads = 256;

// #pragma unroll for nvcc; the host compilers (the SIMT emulator) ignore it.
#if defined(__CUDACC__)
#define ENGRAM_UNROLL _Pragma("unroll")
#else
#define ENGRAM_UNROLL
#endif
constexpr unsigned kFullMask = 0xffffffffu;

inline unsigned blocks_for(int64_t work, int64_t max_blocks = 65535) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

#define ENGRAM_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// ids >= vocab are reported (and read as id 0); negative ids pass through.
__global__ void compress_kernel(const int64_t* ids, int64_t n, const int64_t* lookup, int64_t vocab, int64_t* out,
                                DeviceErrorSlot err) {
  ENGRAM_GRID_STRIDE(i, n) {
    const int64_t id = ids[i];
    if (id >= vocab) {
      report_device_error(err, kIdOutOfRange, i, id, 0, vocab, -1);
      out[i] = 0;
    } else {
      out[i] = id >= 0 ? lookup[id] : id;
    }
  }
}

// The L*K reduction constants of ngram_hash, built on the device so that the
// launcher never reads head_sizes back to the host. A bad size is reported
// and replaced by 1, which keeps the hash kernel free of a division by zero.
// One thread per head and no loop (FastMod::make divides in 64 bits once):
// launch with hash_mods_blocks(count), which covers every head.
inline unsigned hash_mods_blocks(int64_t count) { return blocks_for(count, INT32_MAX); }

__global__ void hash_mods_kernel(const int64_t* head_sizes, const int64_t* offsets, int64_t count, FastMod* mods,
                                 DeviceErrorSlot err) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < count) {
    int64_t size = head_sizes[i];
    if (size < 1) {
      report_device_error(err, kHeadSizeInvalid, i, size, 0, 1, -1);
      size = 1;
    } else if (offsets && offsets[i] > INT64_MAX - (size - 1)) {
      report_device_error(err, kHeadOffsetOverflow, i, offsets[i], size, 0, -1);
    }
    mods[i] = FastMod::make(static_cast<uint64_t>(size));
  }
}

struct HashArgs {
  const int64_t* canonical;  // [B, T]
  const int64_t* lookup;     // the pad id's canonical id is lookup[pad_id]
  int64_t batch, seq_len, pad_id;
  int num_layers, max_ngram_size, heads_per_order, num_heads;
  bool xxh64;
  const int64_t* keys;     // [L, N] multipliers or [L, N-1] seeds
  const FastMod* mods;     // [L, K]
  const int64_t* offsets;  // [L, K] or null
  int64_t* out;            // [L, B, T, K]
};

// u / d and u % d over the hash kernel's index type: the hardware's 32-bit
// division, or for 64-bit indices FastMod's multiply-high (a 64-bit / or % is
// a ~20-instruction slow-path call per use); built once per thread.
template <typename index_t>
struct IndexDivider;

template <>
struct IndexDivider<uint32_t> {
  uint32_t d;
  __device__ explicit IndexDivider(uint32_t divisor) : d(divisor) {}
  __device__ uint32_t div(uint32_t u, uint32_t* rem) const {
    *rem = u % d;
    return u / d;
  }
};

template <>
struct IndexDivider<uint64_t> {
  FastMod m;
  __device__ explicit IndexDivider(uint64_t divisor) : m(FastMod::make(divisor)) {}
  __device__ uint64_t div(uint64_t u, uint64_t* rem) const { return m.div_u64(u, rem); }
};

// One thread per output id (layer l, token i, head k), in the output's order
// [L, B, T, K]: adjacent threads write adjacent ids, so every warp's stores
// are contiguous. An order's few multiply-xor steps (or its XXH64) are
// recomputed by each of its H heads instead of shared; the hash is bound by
// the stores, not by that arithmetic. index_t is uint32_t when L*B*T*K fits
// (the hardware's 32-bit division), else uint64_t (IndexDivider: FastMod).
template <typename index_t>
__global__ void ngram_hash_kernel(HashArgs a) {
  const index_t tokens = static_cast<index_t>(a.batch * a.seq_len);
  const index_t K = static_cast<index_t>(a.num_heads), H = static_cast<index_t>(a.heads_per_order);
  const index_t seq_len = static_cast<index_t>(a.seq_len);
  const int N = a.max_ngram_size;
  const int64_t total = static_cast<int64_t>(a.num_layers) * a.batch * a.seq_len * a.num_heads;
  const IndexDivider<index_t> by_heads(K), by_tokens(tokens), by_seq_len(seq_len);
  ENGRAM_GRID_STRIDE(idx64, total) {
    const index_t idx = static_cast<index_t>(idx64);
    index_t k, i, t;
    const index_t layer_token = by_heads.div(idx, &k);
    const index_t l = by_tokens.div(layer_token, &i);
    by_seq_len.div(i, &t);
    // k < K, an int: this head's n-gram order in 32 bits
    const int n = 2 + static_cast<int>(static_cast<uint32_t>(k) / static_cast<uint32_t>(H));
    const int64_t pad = a.lookup[a.pad_id];
    int64_t window[kMaxNgramSize];
    for (int j = 0; j < n; ++j) window[j] = t >= static_cast<index_t>(j) ? a.canonical[i - j] : pad;
    const FastMod& mod = a.mods[l * K + k];
    int64_t h;
    if (a.xxh64) {
      const uint64_t* seeds = reinterpret_cast<const uint64_t*>(a.keys) + l * (N - 1);
      h = static_cast<int64_t>(mod.mod_u64(xxh64_words(window, n, seeds[n - 2])));
    } else {
      const int64_t* multipliers = a.keys + l * N;
      uint64_t mix = deepseek_mix_step(0, window[0], multipliers[0]);
      for (int j = 1; j < n; ++j) mix = deepseek_mix_step(mix, window[j], multipliers[j]);
      h = static_cast<int64_t>(mod.floor_mod_i64(static_cast<int64_t>(mix)));
    }
    a.out[idx64] = a.offsets ? h + a.offsets[l * K + k] : h;
  }
}

// The row of entry e, or -1 (out of range) when id + offset overflows: two
// negative values could otherwise wrap into a valid row. k is the entry's
// head, e % K, which the kernels find in 32 bits (entries < 2^31).
__device__ __forceinline__ int64_t table_row_of_head(const int64_t* ids, const int64_t* offsets, int64_t e,
                                                     int64_t k) {
  if (!offsets) return ids[e];
  const int64_t a = ids[e], b = offsets[k];
  const int64_t sum = static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
  return ((a ^ sum) & (b ^ sum)) < 0 ? -1 : sum;
}


// Entry e's id is outside the table (table_row_of_head gave a row outside [0, num_rows)).
// k is the entry's head, e % K.
__device__ __forceinline__ void report_bad_row_of_head(const DeviceErrorSlot& err, const int64_t* ids,
                                                       const int64_t* offsets, int64_t e, int64_t k,
                                                       int64_t num_rows) {
  const int64_t id = ids[e];
  if (!offsets) {
    report_device_error(err, kIdOutOfRange, e, id, 0, num_rows, -1);
    return;
  }
  const int64_t offset = offsets[k];
  const int64_t sum = static_cast<int64_t>(static_cast<uint64_t>(id) + static_cast<uint64_t>(offset));
  if (((id ^ sum) & (offset ^ sum)) < 0) {
    report_device_error(err, kIdOffsetOverflow, e, id, offset, num_rows, k);
  } else {
    report_device_error(err, kIdOutOfRange, e, sum, 0, num_rows, k);
  }
}


// Block shape of the warp-per-item kernels (the gather, the scatter, the
// run sums): kGatherLanes threads (a warp, threadIdx.x) per item and
// kGatherEntries warps per block (threadIdx.y); the grid's y covers the items.
constexpr int kGatherLanes = 32, kGatherEntries = kThreads / kGatherLanes;

inline unsigned gather_blocks(int64_t items, int64_t max_blocks = 65535) {
  const int64_t b = (items + kGatherEntries - 1) / kGatherEntries;
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

// gather_rows_kernel: a warp per group of kGatherGroup consecutive entries,
// each lane copying kGatherUnroll chunks per step (their loads in flight
// together).
constexpr int kGatherGroup = 32, kGatherUnroll = 4;

inline unsigned gather_group_blocks(int64_t entries, int64_t max_blocks = 65535) {
  return gather_blocks((entries + kGatherGroup - 1) / kGatherGroup, max_blocks);
}

// out[e, :] = weight[row(e), :], launched as
// <<<dim3(1, gather_group_blocks(entries)), dim3(kGatherLanes, kGatherEntries)>>>
// (the launcher checks entries < 2^31). A warp takes 32 entries at a time:
// lane l finds the row of entry base + l (its id, offset and head: loaded by
// every lane at once, in 32-bit math), reports it if bad (once) and reads it
// as zeros. The group's output is count * chunks_per_row contiguous chunks;
// lane l copies chunks f = l, l + 32, ..., kGatherUnroll per step, the row
// of f's entry coming by shuffle, and (entry, chunk) of f stepped, not
// divided. So short rows keep every lane busy (a 64-byte row: 8 entries per
// warp step) and long ones have several loads per lane in flight. The copy is
// of bytes: chunk_t is a plain word of the element's size, or uint4 (16
// bytes) when rows allow it.
template <typename chunk_t>
__global__ void gather_rows_kernel(const chunk_t* weight, int64_t num_rows, int64_t chunks_per_row,
                                   const int64_t* ids, const int64_t* offsets, int64_t K, int64_t entries,
                                   chunk_t* out, DeviceErrorSlot err) {
  const uint32_t n = static_cast<uint32_t>(entries), heads = static_cast<uint32_t>(K);
  const uint32_t groups = (n + kGatherGroup - 1) / kGatherGroup;
  const unsigned lane = threadIdx.x;
  const int64_t cpr = chunks_per_row;
  // Lane l's first chunk f = l is (entry l / cpr, chunk l % cpr); a step of
  // 32 chunks moves (32 / cpr, 32 % cpr) further, with a carry.
  uint32_t first_entry = 0, step_entries = 0;
  int64_t first_chunk = lane, step_chunks = kGatherLanes;
  if (cpr > 0 && cpr <= kGatherLanes) {
    const uint32_t c32 = static_cast<uint32_t>(cpr);
    first_entry = lane / c32;
    first_chunk = lane % c32;
    step_entries = kGatherLanes / c32;
    step_chunks = kGatherLanes % c32;
  }
  for (uint32_t g = blockIdx.y * blockDim.y + threadIdx.y; g < groups; g += gridDim.y * blockDim.y) {
    const uint32_t base = g * kGatherGroup;
    const uint32_t count = n - base < kGatherGroup ? n - base : kGatherGroup;
    int64_t row = -1;  // the row of entry base + lane; -1: none, or bad (zeros)
    if (lane < count) {
      const uint32_t e = base + lane;
      const uint32_t k = offsets ? e % heads : 0;
      row = table_row_of_head(ids, offsets, e, k);
      if (row < 0 || row >= num_rows) {
        report_bad_row_of_head(err, ids, offsets, e, k, num_rows);
        row = -1;
      }
    }
    chunk_t* group_out = out + int64_t(base) * cpr;
    const int64_t total = int64_t(count) * cpr;
    uint32_t i = first_entry;
    int64_t c = first_chunk;
    for (int64_t f0 = 0; f0 < total; f0 += int64_t(kGatherLanes) * kGatherUnroll) {  // warp-uniform
      chunk_t v[kGatherUnroll];
ENGRAM_UNROLL
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t r = __shfl_sync(kFullMask, row, static_cast<int>(i % kGatherGroup));
        const bool live = f0 + u * kGatherLanes + lane < total;
        v[u] = live && r >= 0 ? weight[r * cpr + c] : chunk_t{};
        i += step_entries;
        c += step_chunks;
        if (c >= cpr) c -= cpr, ++i;
      }
ENGRAM_UNROLL
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t f = f0 + u * kGatherLanes + lane;
        if (f < total) group_out[f] = v[u];
      }
    }
  }
}

// acc[row(e), :] += grad[e, :] in opmath precision (atomic: rows repeat);
// the gather's launch shape and row lookup: a warp per entry, lanes over d.
template <typename scalar_t, typename acc_t>
__global__ void scatter_add_rows_kernel(const scalar_t* grad, int64_t num_rows, int64_t dh, const int64_t* ids,
                                        const int64_t* offsets, int64_t K, int64_t entries, acc_t* acc,
                                        DeviceErrorSlot err) {
  const uint32_t n = static_cast<uint32_t>(entries), heads = static_cast<uint32_t>(K);
  for (uint32_t e = blockIdx.y * blockDim.y + threadIdx.y; e < n; e += gridDim.y * blockDim.y) {
    const uint32_t k = offsets ? e % heads : 0;
    const int64_t row = table_row_of_head(ids, offsets, e, k);
    if (row < 0 || row >= num_rows) {
      if (threadIdx.x == 0) report_bad_row_of_head(err, ids, offsets, e, k, num_rows);
      continue;
    }
    const scalar_t* src = grad + int64_t(e) * dh;
    acc_t* dst = acc + row * dh;
    for (int64_t d = threadIdx.x; d < dh; d += blockDim.x) atomicAdd(dst + d, static_cast<acc_t>(src[d]));
  }
}

// Dense gradient of a 16-bit table without a float32 copy of the table (which
// costs more memory traffic than the gradient itself): rows[e] = row(e), or
// -1 for an entry outside the table (reported); the launcher then sorts rows
// (stable) and sum_sorted_runs_kernel writes each row once.
__global__ void entry_rows_kernel(const int64_t* ids, const int64_t* offsets, int64_t K, int64_t entries,
                                  int64_t num_rows, int64_t* rows, DeviceErrorSlot err) {
  const uint32_t heads = static_cast<uint32_t>(K);  // the launcher checks entries < 2^31
  ENGRAM_GRID_STRIDE(e, entries) {
    const uint32_t k = offsets ? static_cast<uint32_t>(e) % heads : 0;
    const int64_t row = table_row_of_head(ids, offsets, e, k);
    if (row < 0 || row >= num_rows) {
      report_bad_row_of_head(err, ids, offsets, e, k, num_rows);
      rows[e] = -1;
    } else {
      rows[e] = row;
    }
  }
}

// The dense gradient of a 16-bit table: out[row, d] = the sum of
// grad[order[q], d] over the run of positions q with sorted_rows[q] == row
// (a stable sort, so a run is in entry order), in acc_t; out starts zeroed and
// rows < 0 (bad entries) are skipped. A run can be long (the pad row's grows
// with every pad token), so the positions are cut into fixed pieces of
// kRunPiece, one warp each, and two kernels sum them:
//   sorted_run_pieces_kernel: each run that starts in a piece and ends in it
//     is summed there (in order) and written; the piece's last run, if it
//     goes on into the next piece, is summed over its positions in this piece
//     into partial[piece].
//   sorted_run_totals_kernel: the warp of a run's last piece adds, in order,
//     partial[first piece], the partials of the whole pieces between, then
//     its own positions one by one, and writes the row.
// So each row's sum has a fixed order (deterministic for any schedule, no
// atomics); a run within at most two pieces is the CPU's plain entry-order
// sum, bit for bit. No division: pieces are 32 positions (shifts), and no
// host sync: partial is [pieces, dh] with pieces = ceil(entries / 32).
// Launch both as <<<dim3(1, gather_blocks(pieces)), dim3(kGatherLanes,
// kGatherEntries)>>>: a warp (threadIdx.y) per piece, its lanes over d; the
// launcher checks entries < 2^31.
constexpr int kRunPiece = 32;  // = the warp: lane l holds position piece * 32 + l
constexpr int kPartialBatch = 8;  // partials loaded at once by the totals kernel

ENGRAM_HD int64_t run_pieces(int64_t entries) { return (entries + kRunPiece - 1) / kRunPiece; }

// The lowest set bit of a nonzero lane mask.
__device__ __forceinline__ unsigned lowest_lane(unsigned mask) {
#if defined(__CUDA_ARCH__)
  return static_cast<unsigned>(__ffs(static_cast<int>(mask)) - 1);
#else
  return static_cast<unsigned>(__builtin_ctz(mask));
#endif
}

// Position base + lane of a piece: its row (-2 past the end: no run), its
// order entry, and whether it is its run's first or last position.
struct RunLane {
  int64_t row;
  int64_t entry;
  bool first, last;
};

__device__ __forceinline__ RunLane run_lane(const int64_t* sorted_rows, const int64_t* order, uint32_t n,
                                            uint32_t base, unsigned lane) {
  const uint32_t p = base + lane;
  RunLane r;
  r.row = p < n ? sorted_rows[p] : -2;
  r.entry = p < n ? order[p] : 0;
  int64_t before = __shfl_up_sync(kFullMask, r.row, 1);
  int64_t after = __shfl_down_sync(kFullMask, r.row, 1);
  if (lane == 0) before = base > 0 ? sorted_rows[base - 1] : -2;
  if (lane == kRunPiece - 1) after = p + 1 < n ? sorted_rows[p + 1] : -2;
  r.first = r.row >= 0 && before != r.row;
  r.last = r.row >= 0 && after != r.row;
  return r;
}

// Adds grad[entry(q), d] for the piece's positions q = a..b, in order, to
// sum; every lane takes part (the entries come by shuffle), d < dh or not.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t add_positions(acc_t sum, const scalar_t* grad, int64_t dh, int64_t d,
                                               int64_t entry, unsigned a, unsigned b) {
  for (unsigned q = a; q <= b; ++q) {
    const int64_t e = __shfl_sync(kFullMask, entry, static_cast<int>(q));
    if (d < dh) sum += static_cast<acc_t>(grad[e * dh + d]);
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
__global__ void sorted_run_pieces_kernel(const scalar_t* grad, int64_t dh, const int64_t* sorted_rows,
                                         const int64_t* order, int64_t entries, scalar_t* out, acc_t* partial) {
  const uint32_t n = static_cast<uint32_t>(entries), pieces = static_cast<uint32_t>(run_pieces(entries));
  const unsigned lane = threadIdx.x;
  for (uint32_t j = blockIdx.y * blockDim.y + threadIdx.y; j < pieces; j += gridDim.y * blockDim.y) {
    const RunLane me = run_lane(sorted_rows, order, n, j * kRunPiece, lane);
    const unsigned firsts = __ballot_sync(kFullMask, me.first);
    const unsigned lasts = __ballot_sync(kFullMask, me.last);
    const unsigned valid = __ballot_sync(kFullMask, me.row >= 0);
    // The runs in the piece, by their first lane here: lane 0 too when it
    // goes on a run from the piece before (summed here only if the run also
    // goes on past this piece: otherwise the totals kernel sums it).
    unsigned starts = firsts | (valid & ~firsts & 1u);
    while (starts != 0) {  // warp-uniform: ballots
      const unsigned a = lowest_lane(starts);
      starts &= starts - 1;
      const unsigned ends = lasts >> a;
      const bool goes_on = ends == 0;  // past the piece's end
      if (!(firsts >> a & 1u) && !goes_on) continue;
      const unsigned b = goes_on ? kRunPiece - 1 : a + lowest_lane(ends);
      const int64_t row = __shfl_sync(kFullMask, me.row, static_cast<int>(a));
      for (int64_t d0 = 0; d0 < dh; d0 += kRunPiece) {
        const int64_t d = d0 + lane;
        const acc_t sum = add_positions<scalar_t, acc_t>(acc_t(0), grad, dh, d, me.entry, a, b);
        if (d >= dh) continue;
        if (goes_on) {
          partial[int64_t(j) * dh + d] = sum;
        } else {
          out[row * dh + d] = static_cast<scalar_t>(sum);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sorted_run_totals_kernel(const scalar_t* grad, int64_t dh, const int64_t* sorted_rows,
                                         const int64_t* order, int64_t entries, const acc_t* partial,
                                         scalar_t* out) {
  const uint32_t n = static_cast<uint32_t>(entries), pieces = static_cast<uint32_t>(run_pieces(entries));
  const unsigned lane = threadIdx.x;
  for (uint32_t j = blockIdx.y * blockDim.y + threadIdx.y; j < pieces; j += gridDim.y * blockDim.y) {
    const RunLane me = run_lane(sorted_rows, order, n, j * kRunPiece, lane);
    const unsigned lasts = __ballot_sync(kFullMask, me.last);
    // Only a run that came from an earlier piece and ends in this one.
    const bool from_before = __shfl_sync(kFullMask, static_cast<int>(me.row >= 0 && !me.first), 0) != 0;
    if (!from_before || lasts == 0) continue;
    const unsigned b = lowest_lane(lasts);
    const int64_t row = __shfl_sync(kFullMask, me.row, 0);
    // The run's first position: the first q < j * 32 with sorted_rows[q] == row.
    uint32_t lo = 0, hi = j * kRunPiece;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (sorted_rows[mid] < row) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const uint32_t first_piece = lo / kRunPiece;
    for (int64_t d0 = 0; d0 < dh; d0 += kRunPiece) {
      const int64_t d = d0 + lane;
      acc_t sum = 0;
      if (d < dh) {
        // The pad row's run has thousands of pieces: their loads go out 8 at
        // a time, the adds stay in piece order.
        const acc_t* column = partial + d;
        sum = column[int64_t(first_piece) * dh];
        uint32_t k = first_piece + 1;
        for (; k + kPartialBatch <= j; k += kPartialBatch) {
          acc_t batch[kPartialBatch];
          ENGRAM_UNROLL
          for (int u = 0; u < kPartialBatch; ++u) batch[u] = column[int64_t(k + u) * dh];
          ENGRAM_UNROLL
          for (int u = 0; u < kPartialBatch; ++u) sum += batch[u];
        }
        for (; k < j; ++k) sum += column[int64_t(k) * dh];
      }
      sum = add_positions<scalar_t, acc_t>(sum, grad, dh, d, me.entry, 0, b);
      if (d < dh) out[row * dh + d] = static_cast<scalar_t>(sum);
    }
  }
}

}  // namespace cuda
}  // namespace engram
