// The CUDA kernels of the layer ops (kernels/layer_cuda.cuh), run on the CPU
// in the SIMT emulator (tests/cpp/simt.h) at the launch shapes of
// csrc/cuda/layer_ops.cu: blocks of 256 threads, 32 lanes per row with the
// xor-shuffle sums, grid-stride loops (also wrapped, with the grid capped at
// 2 blocks). It checks each kernel's math, indexing and chunked reductions
// against a plain double-precision statement of spec §5-6 and its
// finite-difference gradients, and against the CPU row functions of
// kernels/layer_math.h, for float, double and a bfloat16 stand-in (16-bit
// storage, float math). The real c10::Half / c10::BFloat16 are left to
// tests/test_layer_cuda.py on a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "tests/cpp/simt.h"
// clang-format off: the emulator must come first
#include "kernels/layer_cuda.cuh"
// clang-format on

namespace {

using namespace engram;
using namespace engram::cuda_layer;

static_assert(kRowLanes == 32, "the emulator runs a warp per row");

int64_t g_block_cap = 65535;

// A launch as csrc/cuda/layer_ops.cu makes it: blocks_for(threads) blocks of kThreads.
template <typename F>
void launch_1d(int64_t threads, F body) {
  simt::launch(blocks_for(threads, g_block_cap), kThreads, body);
}

// The 2-D launch of the (token, d) kernels: x over d, y over tokens.
template <typename F>
void launch_tokens_d(int64_t tokens, int64_t D, F body) {
  simt::launch(simt::Dim3(blocks_for(D, g_block_cap), token_blocks(tokens, g_block_cap)), kThreads, body);
}

struct BlockCap {
  explicit BlockCap(int64_t cap) { g_block_cap = cap; }
  ~BlockCap() { g_block_cap = 65535; }
};

// A bfloat16 stand-in (round to nearest even, no NaN handling): storage that
// is not the accumulation type, as c10::BFloat16 and c10::Half are on the GPU.
struct MockBFloat16 {
  uint16_t bits;
  MockBFloat16() = default;
  MockBFloat16(float f) {  // NOLINT: implicit, like c10::BFloat16
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  MockBFloat16(double d) : MockBFloat16(static_cast<float>(d)) {}  // NOLINT
  operator float() const {  // NOLINT
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

// at::opmath_type: float for 16-bit storage, the type itself otherwise.
template <typename T>
struct AccOf {
  using type = T;
};
template <>
struct AccOf<MockBFloat16> {
  using type = float;
};

std::vector<double> random_values(size_t n, double lo, double hi, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

// Values as stored in scalar_t, read back as double: the oracle sees exactly
// the kernel's inputs.
template <typename T>
std::vector<double> rounded(std::vector<double> v) {
  for (double& x : v) x = static_cast<double>(static_cast<T>(x));
  return v;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// d sum(weights * f(x)) / dx by central differences of a double function.
std::vector<double> numeric_gradient(std::vector<double>& x, const std::function<double()>& loss) {
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i], h = 1e-6 * std::max(1.0, std::fabs(saved));
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double atol, double rtol,
                  const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool ok = std::fabs(got[i] - want[i]) <= atol + rtol * std::fabs(want[i]);
    EXPECT_TRUE(ok) << what << "[" << i << "] = " << got[i] << ", expected " << want[i];
    if (!ok && ++reported >= 5) return;
  }
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <typename T>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double atol = 2e-4, rtol = 2e-3;
};
template <>
struct Tolerance<MockBFloat16> {  // outputs rounded once to 8 significant bits
  static constexpr double atol = 4e-3, rtol = 8e-3;
};
template <>
struct Tolerance<double> {
  static constexpr double atol = 1e-7, rtol = 1e-6;  // finite differences, not the kernel, limit this
};

// ---------------------------------------------------------------------------
// Context gate (spec §5)
// ---------------------------------------------------------------------------

struct GateShape {
  int64_t B, T, G, D;
  double eps;
};

// gate[r] of rows r = (b, t, g); key, hidden [B, T, G, D], weights [G, D].
std::vector<double> gate_oracle(const GateShape& s, const std::vector<double>& key, const std::vector<double>& hidden,
                                const std::vector<double>& wk, const std::vector<double>& wq) {
  const int64_t rows = s.B * s.T * s.G;
  std::vector<double> gate(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r % s.G;
    double kk = 0, qq = 0;
    for (int64_t d = 0; d < s.D; ++d) {
      kk += key[r * s.D + d] * key[r * s.D + d];
      qq += hidden[r * s.D + d] * hidden[r * s.D + d];
    }
    const double rk = 1 / std::sqrt(kk / s.D + s.eps), rq = 1 / std::sqrt(qq / s.D + s.eps);
    double dot = 0;
    for (int64_t d = 0; d < s.D; ++d) {
      dot += key[r * s.D + d] * rk * wk[g * s.D + d] * hidden[r * s.D + d] * rq * wq[g * s.D + d];
    }
    const double score = dot / std::sqrt(static_cast<double>(s.D));
    const double root = std::sqrt(std::max(std::fabs(score), 1e-6));
    const double signed_root = score > 0 ? root : (score < 0 ? -root : 0.0);
    gate[r] = 1 / (1 + std::exp(-signed_root));
  }
  return gate;
}

struct GateResults {
  std::vector<double> gate, grad_key, grad_hidden, grad_key_weight, grad_hidden_weight;
};

// Runs the kernels the way csrc/cuda/layer_ops.cu launches them. key and
// hidden are stored with padded rows (stride_g = D + 3) to exercise Rows4.
template <typename T>
GateResults run_gate_kernels(const GateShape& s, const std::vector<double>& key, const std::vector<double>& hidden,
                             const std::vector<double>& wk, const std::vector<double>& wq,
                             const std::vector<double>& grad_gate, int64_t tokens_per_chunk) {
  const int64_t rows = s.B * s.T * s.G, pitch = s.D + 3, tokens = s.B * s.T;
  std::vector<T> key_buf(rows * pitch, T(-7.0)), hidden_buf(rows * pitch, T(-7.0));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < s.D; ++d) {
      key_buf[r * pitch + d] = static_cast<T>(key[r * s.D + d]);
      hidden_buf[r * pitch + d] = static_cast<T>(hidden[r * s.D + d]);
    }
  }
  const std::vector<T> wk_t = cast<T>(wk), wq_t = cast<T>(wq), gg = cast<T>(grad_gate);
  GateArgs<T> a;
  a.keys = {key_buf.data(), s.T * s.G * pitch, s.G * pitch, pitch, s.T, s.G};
  a.queries = {hidden_buf.data(), s.T * s.G * pitch, s.G * pitch, pitch, s.T, s.G};
  a.key_weight = wk_t.data();
  a.query_weight = wq_t.data();
  a.rows = rows;
  a.G = s.G;
  a.D = s.D;
  using A = typename AccOf<T>::type;
  const A eps = static_cast<A>(s.eps);

  std::vector<T> gate(rows, T(-1.0)), dk(rows * s.D, T(-1.0)), dq(rows * s.D, T(-1.0));
  std::vector<A> stats(rows * kGateStats, A(-1));
  launch_1d(rows * kRowLanes, [&] { context_gate_kernel<T, A>(a, eps, gate.data()); });
  launch_1d(rows * kRowLanes, [&] {
    context_gate_backward_rows_kernel<T, A>(a, gg.data(), eps, dk.data(), dq.data(), stats.data());
  });
  const int64_t chunks = chunk_count(tokens, tokens_per_chunk), n = 2 * s.G * s.D;
  std::vector<A> partial(chunks * n, A(-1));
  std::vector<T> total(n, T(-1.0));
  // as csrc/cuda/layer_ops.cu launches it: x over G * D, y over chunks, z the two sides
  simt::launch(simt::Dim3(blocks_for(s.G * s.D, g_block_cap), token_blocks(chunks, g_block_cap), 2), kThreads, [&] {
    context_gate_weight_partials_kernel<T, A>(a, stats.data(), tokens, tokens_per_chunk, chunks, partial.data());
  });
  launch_1d(n, [&] { sum_chunks_kernel<A, T>(partial.data(), chunks, n, total.data()); });

  GateResults out;
  out.gate = widen(gate);
  out.grad_key = widen(dk);
  out.grad_hidden = widen(dq);
  out.grad_key_weight.assign(total.begin(), total.begin() + s.G * s.D);
  out.grad_hidden_weight.assign(total.begin() + s.G * s.D, total.end());
  return out;
}

template <typename T>
void check_gate(const GateShape& s, int64_t tokens_per_chunk, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "B=" << s.B << " T=" << s.T << " G=" << s.G << " D=" << s.D << " eps=" << s.eps
                                  << " chunk=" << tokens_per_chunk);
  std::mt19937_64 rng(seed);
  const int64_t rows = s.B * s.T * s.G;
  std::vector<double> key = rounded<T>(random_values(rows * s.D, -1, 1, rng));
  std::vector<double> hidden = rounded<T>(random_values(rows * s.D, -1, 1, rng));
  std::vector<double> wk = rounded<T>(random_values(s.G * s.D, 0.5, 1.5, rng));
  std::vector<double> wq = rounded<T>(random_values(s.G * s.D, 0.5, 1.5, rng));
  const std::vector<double> grad_gate = rounded<T>(random_values(rows, -1, 1, rng));

