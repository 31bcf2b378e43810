// Torch-free CUDA kernels of the Engram layer ops (spec §5-6): the context
// gate and the gated short-convolution block, forward and backward. The
// launchers (checks, guard, stream, allocation) are in csrc/cuda/layer_ops.cu;
// the per-row formulas are kernels/layer_math.h, shared with the CPU kernels.
//
// Design (the GoogleTest tests/cpp/test_layer_cuda_mock.cpp runs these
// kernels on the CPU in the SIMT emulator tests/cpp/simt.h, at the launchers'
// shapes):
// - every kernel is a grid-stride loop, without shared memory or
//   __syncthreads;
// - a reduction over the D values of a row is done by kRowLanes lanes: lane j
//   takes d = j, j + kRowLanes, ... (coalesced) and lane_sum adds the lanes'
//   partial sums with warp shuffles. kRowLanes is a warp under nvcc and in
//   the emulator, 1 in plain C++, where lane_sum is the identity;
// - sums over all B*T tokens (weight gradients) are deterministic: stage 1
//   sums fixed chunks of tokens in token order, one thread per (chunk,
//   element), into an acc_t scratch [chunks, n]; stage 2 adds the chunks in
//   order, one thread per element. No atomics.
// - nothing reads device memory on the host: the launchers can be captured in
//   a CUDA graph.
#pragma once

#include <cstdint>

#include "kernels/layer_math.h"

