// Torch-free per-row math of the Engram layer (spec §5-6), shared by the CPU
// kernels and the CUDA kernels (kernels/layer_cuda.cuh).
//
// Every function works on one row of D values through raw pointers. `acc_t`
// is the accumulation type (float for float/bf16/fp16 storage, double for
// double); `scalar_t` and `weight_t` are the storage types, converted with
// static_cast so that c10::BFloat16, __nv_bfloat16 and plain floats all work.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/hash.h"  // ENGRAM_HD

// Output rows never alias the inputs; saying so lets the compiler vectorise
// loops that write several rows at once.
#if defined(_MSC_VER)
#define ENGRAM_RESTRICT __restrict
#else
#define ENGRAM_RESTRICT __restrict__
#endif

// Portable vector types for the row reductions below (GCC and clang vector
// extensions): the compiler maps them onto the registers of the ISA level a
// kernel is compiled for (kernels/cpu_isa.h), e.g. 8 floats onto one AVX
// register or two SSE registers.
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define ENGRAM_VECTOR_LANES 1
#endif

namespace engram {

// [B, T, G, D] rows with a contiguous last dim (the layer passes views of
// one fused projection), read in place by the CPU and CUDA kernels.
template <typename scalar_t>
struct Rows4 {
  const scalar_t* data;
  int64_t stride_b, stride_t, stride_g, T, G;

  // row r of the flattened (b, t, g) index
  ENGRAM_HD const scalar_t* row(int64_t r) const {
    const int64_t g = r % G, bt = r / G;
    return data + (bt / T) * stride_b + (bt % T) * stride_t + g * stride_g;
  }

  // row(r), split in 32-bit math for the CUDA kernels (their launcher checks
  // that B * T * G fits in int32): a 64-bit divide is a ~20-instruction
  // subroutine call on the GPU.
  ENGRAM_HD const scalar_t* row32(int64_t r) const {
    const uint32_t r32 = static_cast<uint32_t>(r), G32 = static_cast<uint32_t>(G), T32 = static_cast<uint32_t>(T);
    const uint32_t bt = r32 / G32, g = r32 - bt * G32, b = bt / T32, t = bt - b * T32;
    return data + b * stride_b + t * stride_t + g * stride_g;
  }
};

// ---------------------------------------------------------------------------
// Scalar formulas
// ---------------------------------------------------------------------------

template <typename acc_t>
ENGRAM_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// SiLU and its derivative given s = sigmoid(x), for callers that compute the
// sigmoid of a whole block with a vectorised exp.
template <typename acc_t>
ENGRAM_HD acc_t silu_from_sigmoid(acc_t x, acc_t s) {
  return x * s;
}

// d silu(x) / dx = s * (1 + x * (1 - s))
template <typename acc_t>
ENGRAM_HD acc_t silu_grad_from_sigmoid(acc_t x, acc_t s) {
  return s * (acc_t(1) + x * (acc_t(1) - s));
}

template <typename acc_t>
ENGRAM_HD acc_t silu(acc_t x) {
  return silu_from_sigmoid(x, sigmoid(x));
}

template <typename acc_t>
ENGRAM_HD acc_t silu_grad(acc_t x) {
  return silu_grad_from_sigmoid(x, sigmoid(x));
}

// Floor of |s| in the signed square root of spec §5.
template <typename acc_t>
ENGRAM_HD acc_t gate_score_floor() {
  return static_cast<acc_t>(1e-6);
}

// sign(s) * sqrt(max(|s|, 1e-6)); sign(0) = 0, so s = 0 maps to 0.
template <typename acc_t>
ENGRAM_HD acc_t signed_sqrt(acc_t s) {
  const acc_t magnitude = std::sqrt(std::fmax(std::fabs(s), gate_score_floor<acc_t>()));
  return s > acc_t(0) ? magnitude : (s < acc_t(0) ? -magnitude : acc_t(0));
}

// Derivative of signed_sqrt as autograd of the plain formula
// `s.sign() * s.abs().clamp_min(1e-6).sqrt()` gives it: sign() has zero
// gradient, clamp_min passes the gradient only where |s| >= 1e-6, and
// sign(s) * d|s|/ds = sign(s)^2 = 1 there. So 0.5 / sqrt(|s|) for
// |s| >= 1e-6 and 0 below (including s = 0).
template <typename acc_t>
ENGRAM_HD acc_t signed_sqrt_grad(acc_t s) {
  const acc_t magnitude = std::fabs(s);
  return magnitude >= gate_score_floor<acc_t>() ? acc_t(0.5) / std::sqrt(magnitude) : acc_t(0);
}

// ---------------------------------------------------------------------------
// Row reductions
// ---------------------------------------------------------------------------

// kReductionLanes independent partial sums, added in lane order at the end:
// a single accumulator would be a serial dependency chain, and without
// -ffast-math the compiler may not reorder the sum itself. The lanes are held
// in explicit vectors of kVectorBytes, the SIMD register size of the ISA level
// a kernel is compiled for (kernels/cpu_isa.h: 16 for SSE, 32 for AVX2, 64
// for AVX-512), so each level computes the same partial sums (up to FMA
// contraction) in as few registers as it has. A vector wider than the
// target's registers would live on the stack instead.
constexpr int kReductionLanes = 8;
constexpr int kDefaultVectorBytes = 16;

template <typename acc_t, int kVectorBytes>
struct ReductionLanes {
#if defined(ENGRAM_VECTOR_LANES)
  static_assert(kVectorBytes >= static_cast<int>(sizeof(acc_t)), "a vector holds at least one value");
  static constexpr int kWidth = kVectorBytes / static_cast<int>(sizeof(acc_t)) < kReductionLanes
                                    ? kVectorBytes / static_cast<int>(sizeof(acc_t))
                                    : kReductionLanes;
  typedef acc_t vector_t __attribute__((vector_size(kWidth * sizeof(acc_t))));
#else
  static constexpr int kWidth = 1;
  typedef acc_t vector_t;
#endif
  static constexpr int kCount = kReductionLanes / kWidth;
  vector_t part[kCount];