  const GateResults got = run_gate_kernels<T>(s, key, hidden, wk, wq, grad_gate, tokens_per_chunk);
  const double atol = Tolerance<T>::atol, rtol = Tolerance<T>::rtol;
  expect_close(got.gate, gate_oracle(s, key, hidden, wk, wq), atol, rtol, "gate");

  const auto loss = [&] {
    const std::vector<double> gate = gate_oracle(s, key, hidden, wk, wq);
    double sum = 0;
    for (int64_t r = 0; r < rows; ++r) sum += grad_gate[r] * gate[r];
    return sum;
  };
  expect_close(got.grad_key, numeric_gradient(key, loss), atol, rtol, "grad_key");
  expect_close(got.grad_hidden, numeric_gradient(hidden, loss), atol, rtol, "grad_hidden");
  expect_close(got.grad_key_weight, numeric_gradient(wk, loss), atol, rtol, "grad_key_norm_weight");
  expect_close(got.grad_hidden_weight, numeric_gradient(wq, loss), atol, rtol, "grad_hidden_norm_weight");
}

const GateShape kGateShapes[] = {
    {1, 1, 1, 1, 1e-6},    // T = 1, D = 1
    {2, 3, 2, 37, 1e-5},   // G > 1, D not a multiple of 32
    {1, 5, 3, 64, 1e-6},   // D a multiple of 32
    {3, 1, 1, 33, 0.25},   // T = 1, an eps that matters
    {2, 4, 2, 5, 1e-5},
};

TEST(LayerCudaMock, ContextGateFloat) {
  uint64_t seed = 1;
  for (const GateShape& s : kGateShapes) {
    check_gate<float>(s, 3, seed++);
    check_gate<float>(s, kTokensPerChunk, seed++);
  }
}

// The grid capped at 2 blocks of 256 threads (8 rows each): every row loop wraps.
TEST(LayerCudaMock, ContextGateGridStrideWrap) {
  const BlockCap cap(2);
  check_gate<float>({3, 7, 2, 45, 1e-5}, 4, 11);
  check_gate<double>({2, 9, 1, 20, 1e-6}, 2, 12);
}

TEST(LayerCudaMock, ContextGateDouble) {
  uint64_t seed = 100;
  for (const GateShape& s : kGateShapes) {
    check_gate<double>(s, 1, seed++);
    check_gate<double>(s, 2, seed++);
    check_gate<double>(s, kTokensPerChunk, seed++);
  }
}

// 16-bit storage: inputs read through static_cast<acc_t>, float math, every
// output rounded once.
TEST(LayerCudaMock, ContextGateBFloat16Storage) {
  uint64_t seed = 300;
  for (const GateShape& s : kGateShapes) check_gate<MockBFloat16>(s, 2, seed++);
  // Sums over many tokens: bf16 partial sums would be off by several ulps.
  check_gate<MockBFloat16>({2, 64, 2, 16, 1e-5}, kTokensPerChunk, seed++);
}

// The kernels and the CPU row function (gate_row_backward of layer_math.h)
// agree, including the signed-sqrt convention at score 0: a zero hidden row
// gives gate 1/2 and no gradient at all.
TEST(LayerCudaMock, ContextGateMatchesCpuRowsAndZeroScoreConvention) {
  const GateShape s = {2, 3, 2, 19, 1e-6};
  std::mt19937_64 rng(7);
  const int64_t rows = s.B * s.T * s.G;
  std::vector<double> key = random_values(rows * s.D, -1, 1, rng);
  std::vector<double> hidden = random_values(rows * s.D, -1, 1, rng);
  const std::vector<double> wk = random_values(s.G * s.D, 0.5, 1.5, rng), wq = random_values(s.G * s.D, 0.5, 1.5, rng);
  const std::vector<double> grad_gate = random_values(rows, -1, 1, rng);
  const int64_t zero_row = 3;
  std::fill(hidden.begin() + zero_row * s.D, hidden.begin() + (zero_row + 1) * s.D, 0.0);

  const GateResults got = run_gate_kernels<double>(s, key, hidden, wk, wq, grad_gate, 2);
  std::vector<double> wk_grad(s.G * s.D, 0.0), wq_grad(s.G * s.D, 0.0), dk(s.D), dq(s.D);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r % s.G;
    const auto st = gate_row_state<double>(&key[r * s.D], &hidden[r * s.D], &wk[g * s.D], &wq[g * s.D], s.D, s.eps);
    EXPECT_NEAR(got.gate[r], gate_from_score(st.score), 1e-14) << "row " << r;
    gate_row_backward<double>(grad_gate[r], &key[r * s.D], &hidden[r * s.D], &wk[g * s.D], &wq[g * s.D], s.D, s.eps,
                              dk.data(), dq.data(), &wk_grad[g * s.D], &wq_grad[g * s.D]);
    for (int64_t d = 0; d < s.D; ++d) {
      EXPECT_NEAR(got.grad_key[r * s.D + d], dk[d], 1e-12) << "row " << r << " d " << d;
      EXPECT_NEAR(got.grad_hidden[r * s.D + d], dq[d], 1e-12) << "row " << r << " d " << d;
      if (r == zero_row) {
        EXPECT_EQ(got.grad_key[r * s.D + d], 0.0);
        EXPECT_EQ(got.grad_hidden[r * s.D + d], 0.0);
      }
    }
  }
  EXPECT_EQ(got.gate[zero_row], 0.5);
  expect_close(got.grad_key_weight, wk_grad, 1e-12, 1e-12, "grad_key_norm_weight");
  expect_close(got.grad_hidden_weight, wq_grad, 1e-12, 1e-12, "grad_hidden_norm_weight");
}

