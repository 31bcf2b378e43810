// CPU kernels of the Engram layer ops (spec §5-6): the context gate and the
// gated short-convolution block, forward and backward. Validation,
// allocation, dtype dispatch and threading here; the per-row math is in
// kernels/layer_math.h. Each op reads the CPU ISA level once and runs its
// row kernels through cpu::run_for_isa (kernels/cpu_isa.h), which calls the
// version compiled for that level.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "csrc/checks.h"
#include "csrc/layer_helpers.h"
#include "kernels/cpu_isa.h"
#include "kernels/layer_math.h"

namespace engram {

namespace {

// Elements of work per parallel_for chunk: enough to amortise the dispatch.
constexpr int64_t kElementsPerChunk = 1 << 15;

int64_t rows_per_chunk(int64_t row_elements) {
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(1, row_elements));
}

// Weight gradients are sums over all tokens. To get the same bits for any
// thread count, tokens are cut into a number of blocks that depends only on
// the token count; each block sums into its own partial and the partials are
// added in block order.
constexpr int64_t kMinTokensPerBlock = 64;
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

// Rows are widened to acc_t once, by a plain conversion loop, so that the row
// math of kernels/layer_math.h runs on acc_t arrays only: the compiler
// vectorises those well, and loops that mix bf16 loads with float math poorly.
template <typename acc_t, typename scalar_t>
const acc_t* widen(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(src[i]);
    return buffer;
  }
}

// A whole (small) tensor, e.g. a [G, D] norm weight, widened once per call.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> widen_tensor(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const scalar_t* src = c.const_data_ptr<scalar_t>();
  return std::vector<at::opmath_type<scalar_t>>(src, src + c.numel());
}

// Where an acc_t result row goes: straight into the output when the output
// is acc_t, else into `buffer`, to be narrowed by store_row.
template <typename acc_t, typename scalar_t>
acc_t* result_row(scalar_t* dst, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return dst;
  } else {
    return buffer;
  }
}

template <typename acc_t, typename scalar_t>
void store_row(const acc_t* row, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(row[i]);
  }
}

// ---------------------------------------------------------------------------
// context gate
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct GateArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Rows4<scalar_t> keys, queries;  // key, hidden
  std::vector<acc_t> key_weight, query_weight;  // [G, D], widened
  int64_t G, D;
  acc_t eps;

  GateArgs(const at::Tensor& key, const at::Tensor& hidden, const at::Tensor& wk, const at::Tensor& wq,
           std::optional<double> eps_opt)
      : keys(rows4<scalar_t>(key)), queries(rows4<scalar_t>(hidden)), key_weight(widen_tensor<scalar_t>(wk)), query_weight(widen_tensor<scalar_t>(wq)),
        G(key.size(2)), D(key.size(3)), eps(resolve_eps<scalar_t>(eps_opt)) {}
};

// The kernels below take the ISA level they are compiled for (run_for_isa)
// as kIsa; it sets the vector width of the row reductions.
template <cpu::CpuIsa kIsa>
constexpr int kVectorBytes = cpu::cpu_isa_vector_bytes(kIsa);

// gate[r] for the (token, branch) rows r in [begin, end).
template <cpu::CpuIsa kIsa, typename scalar_t>
void gate_forward_rows(const GateArgs<scalar_t>& a, int64_t begin, int64_t end, scalar_t* gate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D;
  std::vector<acc_t> key_row(D), query_row(D);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t g = r % a.G;
    const auto st = gate_row_state<acc_t, kVectorBytes<kIsa>>(
        widen(a.keys.row(r), D, key_row.data()), widen(a.queries.row(r), D, query_row.data()),
        a.key_weight.data() + g * D, a.query_weight.data() + g * D, D, a.eps);
    gate[r] = static_cast<scalar_t>(gate_from_score(st.score));
  }
}