namespace engram {
namespace cuda_layer {

constexpr int kThreads = 256;

#if defined(__CUDACC__) || defined(ENGRAM_SIMT_EMULATOR)
constexpr int kRowLanes = 32;  // one warp per row; kThreads is a multiple of it
#else
constexpr int kRowLanes = 1;
#endif

// Tokens per stage-1 chunk of the weight-gradient sums: a function of nothing
// but this constant, so the summation order (and the bits) depend on the
// shape only, never on the GPU.
constexpr int64_t kTokensPerChunk = 64;

inline int64_t chunk_count(int64_t tokens, int64_t tokens_per_chunk) {
  return (tokens + tokens_per_chunk - 1) / tokens_per_chunk;
}

inline unsigned blocks_for(int64_t threads, int64_t max_blocks = 65535) {
  const int64_t b = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

// Same text as in kernels/cuda_kernels.cuh, so both headers may be included.
#define ENGRAM_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// The (token, d) kernels of the short convolution run a 2-D grid: x covers d
// in [0, D) (kThreads per block, contiguous), y the tokens, both grid-stride,
// in 32-bit indices (the launcher checks that tokens and C fit in int32).
// Nothing is divided per element: a token's position and value row are found
// once per token, and the branch g is a loop inside each thread.
inline unsigned token_blocks(int64_t tokens, int64_t max_blocks = 65535) {
  return static_cast<unsigned>(tokens < 1 ? 1 : (tokens > max_blocks ? max_blocks : tokens));
}
#define ENGRAM_TOKEN_STRIDE(tok, n) for (uint32_t tok = blockIdx.y; tok < (n); tok += gridDim.y)
#define ENGRAM_CHANNEL_STRIDE(d, n) \
  for (uint32_t d = blockIdx.x * blockDim.x + threadIdx.x; d < (n); d += gridDim.x * blockDim.x)

// kRowLanes consecutive threads per row, grid-stride: the loop bound is the
// same for every lane of a warp, so all of them take part in each lane_sum.
#define ENGRAM_ROW_STRIDE(row, n)                                                                \
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kRowLanes; row < (n); \
       row += int64_t(gridDim.x) * blockDim.x / kRowLanes)

__device__ __forceinline__ int row_lane() { return static_cast<int>(threadIdx.x % kRowLanes); }

// The sum of v over the kRowLanes lanes of a row, in every lane.
template <typename T>
__device__ __forceinline__ T lane_sum(T v) {
#if defined(__CUDACC__) || defined(ENGRAM_SIMT_EMULATOR)
  for (int offset = kRowLanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
#endif
  return v;
}

// ---------------------------------------------------------------------------
// Stage 2 of the weight-gradient sums
// ---------------------------------------------------------------------------

// out[i] = sum over chunks of partial[chunk, i], in chunk order.
template <typename acc_t, typename out_t>
__global__ void sum_chunks_kernel(const acc_t* partial, int64_t chunks, int64_t n, out_t* out) {
  ENGRAM_GRID_STRIDE(i, n) {
    acc_t sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * n + i];
    out[i] = static_cast<out_t>(sum);
  }
}

// ---------------------------------------------------------------------------
// Context gate, spec §5 (rows r = (b, t, g) of D values)
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct GateArgs {
  Rows4<scalar_t> keys, queries;
  const scalar_t* key_weight;    // [G, D]
  const scalar_t* query_weight;  // [G, D]
  int64_t rows, G, D;
};

// The row state of row r, in every lane.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ GateRowState<acc_t> gate_row_state_lanes(const GateArgs<scalar_t>& a, int64_t r,
                                                                    acc_t eps) {
  const scalar_t* key = a.keys.row32(r);
  const scalar_t* query = a.queries.row32(r);
  const int64_t g = static_cast<uint32_t>(r) % static_cast<uint32_t>(a.G);
  const scalar_t* wk = a.key_weight + g * a.D;
  const scalar_t* wq = a.query_weight + g * a.D;
  acc_t kk = 0, qq = 0, kq = 0;
  for (int64_t d = row_lane(); d < a.D; d += kRowLanes) {
    const acc_t k = static_cast<acc_t>(key[d]), q = static_cast<acc_t>(query[d]);
    kk += k * k;
    qq += q * q;
    kq += k * static_cast<acc_t>(wk[d]) * q * static_cast<acc_t>(wq[d]);
  }
  return gate_row_state_from_sums(lane_sum(kk), lane_sum(qq), lane_sum(kq), a.D, eps);
}

// gate [rows]; kRowLanes threads per row.
template <typename scalar_t, typename acc_t>
__global__ void context_gate_kernel(GateArgs<scalar_t> a, acc_t eps, scalar_t* gate) {
  ENGRAM_ROW_STRIDE(r, a.rows) {
    const GateRowState<acc_t> st = gate_row_state_lanes<acc_t>(a, r, eps);
    if (row_lane() == 0) gate[r] = static_cast<scalar_t>(gate_from_score(st.score));
  }
}

// Per-row statistics the weight gradients need, kGateStats acc_t per row.
constexpr int kGateStats = 3;  // grad_dot, key_scale, query_scale

// grad_key, grad_query [rows, D] (contiguous) and stats [rows, kGateStats];
// kRowLanes threads per row. Formulas of gate_row_backward (layer_math.h).
template <typename scalar_t, typename acc_t>
__global__ void context_gate_backward_rows_kernel(GateArgs<scalar_t> a, const scalar_t* grad_gate, acc_t eps,
                                                  scalar_t* grad_key, scalar_t* grad_query, acc_t* stats) {
  ENGRAM_ROW_STRIDE(r, a.rows) {
    const GateRowState<acc_t> st = gate_row_state_lanes<acc_t>(a, r, eps);
    const acc_t grad_dot = gate_grad_dot(static_cast<acc_t>(grad_gate[r]), st.score, a.D);
    const acc_t dot_over_d = st.dot / static_cast<acc_t>(a.D);
    const acc_t rk = st.key_scale, rq = st.query_scale;
    const scalar_t* key = a.keys.row32(r);
    const scalar_t* query = a.queries.row32(r);
    const int64_t g = static_cast<uint32_t>(r) % static_cast<uint32_t>(a.G);
    const scalar_t* wk_row = a.key_weight + g * a.D;
    const scalar_t* wq_row = a.query_weight + g * a.D;
    for (int64_t d = row_lane(); d < a.D; d += kRowLanes) {
      const acc_t k_hat = static_cast<acc_t>(key[d]) * rk, q_hat = static_cast<acc_t>(query[d]) * rq;
      const acc_t wk = static_cast<acc_t>(wk_row[d]), wq = static_cast<acc_t>(wq_row[d]);
      grad_key[r * a.D + d] = static_cast<scalar_t>(rk * grad_dot * (wk * (q_hat * wq) - k_hat * dot_over_d));
      grad_query[r * a.D + d] = static_cast<scalar_t>(rq * grad_dot * (wq * (k_hat * wk) - q_hat * dot_over_d));
    }
    if (row_lane() == 0) {
      stats[r * kGateStats + 0] = grad_dot;
      stats[r * kGateStats + 1] = rk;
      stats[r * kGateStats + 2] = rq;
    }
  }
}

// Stage 1 of the norm weight gradients: partial [chunks, 2, G, D] with
//   [0] d w_k = sum grad_dot * nq * k_hat,  [1] d w_q = sum grad_dot * nk * q_hat
// over the tokens of each chunk; one thread per (chunk, element) on a 3-D
// grid: x over gd in [0, G * D), y over chunks, z over the two sides. gd
// splits into (g, d) once per thread, in 32 bits (gate_args checks the sizes).
template <typename scalar_t, typename acc_t>
__global__ void context_gate_weight_partials_kernel(GateArgs<scalar_t> a, const acc_t* stats, int64_t tokens,
                                                    int64_t tokens_per_chunk, int64_t chunks, acc_t* partial) {
  const uint32_t GD = static_cast<uint32_t>(a.G * a.D), D = static_cast<uint32_t>(a.D);
  const bool query_side = blockIdx.z == 1;
  for (uint32_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t first = int64_t(chunk) * tokens_per_chunk;
    const int64_t last = first + tokens_per_chunk < tokens ? first + tokens_per_chunk : tokens;
    ENGRAM_CHANNEL_STRIDE(gd, GD) {
      const uint32_t g = gd / D, d = gd - g * D;
      const acc_t wk = static_cast<acc_t>(a.key_weight[gd]), wq = static_cast<acc_t>(a.query_weight[gd]);
      acc_t sum = 0;
      for (int64_t tok = first; tok < last; ++tok) {
        const int64_t r = tok * a.G + g;
        const acc_t grad_dot = stats[r * kGateStats + 0];
        const acc_t k_hat = static_cast<acc_t>(a.keys.row32(r)[d]) * stats[r * kGateStats + 1];
        const acc_t q_hat = static_cast<acc_t>(a.queries.row32(r)[d]) * stats[r * kGateStats + 2];
        sum += query_side ? grad_dot * (k_hat * wk) * q_hat : grad_dot * (q_hat * wq) * k_hat;
      }
      partial[(int64_t(chunk) * 2 + blockIdx.z) * GD + gd] = sum;
    }
  }
}

// ---------------------------------------------------------------------------
// Gated short convolution, spec §5-6 (tokens of C = G * D channels)
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct ShortConvArgs {
  const scalar_t* value;  // [B, T, D], row strides below, last dim contiguous
  int64_t value_stride_b, value_stride_t;
  const scalar_t* gate;         // [tokens, G]
  const scalar_t* norm_weight;  // [G, D]
  const scalar_t* conv_weight;  // [C, kernel_size]
  int64_t B, T, G, D, C, kernel_size, dilation;  // dilation clamped to <= T

  ENGRAM_HD int64_t tokens() const { return B * T; }
  ENGRAM_HD const scalar_t* value_row(int64_t tok) const {
    uint32_t t;
    return value_row32(static_cast<uint32_t>(tok), t);
  }
  // The value row of token tok and its position t in its sequence, in 32-bit
  // division (the launcher checks that B * T * G fits in int32).
  ENGRAM_HD const scalar_t* value_row32(uint32_t tok, uint32_t& t) const {
    const uint32_t b = tok / static_cast<uint32_t>(T);
    t = tok - b * static_cast<uint32_t>(T);
    return value + b * value_stride_b + t * value_stride_t;
  }
};

// scales [tokens, G] = 1 / rms(gate * value) per branch; kRowLanes threads
// per token (one sum of squares serves all branches).
template <typename scalar_t, typename acc_t>
__global__ void gated_rms_scales_kernel(ShortConvArgs<scalar_t> a, acc_t eps, acc_t* scales) {
  ENGRAM_ROW_STRIDE(tok, a.tokens()) {
    const scalar_t* v = a.value_row(tok);
    acc_t sum_sq = 0;
    for (int64_t d = row_lane(); d < a.D; d += kRowLanes) {
      const acc_t x = static_cast<acc_t>(v[d]);
      sum_sq += x * x;
    }
    sum_sq = lane_sum(sum_sq);
    if (row_lane() == 0) {
      for (int64_t g = 0; g < a.G; ++g) {
        scales[tok * a.G + g] = gated_rms_scale(static_cast<acc_t>(a.gate[tok * a.G + g]), sum_sq, a.D, eps);
      }
    }
  }
}

// y at (token tok, branch g, d), from the token's position t and value row v
// (value_row32): tap i reads row tok - lag_i, lag_i rows of value above v.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t causal_conv_row(const ShortConvArgs<scalar_t>& a, const acc_t* scales, uint32_t tok,
                                                 uint32_t t, const scalar_t* v, uint32_t g, uint32_t d) {
  const int64_t c = int64_t(g) * a.D + d;
  const acc_t w = static_cast<acc_t>(a.norm_weight[c]);
  acc_t y = 0;
  for (int64_t i = 0; i < a.kernel_size; ++i) {
    const int64_t lag = conv_tap_lag(i, a.kernel_size, a.dilation);
    if (t < lag) continue;
    const int64_t r = (int64_t(tok) - lag) * a.G + g;
    const acc_t u = static_cast<acc_t>(v[d - lag * a.value_stride_t]) *
                    (static_cast<acc_t>(a.gate[r]) * scales[r]) * w;
    y += static_cast<acc_t>(a.conv_weight[c * a.kernel_size + i]) * u;
  }
  return y;
}