// ---------------------------------------------------------------------------
// Gated short convolution (spec §5-6)
// ---------------------------------------------------------------------------

struct ConvShape {
  int64_t B, T, G, D, K, dilation;
  double eps;
};

// out [B, T, G, D]; value [B, T, D], gate [B, T, G], norm_weight [G, D],
// conv_weight [G*D, K]. Taps reaching before t = 0 read zeros.
std::vector<double> conv_oracle(const ConvShape& s, const std::vector<double>& value, const std::vector<double>& gate,
                                const std::vector<double>& nw, const std::vector<double>& cw) {
  const int64_t tokens = s.B * s.T, C = s.G * s.D;
  std::vector<double> x(tokens * C), u(tokens * C), out(tokens * C);
  for (int64_t tok = 0; tok < tokens; ++tok) {
    for (int64_t g = 0; g < s.G; ++g) {
      double sq = 0;
      for (int64_t d = 0; d < s.D; ++d) {
        const double xv = gate[tok * s.G + g] * value[tok * s.D + d];
        x[tok * C + g * s.D + d] = xv;
        sq += xv * xv;
      }
      const double scale = 1 / std::sqrt(sq / s.D + s.eps);
      for (int64_t d = 0; d < s.D; ++d) {
        u[tok * C + g * s.D + d] = x[tok * C + g * s.D + d] * scale * nw[g * s.D + d];
      }
    }
  }
  for (int64_t tok = 0; tok < tokens; ++tok) {
    const int64_t t = tok % s.T;
    for (int64_t c = 0; c < C; ++c) {
      double y = 0;
      for (int64_t i = 0; i < s.K; ++i) {
        const int64_t src = t - (s.K - 1 - i) * s.dilation;
        if (src >= 0) y += cw[c * s.K + i] * u[(tok - t + src) * C + c];
      }
      out[tok * C + c] = x[tok * C + c] + y / (1 + std::exp(-y));
    }
  }
  return out;
}