// Gradients of rows [begin, end); the norm weight gradients are added to
// grad_key_weight / grad_query_weight ([G, D] each, acc_t).
template <cpu::CpuIsa kIsa, typename scalar_t>
void gate_backward_rows(const GateArgs<scalar_t>& a, const scalar_t* grad_gate, int64_t begin, int64_t end,
                        scalar_t* grad_key, scalar_t* grad_query, at::opmath_type<scalar_t>* grad_key_weight,
                        at::opmath_type<scalar_t>* grad_query_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D;
  std::vector<acc_t> key_row(D), query_row(D), grad_key_row(D), grad_query_row(D);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t g = r % a.G;
    acc_t* dk = result_row(grad_key + r * D, grad_key_row.data());
    acc_t* dq = result_row(grad_query + r * D, grad_query_row.data());
    gate_row_backward<acc_t, kVectorBytes<kIsa>>(
        static_cast<acc_t>(grad_gate[r]), widen(a.keys.row(r), D, key_row.data()),
        widen(a.queries.row(r), D, query_row.data()), a.key_weight.data() + g * D, a.query_weight.data() + g * D, D,
        a.eps, dk, dq, grad_key_weight + g * D, grad_query_weight + g * D);
    store_row(dk, D, grad_key + r * D);
    store_row(dq, D, grad_query + r * D);
  }
}