  // x[0..kReductionLanes) converted to acc_t (unaligned vector loads for acc_t).
  template <typename T>
  ENGRAM_HD void load(const T* x) {
#if defined(ENGRAM_VECTOR_LANES)
    if constexpr (std::is_same_v<T, acc_t>) {
      for (int j = 0; j < kCount; ++j) std::memcpy(&part[j], x + j * kWidth, sizeof(vector_t));
      return;
    }
#endif
    for (int j = 0; j < kCount; ++j) {
      if constexpr (kWidth == 1) {
        part[j] = static_cast<acc_t>(x[j]);
      } else {
        for (int i = 0; i < kWidth; ++i) part[j][i] = static_cast<acc_t>(x[j * kWidth + i]);
      }
    }
  }

  // lane 0 + lane 1 + ... in this order, whatever the vector width.
  ENGRAM_HD acc_t sum() const {
    acc_t total = 0;
    for (int j = 0; j < kCount; ++j) {
      const vector_t p = part[j];
      if constexpr (kWidth == 1) {
        total += p;
      } else {
        for (int i = 0; i < kWidth; ++i) total += p[i];
      }
    }
    return total;
  }
};

template <typename acc_t, int kVectorBytes = kDefaultVectorBytes, typename scalar_t>
ENGRAM_HD acc_t sum_of_squares(const scalar_t* x, int64_t n) {
  using Lanes = ReductionLanes<acc_t, kVectorBytes>;
  Lanes lanes = {}, v;
  int64_t i = 0;
  for (; i + kReductionLanes <= n; i += kReductionLanes) {
    v.load(x + i);
    for (int j = 0; j < Lanes::kCount; ++j) lanes.part[j] += v.part[j] * v.part[j];
  }
  acc_t total = lanes.sum();
  for (; i < n; ++i) {
    const acc_t value = static_cast<acc_t>(x[i]);
    total += value * value;
  }
  return total;
}

// sum(a * b * c) over n values.
template <typename acc_t, int kVectorBytes = kDefaultVectorBytes, typename a_t, typename b_t, typename c_t>
ENGRAM_HD acc_t sum_of_triple_products(const a_t* a, const b_t* b, const c_t* c, int64_t n) {
  using Lanes = ReductionLanes<acc_t, kVectorBytes>;
  Lanes lanes = {}, va, vb, vc;
  int64_t i = 0;
  for (; i + kReductionLanes <= n; i += kReductionLanes) {
    va.load(a + i);
    vb.load(b + i);
    vc.load(c + i);
    for (int j = 0; j < Lanes::kCount; ++j) lanes.part[j] += va.part[j] * vb.part[j] * vc.part[j];
  }
  acc_t total = lanes.sum();
  for (; i < n; ++i) total += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]) * static_cast<acc_t>(c[i]);
  return total;
}

// 1 / sqrt(mean(x^2) + eps), the scale of an RMSNorm row (as nn.RMSNorm).
template <typename acc_t>
ENGRAM_HD acc_t rms_scale_from_sum_of_squares(acc_t sum_sq, int64_t n, acc_t eps) {
  return acc_t(1) / std::sqrt(sum_sq / static_cast<acc_t>(n) + eps);
}

// ---------------------------------------------------------------------------
// Context gate of one (token, branch) row, spec §5:
//   nk = RMSNorm(key) * key_weight, nq = RMSNorm(query) * query_weight
//   s = sum(nk * nq) / sqrt(D), gate = sigmoid(signed_sqrt(s))
// ---------------------------------------------------------------------------

