// CPU kernels of the Engram layer ops (spec §5-6): the context gate and the
// gated short-convolution block, forward and backward. Validation,
// allocation, dtype dispatch and threading here; the per-row math is in
// kernels/layer_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels/layer_math.h"

namespace engram {

// Device-independent argument checks, defined in csrc/library.cpp beside the
// schemas (declared here because csrc/ops.h has no layer section yet).
std::array<int64_t, 4> check_context_gate_args(const char* op, const at::Tensor& key, const at::Tensor& hidden,
                                               const at::Tensor& key_norm_weight,
                                               const at::Tensor& hidden_norm_weight, std::optional<double> eps);
std::array<int64_t, 5> check_gated_short_conv_args(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                                   const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                                   int64_t dilation, double eps);
void check_grad_like(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& like,
                     at::IntArrayRef expected);

namespace {

// Elements of work per parallel_for chunk: enough to amortise the dispatch.
constexpr int64_t kElementsPerChunk = 1 << 15;

int64_t rows_per_chunk(int64_t row_elements) {
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(1, row_elements));
}

// The layer feeds views of one fused projection (last dim contiguous, rows
// strided); reading them in place saves a copy. Anything else is copied.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Weight gradients are sums over all tokens. To get the same bits for any
// thread count, tokens are cut into a number of blocks that depends only on
// the token count; each block sums into its own partial and the partials are
// added in block order.
constexpr int64_t kMinTokensPerBlock = 16;
constexpr int64_t kMaxBlocks = 64;

struct TokenBlocks {
  int64_t tokens, count;
  int64_t begin(int64_t block) const { return tokens * block / count; }
};

TokenBlocks token_blocks(int64_t tokens) {
  return {tokens, std::clamp<int64_t>(tokens / kMinTokensPerBlock, 1, kMaxBlocks)};
}

// partials [blocks, n] (acc_t) -> [n] in `dtype`, summed in block order.
template <typename acc_t>
at::Tensor sum_block_partials(const at::Tensor& partials, at::ScalarType dtype) {
  const int64_t blocks = partials.size(0), n = partials.size(1);
  at::Tensor total = at::empty({n}, partials.options());
  const acc_t* src = partials.const_data_ptr<acc_t>();
  acc_t* dst = total.data_ptr<acc_t>();
  at::parallel_for(0, n, rows_per_chunk(blocks), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum = 0;
      for (int64_t b = 0; b < blocks; ++b) sum += src[b * n + i];
      dst[i] = sum;
    }
  });
  return total.to(dtype);
}

template <typename scalar_t>
at::ScalarType acc_dtype() {
  return c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
}

// ---------------------------------------------------------------------------
// context gate
// ---------------------------------------------------------------------------

// Strided access to the [B, T, G, D] rows of key and hidden.
template <typename scalar_t>
struct GateRows {
  const scalar_t* data;
  int64_t stride_b, stride_t, stride_g, T, G;

  explicit GateRows(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()),
        stride_b(t.stride(0)), stride_t(t.stride(1)), stride_g(t.stride(2)), T(t.size(1)), G(t.size(2)) {}

  // row r of the flattened (b, t, g) index
  const scalar_t* row(int64_t r) const {
    const int64_t g = r % G, bt = r / G;
    return data + (bt / T) * stride_b + (bt % T) * stride_t + g * stride_g;
  }
};