struct ConvResults {
  std::vector<double> out, grad_value, grad_gate, grad_norm_weight, grad_conv_weight;
};

// Runs the kernels the way csrc/cuda/layer_ops.cu launches them, with value
// rows padded (stride_t = D + 2, stride_b = T * stride_t + 5) to exercise the
// strided reads.
template <typename T>
ConvResults run_conv_kernels(const ConvShape& s, const std::vector<double>& value, const std::vector<double>& gate,
                             const std::vector<double>& nw, const std::vector<double>& cw,
                             const std::vector<double>& grad_out, int64_t tokens_per_chunk) {
  // A gap between sequences too (batch_pitch > T * pitch): a kernel that
  // steps from one sequence into the next must use stride_b.
  const int64_t tokens = s.B * s.T, C = s.G * s.D, pitch = s.D + 2, batch_pitch = s.T * pitch + 5;
  std::vector<T> value_buf(s.B * batch_pitch, T(-7.0));
  for (int64_t tok = 0; tok < tokens; ++tok) {
    T* row = value_buf.data() + (tok / s.T) * batch_pitch + (tok % s.T) * pitch;
    for (int64_t d = 0; d < s.D; ++d) row[d] = static_cast<T>(value[tok * s.D + d]);
  }
  const std::vector<T> gate_t = cast<T>(gate), nw_t = cast<T>(nw), cw_t = cast<T>(cw), go = cast<T>(grad_out);
  ShortConvArgs<T> a;
  a.value = value_buf.data();
  a.value_stride_b = batch_pitch;
  a.value_stride_t = pitch;
  a.gate = gate_t.data();
  a.norm_weight = nw_t.data();
  a.conv_weight = cw_t.data();
  a.B = s.B;
  a.T = s.T;
  a.G = s.G;
  a.D = s.D;
  a.C = C;
  a.kernel_size = s.K;
  a.dilation = std::min(s.dilation, s.T);  // as the launcher clamps it
  using A = typename AccOf<T>::type;
  const A eps = static_cast<A>(s.eps);

  std::vector<A> scales(tokens * s.G, A(-1));
  std::vector<T> out(tokens * C, T(-1.0));
  launch_1d(tokens * kRowLanes, [&] { gated_rms_scales_kernel<T, A>(a, eps, scales.data()); });
  launch_tokens_d(tokens, s.D, [&] { gated_short_conv_kernel<T, A>(a, scales.data(), out.data()); });

  std::vector<A> dy(tokens * C, A(-1)), du(tokens * C, A(-1)), projection(tokens * s.G, A(-1));
  std::vector<T> grad_gate(tokens * s.G, T(-1.0)), grad_value(tokens * s.D, T(-1.0));
  launch_tokens_d(tokens, s.D, [&] { short_conv_grad_y_kernel<T, A>(a, scales.data(), go.data(), dy.data()); });
  launch_tokens_d(tokens, s.D, [&] { short_conv_grad_u_kernel<T, A>(a, dy.data(), du.data()); });
  launch_1d(tokens * s.G * kRowLanes, [&] {
    short_conv_norm_rows_kernel<T, A>(a, scales.data(), du.data(), go.data(), grad_gate.data(), projection.data());
  });
  launch_tokens_d(tokens, s.D, [&] {
    short_conv_grad_value_kernel<T, A>(a, scales.data(), du.data(), go.data(), projection.data(), grad_value.data());
  });
  const int64_t chunks = chunk_count(tokens, tokens_per_chunk), n = (s.K + 1) * C;
  std::vector<A> partial(chunks * n, A(-1));
  std::vector<T> total(n, T(-1.0));
  const simt::Dim3 partials_grid(blocks_for(C, g_block_cap), token_blocks(chunks, g_block_cap),
                                 static_cast<unsigned>(s.K + 1));  // as csrc/cuda/layer_ops.cu launches it
  simt::launch(partials_grid, kThreads, [&] {
    short_conv_weight_partials_kernel<T, A>(a, scales.data(), dy.data(), du.data(), tokens_per_chunk, chunks,
                                            partial.data());
  });
  launch_1d(n, [&] { sum_chunks_kernel<A, T>(partial.data(), chunks, n, total.data()); });

  ConvResults r;
  r.out = widen(out);
  r.grad_value = widen(grad_value);
  r.grad_gate = widen(grad_gate);
  r.grad_norm_weight.assign(total.begin() + s.K * C, total.end());
  r.grad_conv_weight.resize(C * s.K);  // tap-major -> [C, K]
  for (int64_t i = 0; i < s.K; ++i) {
    for (int64_t c = 0; c < C; ++c) r.grad_conv_weight[c * s.K + i] = total[i * C + c];
  }
  return r;
}