template <typename acc_t>
struct GateRowState {
  acc_t key_scale;    // 1 / rms(key)
  acc_t query_scale;  // 1 / rms(query)
  acc_t dot;          // sum(nk * nq), before the 1/sqrt(D)
  acc_t score;        // s
};

// The row state from sum(key^2), sum(query^2) and sum(key * w_k * query * w_q),
// however those sums were reduced (lanes here, a warp on the GPU).
template <typename acc_t>
ENGRAM_HD GateRowState<acc_t> gate_row_state_from_sums(acc_t sum_kk, acc_t sum_qq, acc_t sum_kq, int64_t D, acc_t eps) {
  GateRowState<acc_t> st;
  st.key_scale = rms_scale_from_sum_of_squares(sum_kk, D, eps);
  st.query_scale = rms_scale_from_sum_of_squares(sum_qq, D, eps);
  st.dot = sum_kq * st.key_scale * st.query_scale;
  st.score = st.dot / std::sqrt(static_cast<acc_t>(D));
  return st;
}

template <typename acc_t, int kVectorBytes = kDefaultVectorBytes, typename scalar_t, typename weight_t>
ENGRAM_HD GateRowState<acc_t> gate_row_state(const scalar_t* key, const scalar_t* query, const weight_t* key_weight,
                                             const weight_t* query_weight, int64_t D, acc_t eps) {
  using Lanes = ReductionLanes<acc_t, kVectorBytes>;
  Lanes kk = {}, qq = {}, kq = {}, k, q, wk, wq;
  int64_t c = 0;
  for (; c + kReductionLanes <= D; c += kReductionLanes) {
    k.load(key + c);
    q.load(query + c);
    wk.load(key_weight + c);
    wq.load(query_weight + c);
    for (int j = 0; j < Lanes::kCount; ++j) {
      kk.part[j] += k.part[j] * k.part[j];
      qq.part[j] += q.part[j] * q.part[j];
      kq.part[j] += k.part[j] * wk.part[j] * q.part[j] * wq.part[j];
    }
  }
  acc_t sum_kk = kk.sum(), sum_qq = qq.sum(), sum_kq = kq.sum();
  for (; c < D; ++c) {
    const acc_t k = static_cast<acc_t>(key[c]), q = static_cast<acc_t>(query[c]);
    sum_kk += k * k;
    sum_qq += q * q;
    sum_kq += k * static_cast<acc_t>(key_weight[c]) * q * static_cast<acc_t>(query_weight[c]);
  }
  return gate_row_state_from_sums(sum_kk, sum_qq, sum_kq, D, eps);
}

template <typename acc_t>
ENGRAM_HD acc_t gate_from_score(acc_t score) {
  return sigmoid(signed_sqrt(score));
}

// d loss / d dot (the dot before the 1/sqrt(D)) given d loss / d gate.
template <typename acc_t>
ENGRAM_HD acc_t gate_grad_dot(acc_t grad_gate, acc_t score, int64_t D) {
  const acc_t gate = gate_from_score(score);
  const acc_t grad_score = grad_gate * gate * (acc_t(1) - gate) * signed_sqrt_grad(score);
  return grad_score / std::sqrt(static_cast<acc_t>(D));
}

// Backward of one gate row given d loss / d gate. With r_k, r_q the scales,
// nk, nq the normalised rows and g = d loss / d dot:
//   d key_c   = r_k * g * (w_k,c * nq_c - key_c * r_k * dot / D)
//   d query_c = r_q * g * (w_q,c * nk_c - query_c * r_q * dot / D)
//   d w_k,c  += g * nq_c * key_c * r_k,   d w_q,c += g * nk_c * query_c * r_q
// (the RMSNorm backward with the incoming gradient g * nq folded in).
template <typename acc_t, int kVectorBytes = kDefaultVectorBytes, typename scalar_t, typename weight_t,
          typename out_t>