template <typename scalar_t>
at::opmath_type<scalar_t> resolve_eps(std::optional<double> eps) {
  // nn.RMSNorm(eps=None) uses torch.finfo(input.dtype).eps.
  return static_cast<at::opmath_type<scalar_t>>(
      eps.has_value() ? *eps : static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
}

at::Tensor context_gate_cpu(const at::Tensor& key_in, const at::Tensor& hidden_in, const at::Tensor& key_norm_weight,
                            const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  const auto shape =
      check_context_gate_args("context_gate", key_in, hidden_in, key_norm_weight, hidden_norm_weight, eps);
  const int64_t B = shape[0], T = shape[1], G = shape[2], D = shape[3];
  const at::Tensor key = rows_contiguous(key_in), hidden = rows_contiguous(hidden_in);
  const at::Tensor key_weight = key_norm_weight.contiguous(), hidden_weight = hidden_norm_weight.contiguous();
  at::Tensor gate = at::empty({B, T, G}, key.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "context_gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t eps_value = resolve_eps<scalar_t>(eps);
    const GateRows<scalar_t> keys(key), queries(hidden);
    const scalar_t* wk = key_weight.const_data_ptr<scalar_t>();
    const scalar_t* wq = hidden_weight.const_data_ptr<scalar_t>();
    scalar_t* out = gate.data_ptr<scalar_t>();
    at::parallel_for(0, B * T * G, rows_per_chunk(2 * D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t g = r % G;
        const auto st = gate_row_state<acc_t>(keys.row(r), queries.row(r), wk + g * D, wq + g * D, D, eps_value);
        out[r] = static_cast<scalar_t>(gate_from_score(st.score));
      }
    });
  });
  return gate;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> context_gate_backward_cpu(
    const at::Tensor& grad_gate_in, const at::Tensor& key_in, const at::Tensor& hidden_in,
    const at::Tensor& key_norm_weight, const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  constexpr const char* op = "context_gate_backward";
  const auto shape = check_context_gate_args(op, key_in, hidden_in, key_norm_weight, hidden_norm_weight, eps);
  const int64_t B = shape[0], T = shape[1], G = shape[2], D = shape[3];
  check_grad_like(op, "grad_gate", grad_gate_in, key_in, {B, T, G});
  const at::Tensor grad_gate = grad_gate_in.contiguous();
  const at::Tensor key = rows_contiguous(key_in), hidden = rows_contiguous(hidden_in);
  const at::Tensor key_weight = key_norm_weight.contiguous(), hidden_weight = hidden_norm_weight.contiguous();
  at::Tensor grad_key = at::empty({B, T, G, D}, key.options());
  at::Tensor grad_hidden = at::empty({B, T, G, D}, key.options());
  at::Tensor grad_key_weight, grad_hidden_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "context_gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t eps_value = resolve_eps<scalar_t>(eps);
    const GateRows<scalar_t> keys(key), queries(hidden);
    const scalar_t* wk = key_weight.const_data_ptr<scalar_t>();
    const scalar_t* wq = hidden_weight.const_data_ptr<scalar_t>();
    const scalar_t* gg = grad_gate.const_data_ptr<scalar_t>();
    scalar_t* dk = grad_key.data_ptr<scalar_t>();
    scalar_t* dq = grad_hidden.data_ptr<scalar_t>();
    // Per block: [grad_key_weight (G*D) | grad_hidden_weight (G*D)].
    const TokenBlocks blocks = token_blocks(B * T);
    at::Tensor partials = at::zeros({blocks.count, 2 * G * D}, key.options().dtype(acc_dtype<scalar_t>()));
    acc_t* partial_ptr = partials.data_ptr<acc_t>();
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        acc_t* dwk = partial_ptr + block * 2 * G * D;
        acc_t* dwq = dwk + G * D;
        for (int64_t r = blocks.begin(block) * G; r < blocks.begin(block + 1) * G; ++r) {
          const int64_t g = r % G;
          gate_row_backward<acc_t>(static_cast<acc_t>(gg[r]), keys.row(r), queries.row(r), wk + g * D, wq + g * D, D,
                                   eps_value, dk + r * D, dq + r * D, dwk + g * D, dwq + g * D);
        }
      }
    });
    const at::Tensor weight_grads = sum_block_partials<acc_t>(partials, key.scalar_type()).view({2, G, D});
    grad_key_weight = weight_grads[0].clone();
    grad_hidden_weight = weight_grads[1].clone();
  });
  return {grad_key, grad_hidden, grad_key_weight, grad_hidden_weight};
}

// ---------------------------------------------------------------------------
// gated short convolution
// ---------------------------------------------------------------------------