// out [tokens, C] = gate * value + SiLU(y); one thread per (token, d), all G
// branches (the 2-D grid above).
template <typename scalar_t, typename acc_t>
__global__ void gated_short_conv_kernel(ShortConvArgs<scalar_t> a, const acc_t* scales, scalar_t* out) {
  const uint32_t tokens = static_cast<uint32_t>(a.tokens()), D = static_cast<uint32_t>(a.D);
  const uint32_t G = static_cast<uint32_t>(a.G);
  ENGRAM_TOKEN_STRIDE(tok, tokens) {
    uint32_t t;
    const scalar_t* v = a.value_row32(tok, t);
    scalar_t* out_row = out + int64_t(tok) * a.C;
    ENGRAM_CHANNEL_STRIDE(d, D) {
      const acc_t vd = static_cast<acc_t>(v[d]);
      for (uint32_t g = 0; g < G; ++g) {
        const acc_t y = causal_conv_row(a, scales, tok, t, v, g, d);
        const acc_t gate = static_cast<acc_t>(a.gate[int64_t(tok) * G + g]);
        out_row[g * D + d] = static_cast<scalar_t>(gate * vd + silu_from_sigmoid(y, sigmoid(y)));
      }
    }
  }
}

// dy [tokens, C] = grad_out * SiLU'(y); one thread per (token, d), all G
// branches (the 2-D grid above).
template <typename scalar_t, typename acc_t>
__global__ void short_conv_grad_y_kernel(ShortConvArgs<scalar_t> a, const acc_t* scales, const scalar_t* grad_out,
                                         acc_t* dy) {
  const uint32_t tokens = static_cast<uint32_t>(a.tokens()), D = static_cast<uint32_t>(a.D);
  const uint32_t G = static_cast<uint32_t>(a.G);
  ENGRAM_TOKEN_STRIDE(tok, tokens) {
    uint32_t t;
    const scalar_t* v = a.value_row32(tok, t);
    const int64_t base = int64_t(tok) * a.C;
    ENGRAM_CHANNEL_STRIDE(d, D) {
      for (uint32_t g = 0; g < G; ++g) {
        const acc_t y = causal_conv_row(a, scales, tok, t, v, g, d);
        const int64_t e = base + g * D + d;
        dy[e] = static_cast<acc_t>(grad_out[e]) * silu_grad_from_sigmoid(y, sigmoid(y));
      }
    }
  }
}