at::Tensor context_gate_cpu(const at::Tensor& key_in, const at::Tensor& hidden_in, const at::Tensor& key_norm_weight,
                            const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  const auto shape =
      check_context_gate_args("context_gate", key_in, hidden_in, key_norm_weight, hidden_norm_weight, eps);
  const int64_t B = shape[0], T = shape[1], G = shape[2], D = shape[3];
  const at::Tensor key = rows_contiguous(key_in), hidden = rows_contiguous(hidden_in);
  at::Tensor gate = at::empty({B, T, G}, key.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "context_gate", [&] {
    const GateArgs<scalar_t> args(key, hidden, key_norm_weight, hidden_norm_weight, eps);
    scalar_t* out = gate.data_ptr<scalar_t>();
    const cpu::CpuIsa isa = cpu::current_cpu_isa();
    at::parallel_for(0, B * T * G, rows_per_chunk(2 * D), [&](int64_t begin, int64_t end) {
      cpu::run_for_isa(isa, [&](auto level) { gate_forward_rows<decltype(level)::value>(args, begin, end, out); });
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
  at::Tensor grad_key = at::empty({B, T, G, D}, key.options());
  at::Tensor grad_hidden = at::empty({B, T, G, D}, key.options());
  at::Tensor grad_key_weight, grad_hidden_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "context_gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateArgs<scalar_t> args(key, hidden, key_norm_weight, hidden_norm_weight, eps);
    const scalar_t* gg = grad_gate.const_data_ptr<scalar_t>();
    scalar_t* dk = grad_key.data_ptr<scalar_t>();
    scalar_t* dq = grad_hidden.data_ptr<scalar_t>();
    // Per block: [grad_key_weight (G*D) | grad_hidden_weight (G*D)].
    const TokenBlocks blocks = token_blocks(B * T);
    at::Tensor partials = at::zeros({blocks.count, 2 * G * D}, key.options().dtype(acc_dtype<scalar_t>()));
    acc_t* partial_ptr = partials.data_ptr<acc_t>();
    const cpu::CpuIsa isa = cpu::current_cpu_isa();
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      cpu::run_for_isa(isa, [&](auto level) {
        for (int64_t block = block_begin; block < block_end; ++block) {
          acc_t* dwk = partial_ptr + block * 2 * G * D;
          gate_backward_rows<decltype(level)::value>(args, gg, blocks.begin(block) * G, blocks.begin(block + 1) * G,
                                                     dk, dq, dwk, dwk + G * D);
        }
      });
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

// The block's inputs, read-only; value rows may be strided.
template <typename scalar_t>
struct ShortConvArgs {
  using acc_t = at::opmath_type<scalar_t>;
  ShortConvShape s;
  const scalar_t* value;
  int64_t value_stride_b, value_stride_t;
  const scalar_t* gate;            // [tokens, G]
  std::vector<acc_t> norm_weight;  // [G, D], widened
  std::vector<acc_t> taps;         // conv weight as [kernel_size, C]: contiguous channels per tap
  acc_t eps;

  ShortConvArgs(const ShortConvShape& shape, const at::Tensor& v, const at::Tensor& g, const at::Tensor& w,
                const at::Tensor& conv_weight, double eps_value)
      : s(shape), value(v.const_data_ptr<scalar_t>()), value_stride_b(v.stride(0)), value_stride_t(v.stride(1)),
        gate(g.const_data_ptr<scalar_t>()), norm_weight(widen_tensor<scalar_t>(w)),
        taps(shape.kernel_size * shape.C), eps(static_cast<acc_t>(eps_value)) {
    const std::vector<acc_t> by_channel = widen_tensor<scalar_t>(conv_weight);  // [C, kernel_size]
    for (int64_t c = 0; c < s.C; ++c) {
      for (int64_t i = 0; i < s.kernel_size; ++i) taps[i * s.C + c] = by_channel[c * s.kernel_size + i];
    }
  }

  const scalar_t* value_row(int64_t tok) const {
    return value + (tok / s.T) * value_stride_b + (tok % s.T) * value_stride_t;
  }
};

// The tokens are processed in chunks whose normalised rows u (and, in
// backward, dy) fit in L2 together with the conv's reach on either side; the
// reach is recomputed per chunk instead of materialising [tokens, C] buffers.
constexpr int64_t kChunkElements = 1 << 17;

int64_t chunk_tokens(const ShortConvShape& s) {
  return std::max<int64_t>(4, kChunkElements / s.C);
}

// Lags of T or more never reach a token of the same sequence.
int64_t conv_reach(const ShortConvShape& s) {
  return std::min(conv_tap_lag(0, s.kernel_size, s.dilation), s.T);
}

// sigmoid of n values through ATen's vectorised kernel (a SIMD exp the
// portable loops here do not get from the compiler). Out of line: ATen picks
// its own CPU kernel (ATEN_CPU_CAPABILITY), whatever engram's ISA level.
template <typename acc_t>
ENGRAM_NOINLINE void sigmoid_block(const acc_t* x, int64_t n, acc_t* out) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor out_view = at::from_blob(out, {n}, options);
  at::sigmoid_out(out_view, at::from_blob(const_cast<acc_t*>(x), {n}, options));
}

// u[tok - first] = RMSNorm_g(gate * value[tok]) * norm_weight for tok in
// [first, last), all branches; scales[(tok - first) * G + g] = 1 / rms if asked.
template <cpu::CpuIsa kIsa, typename scalar_t>
void normalize_gated_tokens(const ShortConvArgs<scalar_t>& a, int64_t first, int64_t last,
                                              at::opmath_type<scalar_t>* u, at::opmath_type<scalar_t>* scales,
                                              at::opmath_type<scalar_t>* value_buffer) {
  using acc_t = at::opmath_type<scalar_t>;
  const ShortConvShape& s = a.s;
  for (int64_t tok = first; tok < last; ++tok) {
    const acc_t* v = widen(a.value_row(tok), s.D, value_buffer);
    const acc_t sum_sq = sum_of_squares<acc_t, kVectorBytes<kIsa>>(v, s.D);
    for (int64_t g = 0; g < s.G; ++g) {
      const acc_t gate = static_cast<acc_t>(a.gate[tok * s.G + g]);
      const acc_t scale = gated_rms_scale(gate, sum_sq, s.D, a.eps);
      if (scales) scales[(tok - first) * s.G + g] = scale;
      const acc_t factor = gate * scale;
      const acc_t* w = a.norm_weight.data() + g * s.D;
      acc_t* dst = u + (tok - first) * s.C + g * s.D;
      for (int64_t c = 0; c < s.D; ++c) dst[c] = v[c] * factor * w[c];
    }
  }
}

// y[tok - first] = sum_i taps[i] * u[tok - lag_i] for tok in [first, last)
// (zero history before t = 0); u holds rows from token u_first on.
template <typename acc_t>
void causal_conv_tokens(const ShortConvShape& s, const acc_t* taps, const acc_t* u, int64_t u_first,
                                          int64_t first, int64_t last, acc_t* y) {
  for (int64_t tok = first; tok < last; ++tok) {
    const int64_t t = tok % s.T;
    acc_t* dst = y + (tok - first) * s.C;
    std::fill(dst, dst + s.C, acc_t(0));
    for (int64_t i = 0; i < s.kernel_size; ++i) {
      const int64_t lag = conv_tap_lag(i, s.kernel_size, s.dilation);
      if (t < lag) continue;
      const acc_t* w = taps + i * s.C;
      const acc_t* src = u + (tok - lag - u_first) * s.C;
      for (int64_t c = 0; c < s.C; ++c) dst[c] += w[c] * src[c];
    }
  }
}

// Scratch a thread keeps between calls, up to this size: a fresh block per
// call cost more than the kernel at small batches (zero-filled, and page
// faults once glibc hands ~0.5 MB back to the OS after each pass).
constexpr size_t kKeptScratchBytes = size_t(8) << 20;

// Per-thread scratch rows of one chunk, uninitialised: every row is written
// before it is read.
template <typename acc_t>
struct ShortConvScratch {
  struct Rows {
    acc_t* ptr = nullptr;
    acc_t* data() const { return ptr; }
    acc_t& operator[](int64_t i) const { return ptr[i]; }
  };
  Rows u, scales, y, sig, value_row, row_a, row_b;
  std::unique_ptr<acc_t[]> owned;  // when larger than what a thread keeps

  ShortConvScratch(const ShortConvShape& s, int64_t chunk, int64_t reach) {
    const int64_t sizes[] = {(chunk + 2 * reach) * s.C, (chunk + 2 * reach) * s.G, (chunk + reach) * s.C,
                             (chunk + reach) * s.C, s.D, s.C, s.C};
    Rows* rows[] = {&u, &scales, &y, &sig, &value_row, &row_a, &row_b};
    size_t total = 0;
    for (int64_t n : sizes) total += static_cast<size_t>(n);
    thread_local std::vector<acc_t> kept;
    acc_t* next;
    if (total * sizeof(acc_t) <= kKeptScratchBytes) {
      if (kept.size() < total) kept.resize(total);
      next = kept.data();
    } else {
      owned.reset(new acc_t[total]);
      next = owned.get();
    }
    for (size_t i = 0; i < std::size(sizes); ++i) {
      rows[i]->ptr = next;
      next += sizes[i];
    }
  }
};

// out = gate * value + SiLU(conv(u)) for tokens [first, last).
template <cpu::CpuIsa kIsa, typename scalar_t>
void short_conv_forward_chunk(const ShortConvArgs<scalar_t>& a, int64_t first, int64_t last,
                                                ShortConvScratch<at::opmath_type<scalar_t>>& w, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const ShortConvShape& s = a.s;
  const int64_t C = s.C;
  const int64_t u_first = std::max<int64_t>(first - conv_reach(s), 0);
  normalize_gated_tokens<kIsa>(a, u_first, last, w.u.data(), nullptr, w.value_row.data());
  causal_conv_tokens(s, a.taps.data(), w.u.data(), u_first, first, last, w.y.data());
  sigmoid_block(w.y.data(), (last - first) * C, w.sig.data());
  for (int64_t tok = first; tok < last; ++tok) {
    const acc_t* v = widen(a.value_row(tok), s.D, w.value_row.data());
    acc_t* out_row = result_row(out + tok * C, w.row_a.data());
    for (int64_t g = 0; g < s.G; ++g) {
      const acc_t gate = static_cast<acc_t>(a.gate[tok * s.G + g]);
      const int64_t offset = (tok - first) * C + g * s.D;
      const acc_t* y = w.y.data() + offset;
      const acc_t* sig = w.sig.data() + offset;
      acc_t* dst = out_row + g * s.D;
      for (int64_t c = 0; c < s.D; ++c) dst[c] = gate * v[c] + silu_from_sigmoid(y[c], sig[c]);
    }
    store_row(out_row, C, out + tok * C);
  }
}

// Backward of tokens [first, last): writes grad_value and grad_gate rows,
// adds to the conv weight gradient (tap-major [kernel_size, C]) and the norm
// weight gradient ([G, D]), both acc_t.
template <cpu::CpuIsa kIsa, typename scalar_t>
void short_conv_backward_chunk(const ShortConvArgs<scalar_t>& a, const scalar_t* grad_out,
                                                 int64_t first, int64_t last,
                                                 ShortConvScratch<at::opmath_type<scalar_t>>& w,
                                                 scalar_t* grad_value, scalar_t* grad_gate,
                                                 at::opmath_type<scalar_t>* grad_taps,
                                                 at::opmath_type<scalar_t>* grad_norm_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const ShortConvShape& s = a.s;
  const int64_t C = s.C, K = s.kernel_size, T = s.T, D = s.D, reach = conv_reach(s);
  // u covers [first - reach, last + reach): dy at t reads u back to t - reach,
  // and d u at t reads dy up to t + reach.
  const int64_t u_first = std::max<int64_t>(first - reach, 0);
  const int64_t dy_last = std::min(last + reach, s.tokens());
  normalize_gated_tokens<kIsa>(a, u_first, dy_last, w.u.data(), w.scales.data(), w.value_row.data());

  // dy = grad_out * SiLU'(y) for tokens [first, dy_last), in place of y.
  acc_t* dy = w.y.data();
  const int64_t dy_count = (dy_last - first) * C;
  causal_conv_tokens(s, a.taps.data(), w.u.data(), u_first, first, dy_last, dy);
  sigmoid_block(dy, dy_count, w.sig.data());
  const scalar_t* go_rows = grad_out + first * C;
  for (int64_t i = 0; i < dy_count; ++i) {
    dy[i] = static_cast<acc_t>(go_rows[i]) * silu_grad_from_sigmoid(dy[i], w.sig[i]);
  }

  acc_t* du = w.row_a.data();
  for (int64_t tok = first; tok < last; ++tok) {
    const int64_t t = tok % T;
    const acc_t* dy_row = dy + (tok - first) * C;
    std::fill(du, du + C, acc_t(0));
    for (int64_t i = 0; i < K; ++i) {
      const int64_t lag = conv_tap_lag(i, K, s.dilation);
      if (t >= lag) {  // d w[c, i] += dy[t, c] * u[t - lag, c]
        const acc_t* u_row = w.u.data() + (tok - lag - u_first) * C;
        acc_t* dw = grad_taps + i * C;
        for (int64_t c = 0; c < C; ++c) dw[c] += dy_row[c] * u_row[c];
      }
      if (t + lag < T) {  // d u[t, c] += w[c, i] * dy[t + lag, c]
        const acc_t* taps = a.taps.data() + i * C;
        const acc_t* dy_ahead = dy + (tok + lag - first) * C;
        for (int64_t c = 0; c < C; ++c) du[c] += taps[c] * dy_ahead[c];
      }
    }
    // RMSNorm and gating backward of each branch row.
    const acc_t* v = widen(a.value_row(tok), D, w.value_row.data());
    const acc_t* go_row = widen(grad_out + tok * C, C, w.row_b.data());
    acc_t* dv = result_row(grad_value + tok * D, w.sig.data());  // sig is free again
    std::fill(dv, dv + D, acc_t(0));
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t row = tok * s.G + g;
      grad_gate[row] = static_cast<scalar_t>(gated_norm_row_backward<acc_t, kVectorBytes<kIsa>>(
          static_cast<acc_t>(a.gate[row]), v, w.scales[(tok - u_first) * s.G + g], a.norm_weight.data() + g * D,
          du + g * D, go_row + g * D, D, dv, grad_norm_weight + g * D));
    }
    store_row(dv, D, grad_value + tok * D);
  }
}

ShortConvShape short_conv_shape(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                const at::Tensor& norm_weight, const at::Tensor& conv_weight, int64_t dilation,
                                double eps) {
  const auto shape = check_gated_short_conv_args(op, value, gate, norm_weight, conv_weight, dilation, eps);
  const int64_t G = shape[2], D = shape[3], T = shape[1];
  // A tap whose lag reaches past the sequence start reads only zeros, so
  // dilation T gives the same result as any larger one; clamping keeps the
  // conv reach, and with it the scratch rows, within the sequence.
  return {shape[0], T, G, D, G * D, shape[4], std::min(dilation, T)};
}

at::Tensor gated_short_conv_cpu(const at::Tensor& value_in, const at::Tensor& gate_in, const at::Tensor& norm_weight,
                                const at::Tensor& conv_weight, int64_t dilation, double eps) {
  const ShortConvShape s =
      short_conv_shape("gated_short_conv", value_in, gate_in, norm_weight, conv_weight, dilation, eps);
  const at::Tensor value = rows_contiguous(value_in), gate = gate_in.contiguous();
  at::Tensor out = at::empty({s.B, s.T, s.G, s.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "gated_short_conv", [&] {
    const ShortConvArgs<scalar_t> args(s, value, gate, norm_weight, conv_weight, eps);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t chunk = chunk_tokens(s);
    const int64_t num_chunks = (s.tokens() + chunk - 1) / chunk;
    const cpu::CpuIsa isa = cpu::current_cpu_isa();
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      ShortConvScratch<at::opmath_type<scalar_t>> scratch(s, chunk, conv_reach(s));
      cpu::run_for_isa(isa, [&](auto level) {
        for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
          short_conv_forward_chunk<decltype(level)::value>(args, ci * chunk, std::min((ci + 1) * chunk, s.tokens()),
                                                           scratch, out_ptr);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_short_conv_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& gate_in,
    const at::Tensor& norm_weight, const at::Tensor& conv_weight, int64_t dilation, double eps) {
  constexpr const char* op = "gated_short_conv_backward";
  const ShortConvShape s = short_conv_shape(op, value_in, gate_in, norm_weight, conv_weight, dilation, eps);
  check_grad_like(op, "grad_out", grad_out_in, value_in, {s.B, s.T, s.G, s.D});
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor value = rows_contiguous(value_in), gate = gate_in.contiguous();
  at::Tensor grad_value = at::empty({s.B, s.T, s.D}, value.options());
  at::Tensor grad_gate = at::empty({s.B, s.T, s.G}, value.options());
  at::Tensor grad_norm_weight, grad_conv_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "gated_short_conv_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ShortConvArgs<scalar_t> args(s, value, gate, norm_weight, conv_weight, eps);
    const int64_t C = s.C, K = s.kernel_size, chunk = chunk_tokens(s);
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dv = grad_value.data_ptr<scalar_t>();
    scalar_t* dgate = grad_gate.data_ptr<scalar_t>();
    // Per block: [conv weight grad (K*C, tap-major) | norm weight grad (C)].
    const TokenBlocks blocks = token_blocks(s.tokens());
    at::Tensor partials = at::zeros({blocks.count, (K + 1) * C}, value.options().dtype(acc_dtype<scalar_t>()));
    acc_t* partial_ptr = partials.data_ptr<acc_t>();
    const cpu::CpuIsa isa = cpu::current_cpu_isa();
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      ShortConvScratch<acc_t> scratch(s, chunk, conv_reach(s));
      cpu::run_for_isa(isa, [&](auto level) {
        for (int64_t block = block_begin; block < block_end; ++block) {
          acc_t* grad_taps = partial_ptr + block * (K + 1) * C;
          const int64_t block_last = blocks.begin(block + 1);
          for (int64_t first = blocks.begin(block); first < block_last; first += chunk) {
            short_conv_backward_chunk<decltype(level)::value>(args, go, first, std::min(first + chunk, block_last),
                                                              scratch, dv, dgate, grad_taps, grad_taps + K * C);
          }
        }
      });
    });
    const at::Tensor weight_grads = sum_block_partials<acc_t>(partials, value.scalar_type());
    // [K, C] tap-major -> [C, K], the layout of conv_weight.
    grad_conv_weight = weight_grads.narrow(0, 0, K * C).view({K, C}).t().contiguous();
    grad_norm_weight = weight_grads.narrow(0, K * C, C).view({s.G, s.D}).clone();
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