template <typename T>
void check_conv(const ConvShape& s, int64_t tokens_per_chunk, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "B=" << s.B << " T=" << s.T << " G=" << s.G << " D=" << s.D << " K=" << s.K
                                  << " dilation=" << s.dilation << " eps=" << s.eps << " chunk=" << tokens_per_chunk);
  std::mt19937_64 rng(seed);
  const int64_t tokens = s.B * s.T, C = s.G * s.D;
  std::vector<double> value = rounded<T>(random_values(tokens * s.D, -1, 1, rng));
  std::vector<double> gate = rounded<T>(random_values(tokens * s.G, 0.05, 1, rng));
  std::vector<double> nw = rounded<T>(random_values(s.G * s.D, 0.5, 1.5, rng));
  std::vector<double> cw = rounded<T>(random_values(C * s.K, -1, 1, rng));
  const std::vector<double> grad_out = rounded<T>(random_values(tokens * C, -1, 1, rng));

  const ConvResults got = run_conv_kernels<T>(s, value, gate, nw, cw, grad_out, tokens_per_chunk);
  const double atol = Tolerance<T>::atol, rtol = Tolerance<T>::rtol;
  expect_close(got.out, conv_oracle(s, value, gate, nw, cw), atol, rtol, "out");

  const auto loss = [&] {
    const std::vector<double> out = conv_oracle(s, value, gate, nw, cw);
    double sum = 0;
    for (size_t i = 0; i < out.size(); ++i) sum += grad_out[i] * out[i];
    return sum;
  };
  expect_close(got.grad_value, numeric_gradient(value, loss), atol, rtol, "grad_value");
  expect_close(got.grad_gate, numeric_gradient(gate, loss), atol, rtol, "grad_gate");
  expect_close(got.grad_norm_weight, numeric_gradient(nw, loss), atol, rtol, "grad_norm_weight");
  expect_close(got.grad_conv_weight, numeric_gradient(cw, loss), atol, rtol, "grad_conv_weight");
}