// du [tokens, C] = sum_i w[c, i] * dy[t + lag_i, c] (within the sequence);
// one thread per (token, d), all G branches (the 2-D grid above).
template <typename scalar_t, typename acc_t>
__global__ void short_conv_grad_u_kernel(ShortConvArgs<scalar_t> a, const acc_t* dy, acc_t* du) {
  const uint32_t tokens = static_cast<uint32_t>(a.tokens()), D = static_cast<uint32_t>(a.D);
  const uint32_t G = static_cast<uint32_t>(a.G), T = static_cast<uint32_t>(a.T);
  ENGRAM_TOKEN_STRIDE(tok, tokens) {
    const uint32_t t = tok % T;
    const int64_t base = int64_t(tok) * a.C;
    ENGRAM_CHANNEL_STRIDE(d, D) {
      for (uint32_t g = 0; g < G; ++g) {
        const int64_t c = int64_t(g) * D + d, i = base + c;
        acc_t sum = 0;
        for (int64_t k = 0; k < a.kernel_size; ++k) {
          const int64_t lag = conv_tap_lag(k, a.kernel_size, a.dilation);
          if (t + lag >= a.T) continue;
          sum += static_cast<acc_t>(a.conv_weight[c * a.kernel_size + k]) * dy[i + lag * a.C];
        }
        du[i] = sum;
      }
    }
  }
}