struct ShortConvShape {
  int64_t B, T, G, D, C, kernel_size, dilation;
  int64_t tokens() const { return B * T; }
};

// The conv weight [C, kernel_size] transposed to [kernel_size, C] in acc_t, so
// the inner loops run over contiguous channels.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> taps_by_channel(const at::Tensor& conv_weight, const ShortConvShape& s) {
  const at::Tensor w = conv_weight.contiguous();
  const scalar_t* src = w.const_data_ptr<scalar_t>();
  std::vector<at::opmath_type<scalar_t>> taps(s.kernel_size * s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    for (int64_t i = 0; i < s.kernel_size; ++i) taps[i * s.C + c] = static_cast<at::opmath_type<scalar_t>>(src[c * s.kernel_size + i]);
  }
  return taps;
}

// u = RMSNorm_g(gate * value) * norm_weight for every token, as [tokens, C]
// in acc_t; also returns each (token, branch) row's scale 1/rms if asked.
template <typename scalar_t>
void normalize_gated_rows(const ShortConvShape& s, const at::Tensor& value, const at::Tensor& gate,
                          const at::Tensor& norm_weight, at::opmath_type<scalar_t> eps,
                          at::opmath_type<scalar_t>* u, at::opmath_type<scalar_t>* scales) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* v = value.const_data_ptr<scalar_t>();
  const scalar_t* gates = gate.const_data_ptr<scalar_t>();
  const scalar_t* w = norm_weight.const_data_ptr<scalar_t>();
  const int64_t vb = value.stride(0), vt = value.stride(1);
  at::parallel_for(0, s.tokens(), rows_per_chunk(s.C), [&](int64_t begin, int64_t end) {
    for (int64_t tok = begin; tok < end; ++tok) {
      const scalar_t* v_row = v + (tok / s.T) * vb + (tok % s.T) * vt;
      const acc_t sum_sq = sum_of_squares<acc_t>(v_row, s.D);
      for (int64_t g = 0; g < s.G; ++g) {
        const acc_t gate_value = static_cast<acc_t>(gates[tok * s.G + g]);
        const acc_t scale = gated_rms_scale(gate_value, sum_sq, s.D, eps);
        if (scales) scales[tok * s.G + g] = scale;
        const acc_t factor = gate_value * scale;
        const scalar_t* w_row = w + g * s.D;
        acc_t* u_row = u + tok * s.C + g * s.D;
        for (int64_t c = 0; c < s.D; ++c) u_row[c] = static_cast<acc_t>(v_row[c]) * factor * static_cast<acc_t>(w_row[c]);
      }
    }
  });
}

// y[c] = sum_i taps[i][c] * u[t - lag_i][c] for one token (zero history).
template <typename acc_t>
void causal_conv_token(const ShortConvShape& s, const acc_t* taps, const acc_t* u, int64_t tok, acc_t* y) {
  const int64_t t = tok % s.T;
  std::fill(y, y + s.C, acc_t(0));
  for (int64_t i = 0; i < s.kernel_size; ++i) {
    const int64_t lag = conv_tap_lag(i, s.kernel_size, s.dilation);
    if (t < lag) continue;
    const acc_t* w = taps + i * s.C;
    const acc_t* src = u + (tok - lag) * s.C;
    for (int64_t c = 0; c < s.C; ++c) y[c] += w[c] * src[c];
  }
}

ShortConvShape short_conv_shape(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                const at::Tensor& norm_weight, const at::Tensor& conv_weight, int64_t dilation,
                                double eps) {
  const auto shape = check_gated_short_conv_args(op, value, gate, norm_weight, conv_weight, dilation, eps);
  const int64_t G = shape[2], D = shape[3];
  return {shape[0], shape[1], G, D, G * D, shape[4], dilation};
}