const ConvShape kConvShapes[] = {
    {1, 1, 1, 1, 4, 1, 1e-5},    // T = 1, D = 1
    {2, 5, 2, 37, 4, 2, 1e-5},   // G > 1, D not a multiple of 32
    {1, 6, 1, 33, 3, 9, 1e-5},   // dilation >= T: only the last tap reaches
    {2, 4, 3, 8, 1, 1, 0.5},     // kernel_size 1, an eps that matters
    {1, 7, 2, 32, 4, 3, 1e-6},
    {3, 1, 2, 5, 4, 100, 1e-5},  // T = 1 with a huge dilation
};

TEST(LayerCudaMock, GatedShortConvFloat) {
  uint64_t seed = 1000;
  for (const ConvShape& s : kConvShapes) {
    check_conv<float>(s, 3, seed++);
    check_conv<float>(s, kTokensPerChunk, seed++);
  }
}

TEST(LayerCudaMock, GatedShortConvGridStrideWrap) {
  const BlockCap cap(2);
  check_conv<float>({2, 9, 2, 40, 4, 2, 1e-5}, 4, 13);
  check_conv<double>({1, 20, 3, 11, 3, 1, 1e-6}, 3, 14);
}

TEST(LayerCudaMock, GatedShortConvDouble) {
  uint64_t seed = 2000;
  for (const ConvShape& s : kConvShapes) {
    check_conv<double>(s, 1, seed++);
    check_conv<double>(s, 4, seed++);
    check_conv<double>(s, kTokensPerChunk, seed++);
  }
}

TEST(LayerCudaMock, GatedShortConvBFloat16Storage) {
  uint64_t seed = 3000;
  for (const ConvShape& s : kConvShapes) check_conv<MockBFloat16>(s, 2, seed++);
  check_conv<MockBFloat16>({2, 64, 2, 16, 4, 2, 1e-5}, kTokensPerChunk, seed++);
}

}  // namespace