// The RMSNorm and gating backward of each (token, branch) row r = tok * G + g
// (gated_norm_row_backward of layer_math.h, without the sums over branches
// and tokens): grad_gate [rows] and projection [rows] = mean(dx_hat * x_hat),
// which short_conv_grad_value_kernel reuses; kRowLanes threads per row.
template <typename scalar_t, typename acc_t>
__global__ void short_conv_norm_rows_kernel(ShortConvArgs<scalar_t> a, const acc_t* scales, const acc_t* du,
                                            const scalar_t* grad_out, scalar_t* grad_gate, acc_t* projection) {
  ENGRAM_ROW_STRIDE(r, a.tokens() * a.G) {
    const uint32_t tok = static_cast<uint32_t>(r) / static_cast<uint32_t>(a.G);
    const int64_t g = r - int64_t(tok) * a.G;
    const scalar_t* v = a.value_row(tok);
    const scalar_t* w = a.norm_weight + g * a.D;
    const acc_t* du_row = du + r * a.D;  // [tokens, G, D] = [rows, D]
    const scalar_t* go_row = grad_out + r * a.D;
    const acc_t gate = static_cast<acc_t>(a.gate[r]), scale = scales[r];
    acc_t sum = 0;
    for (int64_t d = row_lane(); d < a.D; d += kRowLanes) {
      sum += du_row[d] * static_cast<acc_t>(w[d]) * static_cast<acc_t>(v[d]);
    }
    const acc_t proj = gated_norm_projection(lane_sum(sum), gate, scale, a.D);
    const acc_t value_to_x_hat = gate * scale;
    acc_t grad_gate_sum = 0;
    for (int64_t d = row_lane(); d < a.D; d += kRowLanes) {
      const acc_t vd = static_cast<acc_t>(v[d]);
      grad_gate_sum += gated_norm_grad_value(scale, du_row[d], static_cast<acc_t>(w[d]), vd * value_to_x_hat, proj,
                                             static_cast<acc_t>(go_row[d])) *
                       vd;
    }
    grad_gate_sum = lane_sum(grad_gate_sum);
    if (row_lane() == 0) {
      grad_gate[r] = static_cast<scalar_t>(grad_gate_sum);
      projection[r] = proj;
    }
  }
}