at::Tensor gated_short_conv_cpu(const at::Tensor& value_in, const at::Tensor& gate_in, const at::Tensor& norm_weight_in,
                                const at::Tensor& conv_weight, int64_t dilation, double eps) {
  const ShortConvShape s =
      short_conv_shape("gated_short_conv", value_in, gate_in, norm_weight_in, conv_weight, dilation, eps);
  const at::Tensor value = rows_contiguous(value_in);
  const at::Tensor gate = gate_in.contiguous(), norm_weight = norm_weight_in.contiguous();
  at::Tensor out = at::empty({s.B, s.T, s.G, s.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "gated_short_conv", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> taps = taps_by_channel<scalar_t>(conv_weight, s);
    at::Tensor u = at::empty({s.tokens(), s.C}, value.options().dtype(acc_dtype<scalar_t>()));
    acc_t* u_ptr = u.data_ptr<acc_t>();
    normalize_gated_rows<scalar_t>(s, value, gate, norm_weight, static_cast<acc_t>(eps), u_ptr, nullptr);

    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* gates = gate.const_data_ptr<scalar_t>();
    const int64_t vb = value.stride(0), vt = value.stride(1);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.tokens(), rows_per_chunk(s.C * s.kernel_size), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> y(s.C);
      for (int64_t tok = begin; tok < end; ++tok) {
        causal_conv_token(s, taps.data(), u_ptr, tok, y.data());
        const scalar_t* v_row = v + (tok / s.T) * vb + (tok % s.T) * vt;
        for (int64_t g = 0; g < s.G; ++g) {
          const acc_t gate_value = static_cast<acc_t>(gates[tok * s.G + g]);
          const acc_t* y_row = y.data() + g * s.D;
          scalar_t* dst = out_ptr + tok * s.C + g * s.D;
          for (int64_t c = 0; c < s.D; ++c) {
            dst[c] = static_cast<scalar_t>(gate_value * static_cast<acc_t>(v_row[c]) + silu(y_row[c]));
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_short_conv_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& gate_in,
    const at::Tensor& norm_weight_in, const at::Tensor& conv_weight, int64_t dilation, double eps) {
  constexpr const char* op = "gated_short_conv_backward";
  const ShortConvShape s = short_conv_shape(op, value_in, gate_in, norm_weight_in, conv_weight, dilation, eps);
  check_grad_like(op, "grad_out", grad_out_in, value_in, {s.B, s.T, s.G, s.D});
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor value = rows_contiguous(value_in);
  const at::Tensor gate = gate_in.contiguous(), norm_weight = norm_weight_in.contiguous();
  at::Tensor grad_value = at::empty({s.B, s.T, s.D}, value.options());
  at::Tensor grad_gate = at::empty({s.B, s.T, s.G}, value.options());
  at::Tensor grad_norm_weight, grad_conv_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "gated_short_conv_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = acc_dtype<scalar_t>();
    const std::vector<acc_t> taps = taps_by_channel<scalar_t>(conv_weight, s);
    const int64_t C = s.C, K = s.kernel_size, T = s.T;

    // Recompute the normalised rows (cheaper than saving them in forward).
    at::Tensor u = at::empty({s.tokens(), C}, value.options().dtype(acc_type));
    at::Tensor scales = at::empty({s.tokens(), s.G}, value.options().dtype(acc_type));
    acc_t* u_ptr = u.data_ptr<acc_t>();
    acc_t* scale_ptr = scales.data_ptr<acc_t>();
    normalize_gated_rows<scalar_t>(s, value, gate, norm_weight, static_cast<acc_t>(eps), u_ptr, scale_ptr);

    const TokenBlocks blocks = token_blocks(s.tokens());
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();

    // d loss / d y = grad_out * SiLU'(y) for every token, and the conv weight
    // gradient d w[c, i] = sum_t dy[t, c] * u[t - lag_i, c].
    at::Tensor grad_y = at::empty({s.tokens(), C}, value.options().dtype(acc_type));
    acc_t* gy_ptr = grad_y.data_ptr<acc_t>();
    at::Tensor conv_partials = at::zeros({blocks.count, K * C}, value.options().dtype(acc_type));
    acc_t* conv_partial_ptr = conv_partials.data_ptr<acc_t>();
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        acc_t* dw = conv_partial_ptr + block * K * C;
        for (int64_t tok = blocks.begin(block); tok < blocks.begin(block + 1); ++tok) {
          acc_t* gy = gy_ptr + tok * C;
          causal_conv_token(s, taps.data(), u_ptr, tok, gy);
          const scalar_t* go_row = go + tok * C;
          for (int64_t c = 0; c < C; ++c) gy[c] = static_cast<acc_t>(go_row[c]) * silu_grad(gy[c]);
          const int64_t t = tok % T;
          for (int64_t i = 0; i < K; ++i) {
            const int64_t lag = conv_tap_lag(i, K, s.dilation);
            if (t < lag) continue;
            const acc_t* src = u_ptr + (tok - lag) * C;
            acc_t* dw_tap = dw + i * C;
            for (int64_t c = 0; c < C; ++c) dw_tap[c] += gy[c] * src[c];
          }
        }
      }
    });

    // d u[t] = sum_i w[i] * dy[t + lag_i] (the transposed conv), then the
    // RMSNorm and gating backward of each branch row.
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* gates = gate.const_data_ptr<scalar_t>();
    const scalar_t* w_norm = norm_weight.const_data_ptr<scalar_t>();
    const int64_t vb = value.stride(0), vt = value.stride(1);
    scalar_t* dv_ptr = grad_value.data_ptr<scalar_t>();
    scalar_t* dgate_ptr = grad_gate.data_ptr<scalar_t>();
    at::Tensor norm_partials = at::zeros({blocks.count, C}, value.options().dtype(acc_type));
    acc_t* norm_partial_ptr = norm_partials.data_ptr<acc_t>();
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<acc_t> du(C), dv(s.D);
      for (int64_t block = block_begin; block < block_end; ++block) {
        acc_t* dw_norm = norm_partial_ptr + block * C;
        for (int64_t tok = blocks.begin(block); tok < blocks.begin(block + 1); ++tok) {
          const int64_t t = tok % T;
          std::fill(du.begin(), du.end(), acc_t(0));
          for (int64_t i = 0; i < K; ++i) {
            const int64_t lag = conv_tap_lag(i, K, s.dilation);
            if (t + lag >= T) continue;
            const acc_t* w = taps.data() + i * C;
            const acc_t* src = gy_ptr + (tok + lag) * C;
            for (int64_t c = 0; c < C; ++c) du[c] += w[c] * src[c];
          }
          const scalar_t* v_row = v + (tok / T) * vb + t * vt;
          std::fill(dv.begin(), dv.end(), acc_t(0));
          for (int64_t g = 0; g < s.G; ++g) {
            const int64_t row = tok * s.G + g;
            const acc_t grad_gate_row = gated_norm_row_backward<acc_t>(
                static_cast<acc_t>(gates[row]), v_row, scale_ptr[row], w_norm + g * s.D, du.data() + g * s.D,
                go + tok * C + g * s.D, s.D, dv.data(), dw_norm + g * s.D);
            dgate_ptr[row] = static_cast<scalar_t>(grad_gate_row);
          }
          scalar_t* dv_row = dv_ptr + tok * s.D;
          for (int64_t c = 0; c < s.D; ++c) dv_row[c] = static_cast<scalar_t>(dv[c]);
        }
      }
    });

    grad_norm_weight = sum_block_partials<acc_t>(norm_partials, value.scalar_type()).view({s.G, s.D});
    // [K, C] -> [C, K], the layout of conv_weight.
    grad_conv_weight = sum_block_partials<acc_t>(conv_partials, value.scalar_type()).view({K, C}).t().contiguous();
  });
  return {grad_value, grad_gate, grad_norm_weight, grad_conv_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("context_gate", &context_gate_cpu);
  m.impl("context_gate_backward", &context_gate_backward_cpu);
  m.impl("gated_short_conv", &gated_short_conv_cpu);
  m.impl("gated_short_conv_backward", &gated_short_conv_backward_cpu);
}

}  // namespace engram