ENGRAM_HD void gate_row_backward(acc_t grad_gate, const scalar_t* key, const scalar_t* query, const weight_t* key_weight,
                                 const weight_t* query_weight, int64_t D, acc_t eps,
                                 out_t* ENGRAM_RESTRICT grad_key, out_t* ENGRAM_RESTRICT grad_query,
                                 acc_t* ENGRAM_RESTRICT grad_key_weight, acc_t* ENGRAM_RESTRICT grad_query_weight) {
  const GateRowState<acc_t> st =
      gate_row_state<acc_t, kVectorBytes>(key, query, key_weight, query_weight, D, eps);
  const acc_t grad_dot = gate_grad_dot(grad_gate, st.score, D);
  const acc_t dot_over_d = st.dot / static_cast<acc_t>(D);
  const acc_t rk = st.key_scale, rq = st.query_scale;
  for (int64_t c = 0; c < D; ++c) {
    const acc_t k = static_cast<acc_t>(key[c]), q = static_cast<acc_t>(query[c]);
    const acc_t wk = static_cast<acc_t>(key_weight[c]), wq = static_cast<acc_t>(query_weight[c]);
    const acc_t k_hat = k * rk, q_hat = q * rq;
    const acc_t nk = k_hat * wk, nq = q_hat * wq;
    grad_key[c] = static_cast<out_t>(rk * grad_dot * (wk * nq - k_hat * dot_over_d));
    grad_query[c] = static_cast<out_t>(rq * grad_dot * (wq * nk - q_hat * dot_over_d));
    grad_key_weight[c] += grad_dot * nq * k_hat;
    grad_query_weight[c] += grad_dot * nk * q_hat;
  }
}

// ---------------------------------------------------------------------------
// Gated short-convolution block, spec §5-6, one (token, branch) row:
//   value = gate * v, u = value * scale * norm_weight, scale = 1 / rms(value)
//   out = value + SiLU(conv(u))
// ---------------------------------------------------------------------------

// 1 / rms(gate * v) from sum(v^2): rms(gate * v)^2 = gate^2 * mean(v^2), so one
// reduction over v serves every branch.
template <typename acc_t>
ENGRAM_HD acc_t gated_rms_scale(acc_t gate, acc_t sum_sq_v, int64_t D, acc_t eps) {
  return rms_scale_from_sum_of_squares(gate * gate * sum_sq_v, D, eps);
}

// mean(dx_hat * x_hat) of the RMSNorm backward below, from
// sum(grad_u * norm_weight * v) (x_hat = v * gate * scale).
template <typename acc_t>
ENGRAM_HD acc_t gated_norm_projection(acc_t sum_grad_u_weight_v, acc_t gate, acc_t scale, int64_t D) {
  return sum_grad_u_weight_v * (gate * scale) / static_cast<acc_t>(D);
}

// d loss / d value of one element (see gated_norm_row_backward).
template <typename acc_t>
ENGRAM_HD acc_t gated_norm_grad_value(acc_t scale, acc_t grad_u, acc_t norm_weight, acc_t x_hat, acc_t projection,
                                      acc_t grad_residual) {
  return scale * (grad_u * norm_weight - x_hat * projection) + grad_residual;
}

// Backward of one branch row given grad_u = d loss / d u (through the conv)
// and grad_residual = d loss / d out (the residual path). Adds gate * d value
// to grad_v and grad_u * value * scale to grad_norm_weight; returns
// d loss / d gate = sum(d value * v). The RMSNorm backward, with
// x_hat = value * scale and dx_hat = grad_u * norm_weight:
//   d value = scale * (dx_hat - x_hat * mean(dx_hat * x_hat)) + grad_residual
template <typename acc_t, int kVectorBytes = kDefaultVectorBytes, typename scalar_t, typename weight_t,
          typename grad_t>
ENGRAM_HD acc_t gated_norm_row_backward(acc_t gate, const scalar_t* v, acc_t scale, const weight_t* norm_weight,
                                        const acc_t* grad_u, const grad_t* grad_residual, int64_t D,
                                        acc_t* ENGRAM_RESTRICT grad_v, acc_t* ENGRAM_RESTRICT grad_norm_weight) {
  const acc_t value_to_x_hat = gate * scale;
  const acc_t projection = gated_norm_projection(
      sum_of_triple_products<acc_t, kVectorBytes>(grad_u, norm_weight, v, D), gate, scale, D);
  acc_t grad_gate = 0;
  for (int64_t c = 0; c < D; ++c) {
    const acc_t vc = static_cast<acc_t>(v[c]);
    const acc_t x_hat = vc * value_to_x_hat;
    const acc_t grad_value = gated_norm_grad_value(scale, grad_u[c], static_cast<acc_t>(norm_weight[c]), x_hat,
                                                   projection, static_cast<acc_t>(grad_residual[c]));
    grad_gate += grad_value * vc;
    grad_v[c] += gate * grad_value;
    grad_norm_weight[c] += grad_u[c] * x_hat;
  }
  return grad_gate;
}

// ---------------------------------------------------------------------------
// Short convolution, spec §6: tap i of a kernel of `kernel_size` taps reads
// the token (kernel_size - 1 - i) * dilation steps back (zero before t = 0).
// ---------------------------------------------------------------------------

ENGRAM_HD int64_t conv_tap_lag(int64_t tap, int64_t kernel_size, int64_t dilation) {
  return (kernel_size - 1 - tap) * dilation;
}

}  // namespace engram