// grad_value [tokens, D] = sum_g gate_g * d value_g; one thread per element,
// on the 2-D (d, token) grid.
template <typename scalar_t, typename acc_t>
__global__ void short_conv_grad_value_kernel(ShortConvArgs<scalar_t> a, const acc_t* scales, const acc_t* du,
                                             const scalar_t* grad_out, const acc_t* projection,
                                             scalar_t* grad_value) {
  const uint32_t tokens = static_cast<uint32_t>(a.tokens()), D = static_cast<uint32_t>(a.D);
  ENGRAM_TOKEN_STRIDE(tok, tokens) {
    const scalar_t* v = a.value_row(tok);
    ENGRAM_CHANNEL_STRIDE(d, D) {
      const acc_t vd = static_cast<acc_t>(v[d]);
      acc_t sum = 0;
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t r = int64_t(tok) * a.G + g, e = r * a.D + d;
        const acc_t gate = static_cast<acc_t>(a.gate[r]), scale = scales[r];
        sum += gate * gated_norm_grad_value(scale, du[e], static_cast<acc_t>(a.norm_weight[g * a.D + d]),
                                            vd * (gate * scale), projection[r], static_cast<acc_t>(grad_out[e]));
      }
      grad_value[int64_t(tok) * D + d] = static_cast<scalar_t>(sum);
    }
  }
}

// Stage 1 of the weight gradients: partial [chunks, (kernel_size + 1) * C],
// per chunk of tokens
//   [i * C + c]             d conv_weight[c, i] = sum dy[t, c] * u[t - lag_i, c]
//   [kernel_size * C + c]   d norm_weight[c]    = sum du[t, c] * x_hat[t, c]
// (tap-major, so that threads of neighbouring c read neighbouring memory);
// one thread per (chunk, element) on a 3-D grid: x over c, y over chunks, z
// over the kernel_size + 1 taps. The value row and position of a token are
// stepped from the chunk's first token; c is split into (g, d) once per
// thread, in 32 bits.
template <typename scalar_t, typename acc_t>
__global__ void short_conv_weight_partials_kernel(ShortConvArgs<scalar_t> a, const acc_t* scales, const acc_t* dy,
                                                  const acc_t* du, int64_t tokens_per_chunk, int64_t chunks,
                                                  acc_t* partial) {
  const uint32_t C = static_cast<uint32_t>(a.C), D = static_cast<uint32_t>(a.D), T = static_cast<uint32_t>(a.T);
  const uint32_t tokens = static_cast<uint32_t>(a.tokens()), tap = blockIdx.z;
  const int64_t n = (a.kernel_size + 1) * a.C;
  const int64_t row_step = a.value_stride_t, seq_step = a.value_stride_b - (a.T - 1) * a.value_stride_t;
  for (uint32_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const uint32_t first = chunk * static_cast<uint32_t>(tokens_per_chunk);
    const uint32_t last = tokens - first > tokens_per_chunk ? first + static_cast<uint32_t>(tokens_per_chunk) : tokens;
    uint32_t first_t;
    const scalar_t* first_row = a.value_row32(first, first_t);
    ENGRAM_CHANNEL_STRIDE(c, C) {
      const uint32_t g = c / D, d = c - g * D;
      const scalar_t* v = first_row;
      uint32_t t = first_t;
      acc_t sum = 0;
      if (tap < a.kernel_size) {
        const int64_t lag = conv_tap_lag(tap, a.kernel_size, a.dilation);
        const acc_t w = static_cast<acc_t>(a.norm_weight[c]);
        for (uint32_t tok = first; tok < last; ++tok) {
          if (t >= lag) {
            const int64_t r = (int64_t(tok) - lag) * a.G + g;
            const acc_t u = static_cast<acc_t>(v[d - lag * a.value_stride_t]) *
                            (static_cast<acc_t>(a.gate[r]) * scales[r]) * w;
            sum += dy[int64_t(tok) * C + c] * u;
          }
          if (++t == T) {  // the next sequence starts
            t = 0;
            v += seq_step;
          } else {
            v += row_step;
          }
        }
      } else {
        for (uint32_t tok = first; tok < last; ++tok) {
          const int64_t r = int64_t(tok) * a.G + g;
          const acc_t x_hat = static_cast<acc_t>(v[d]) * (static_cast<acc_t>(a.gate[r]) * scales[r]);
          sum += du[int64_t(tok) * C + c] * x_hat;
          if (++t == T) {  // the next sequence starts
            t = 0;
            v += seq_step;
          } else {
            v += row_step;
          }
        }
      }
      partial[int64_t(chunk) * n + int64_t(tap) * C + c] = sum;
    }
  }
}

}  // namespace cuda_layer
}  // namespace engram
