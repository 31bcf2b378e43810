// GoogleTest for the torch-free row-wise optimizer math in kernels/optim_math.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/optim_math.h"

namespace {

using namespace engram::optim;

// Textbook statements in long double, the oracle for the rules.
struct AdamRef {
  long double w, m = 0, v = 0;
  void step(long double g, int t, long double lr, long double b1, long double b2, long double eps, long double wd,
            bool decoupled) {
    if (decoupled) {
      w *= 1 - lr * wd;
    } else {
      g += wd * w;
    }
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    const long double m_hat = m / (1 - std::pow(b1, t)), v_hat = v / (1 - std::pow(b2, t));
    // SparseAdam's form: eps is added to sqrt(v) before the bias correction
    // of the denominator, i.e. lr * m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t)).
    w -= lr * m_hat / (std::sqrt(v_hat) + eps / std::sqrt(1 - std::pow(b2, t)));
  }
};

TEST(OptimMath, ProductsAreNeverFusedWithTheirSum) {
  // a*b = 1 + 2^-11 + 2^-24 rounds to 1 + 2^-11 in float; fused with
  // c = -(1 + 2^-11) it would leave 2^-24.
  const float a = 1.0f + std::ldexp(1.0f, -12), c = -(1.0f + std::ldexp(1.0f, -11));
  volatile float va = a;  // keep the compiler from folding the check away
  EXPECT_EQ(rn_add(rn_mul(static_cast<float>(va), a), c), 0.0f);
  EXPECT_EQ(rn_fma(static_cast<float>(va), a, c), std::ldexp(1.0f, -24));
}

TEST(OptimMath, SgdIsFusedMultiplyAdds) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (double wd : {0.0, 0.01}) {
    const auto c = sgd_coeffs<float>(0.37, wd);
    for (int i = 0; i < 1000; ++i) {
      const float w0 = normal(rng), g = normal(rng);
      float w = w0;
      sgd_update(w, g, c);
      const float decayed = wd != 0.0 ? std::fma(w0, static_cast<float>(wd), g) : g;
      EXPECT_EQ(w, std::fma(decayed, -0.37f, w0));
    }
  }
}

TEST(OptimMath, AdamMatchesTextbookOverSteps) {
  std::mt19937 rng(4);
  std::normal_distribution<double> normal;
  for (const bool decoupled : {false, true}) {
    for (const double wd : {0.0, 0.05}) {
      const double lr = 0.01, b1 = 0.9, b2 = 0.99, eps = 1e-8;
      std::vector<AdamRef> ref(64);
      std::vector<float> wf(64), mf(64, 0), vf(64, 0);
      std::vector<double> wd64(64), md(64, 0), vd(64, 0);
      for (int i = 0; i < 64; ++i) {
        wf[i] = static_cast<float>(normal(rng));
        wd64[i] = wf[i];
        ref[i].w = wf[i];
      }
      for (int t = 1; t <= 6; ++t) {
        std::vector<float> gf(64);
        std::vector<double> gd(64);
        for (int i = 0; i < 64; ++i) {
          gf[i] = static_cast<float>(normal(rng));
          gd[i] = gf[i];
          ref[i].step(gd[i], t, lr, b1, b2, eps, wd, decoupled);
        }
        adam_row(wf.data(), mf.data(), vf.data(), gf.data(), 64, adam_coeffs<float>(lr, b1, b2, eps, wd, decoupled, t));
        adam_row(wd64.data(), md.data(), vd.data(), gd.data(), 64,
                 adam_coeffs<double>(lr, b1, b2, eps, wd, decoupled, t));
      }
      for (int i = 0; i < 64; ++i) {
        // float: a few roundings of |w| ~ 1 per step; double: far below.
        EXPECT_NEAR(wf[i], static_cast<double>(ref[i].w), 1e-6) << i;
        EXPECT_NEAR(wd64[i], static_cast<double>(ref[i].w), 1e-14) << i;
        EXPECT_NEAR(md[i], static_cast<double>(ref[i].m), 1e-14) << i;
        EXPECT_NEAR(vd[i], static_cast<double>(ref[i].v), 1e-14) << i;
      }
    }
  }
}

TEST(OptimMath, AdamCoefficientsAreSparseAdamsDoubleExpressions) {
  const auto c = adam_coeffs<float>(0.1, 0.9, 0.999, 1e-8, 0.0, false, 3);
  const double step_size = 0.1 * std::sqrt(1 - std::pow(0.999, 3)) / (1 - std::pow(0.9, 3));
  EXPECT_EQ(c.neg_step_size, static_cast<float>(-step_size));
  EXPECT_EQ(c.one_minus_beta1, static_cast<float>(1 - 0.9));
  EXPECT_EQ(c.one_minus_beta2, static_cast<float>(1 - 0.999));
  EXPECT_FALSE(c.l2);
  EXPECT_FALSE(c.decoupled);
  const auto cw = adam_coeffs<float>(0.1, 0.9, 0.999, 1e-8, 0.01, true, 1);
  EXPECT_TRUE(cw.decoupled);
  EXPECT_FALSE(cw.l2);
  EXPECT_EQ(cw.decay, static_cast<float>(1 - 0.1 * 0.01));
}

// What a CUDA warp computes with `x += __shfl_xor_sync(~0u, x, offset)` for
// offset = 16, 8, ..., 1: every lane ends with the same value.
float warp_xor_sum(std::vector<float> lanes) {
  for (int offset = 16; offset >= 1; offset /= 2) {
    std::vector<float> next(32);
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    for (int l = 0; l < 32; ++l) EXPECT_EQ(next[l], next[l ^ offset]);
    lanes = next;
  }
  return lanes[0];
}

TEST(OptimMath, RowLaneReductionIsTheWarpShuffleTree) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(0.0f, 3.0f);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<float> lanes(32);
    for (auto& x : lanes) x = uniform(rng);
    std::vector<float> copy = lanes;
    EXPECT_EQ(reduce_row_lanes(copy.data()), warp_xor_sum(lanes));
  }
}

TEST(OptimMath, RowwiseAdagradMatchesTextbook) {
  std::mt19937 rng(6);
  std::normal_distribution<double> normal;
  for (const int dim : {64, 20, 1}) {
    for (const double wd : {0.0, 0.1}) {
      const double lr = 0.05, eps = 1e-8;
      std::vector<float> wf(dim);
      std::vector<long double> wr(dim);
      float acc_f = 0;
      long double acc_r = 0;
      for (int d = 0; d < dim; ++d) wr[d] = wf[d] = static_cast<float>(normal(rng));
      for (int t = 0; t < 5; ++t) {
        std::vector<float> gf(dim);
        std::vector<long double> gr(dim);
        long double sum_sq = 0;
        for (int d = 0; d < dim; ++d) {
          gf[d] = static_cast<float>(normal(rng));
          gr[d] = gf[d] + wd * wr[d];
          sum_sq += gr[d] * gr[d];
        }
        acc_r += sum_sq / dim;
        const long double mult = lr / (std::sqrt(acc_r) + eps);
        for (int d = 0; d < dim; ++d) wr[d] -= mult * gr[d];
        adagrad_row(wf.data(), acc_f, gf.data(), dim, adagrad_coeffs<float>(lr, eps, wd));
      }
      EXPECT_NEAR(acc_f, static_cast<double>(acc_r), 1e-5 * static_cast<double>(acc_r)) << dim;
      for (int d = 0; d < dim; ++d) EXPECT_NEAR(wf[d], static_cast<double>(wr[d]), 2e-6) << dim << " " << d;
    }
  }
}

TEST(OptimMath, AdagradRowSumsSquaresInLaneOrder) {
  // The accumulator sees sum(g^2) reduced lane by lane (d mod 32), then by the tree.
  std::vector<float> g(96), w(96, 0.0f);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (auto& x : g) x = normal(rng);
  std::vector<float> lanes(32, 0.0f);
  for (int d = 0; d < 96; ++d) lanes[d % 32] += g[d] * g[d];
  const float expected = 0.0f + warp_xor_sum(lanes) / 96.0f;
  float acc = 0;
  adagrad_row(w.data(), acc, g.data(), 96, adagrad_coeffs<float>(0.1, 1e-8, 0.0));
  EXPECT_EQ(acc, expected);
}

TEST(OptimMath, BitsAndKeyLayout) {
  EXPECT_EQ(bits_for(0), 0);
  EXPECT_EQ(bits_for(1), 0);
  EXPECT_EQ(bits_for(2), 1);
  EXPECT_EQ(bits_for(3), 2);
  EXPECT_EQ(bits_for(1024), 10);
  EXPECT_EQ(bits_for(1025), 11);
  EXPECT_EQ(bits_for(10340000), 24);
  const KeyLayout k = KeyLayout::make(262144, 10340000);
  EXPECT_EQ(k.entry_bits, 18);
  EXPECT_EQ(k.row_bits, 24);
  EXPECT_TRUE(k.fits);
  const uint64_t key = k.pack(10339999, 262143);
  EXPECT_EQ(k.row(key), 10339999u);
  EXPECT_EQ(k.entry(key), 262143u);
  const KeyLayout one = KeyLayout::make(1, 1);
  EXPECT_EQ(one.pack(0, 0), 0u);
  EXPECT_EQ(one.entry(one.pack(0, 0)), 0u);
  EXPECT_FALSE(KeyLayout::make(uint64_t(1) << 30, uint64_t(1) << 40).fits);
}

TEST(OptimMath, EntryRowAddsOffsetsAndRejectsOutOfRange) {
  const int64_t ids[] = {0, 2, 1, 3, -1, 0};
  const int64_t offsets[] = {0, 10};
  EXPECT_EQ(entry_row(ids, offsets, 2, 0, 20), 0);
  EXPECT_EQ(entry_row(ids, offsets, 2, 1, 20), 12);
  EXPECT_EQ(entry_row(ids, offsets, 2, 3, 20), 13);
  EXPECT_EQ(entry_row(ids, offsets, 2, 3, 13), -1);
  EXPECT_EQ(entry_row(ids, offsets, 2, 4, 20), -1);
  EXPECT_EQ(entry_row(ids, nullptr, 2, 3, 4), 3);
}

std::vector<uint64_t> random_keys(const KeyLayout& k, int64_t n, uint64_t rows, std::mt19937_64& rng) {
  std::vector<uint64_t> keys(n);
  for (int64_t e = 0; e < n; ++e) keys[e] = k.pack(rng() % rows, e);
  return keys;
}

TEST(OptimMath, RadixSortIsAStableSortByRow) {
  std::mt19937_64 rng(8);
  for (const uint64_t rows : {1ull, 2ull, 300ull, 10340000ull, (1ull << 40) + 7}) {
    for (const int64_t n : {1, 5, 1000, 20000}) {
      const KeyLayout k = KeyLayout::make(n, rows);
      std::vector<uint64_t> keys = random_keys(k, n, std::min<uint64_t>(rows, 50 + rows / 1000), rng);
      std::vector<uint64_t> expected = keys;
      std::stable_sort(expected.begin(), expected.end(),
                       [&](uint64_t a, uint64_t b) { return k.row(a) < k.row(b); });
      std::vector<uint64_t> tmp(n);
      for (const int digit_bits : {8, kMaxDigitBits}) {
        std::vector<uint64_t> work = keys;
        const RadixPlan plan = radix_plan(k.row_bits, digit_bits);
        std::vector<int64_t> counts(std::max<int64_t>(1, plan.passes * plan.buckets()));
        const uint64_t* out =
            radix_sort(work.data(), tmp.data(), n, k.entry_bits, k.row_bits, counts.data(), digit_bits);
        EXPECT_TRUE(std::equal(expected.begin(), expected.end(), out)) << rows << " " << n << " " << digit_bits;
        // Stable by row with the entry in the low bits: the keys are fully sorted.
        EXPECT_TRUE(std::is_sorted(out, out + n));
      }
    }
  }
}

TEST(OptimMath, RadixPlanSpreadsBitsOverFewestPasses) {
  EXPECT_EQ(radix_plan(0).passes, 0);
  EXPECT_EQ(radix_plan(24).passes, 2);
  EXPECT_EQ(radix_plan(24).digit_bits, 12);
  EXPECT_EQ(radix_plan(25).passes, 3);
  EXPECT_EQ(radix_plan(25).digit_bits, 9);
  EXPECT_EQ(radix_plan(24, 8).passes, 3);
  EXPECT_EQ(radix_plan(5).digit_bits, 5);
}

TEST(OptimMath, CountAllPassesEqualsCountPerPass) {
  std::mt19937_64 rng(10);
  const KeyLayout k = KeyLayout::make(3000, 1u << 22);
  const std::vector<uint64_t> keys = random_keys(k, 3000, 1u << 22, rng);
  const RadixPlan plan = radix_plan(k.row_bits);
  std::vector<int64_t> all(plan.passes * plan.buckets(), 0);
  radix_count_all(keys.data(), 0, 3000, k.entry_bits, plan, all.data());
  for (int p = 0; p < plan.passes; ++p) {
    std::vector<int64_t> one(plan.buckets(), 0);
    radix_count(keys.data(), 0, 3000, k.entry_bits + p * plan.digit_bits, plan.mask(), one.data());
    EXPECT_TRUE(std::equal(one.begin(), one.end(), all.begin() + p * plan.buckets())) << p;
  }
}

TEST(OptimMath, ChunkedRadixPassEqualsOnePass) {
  // The CPU kernel counts and scatters per chunk with chunk-major prefixes;
  // that must place every key where the single-chunk pass does.
  std::mt19937_64 rng(9);
  const int64_t n = 5000, chunks = 3;
  const KeyLayout k = KeyLayout::make(n, 4096);
  const std::vector<uint64_t> keys = random_keys(k, n, 4096, rng);
  const int shift = k.entry_bits;
  const uint64_t mask = 255;
  std::vector<int64_t> counts(256, 0);
  radix_count(keys.data(), 0, n, shift, mask, counts.data());
  int64_t total = 0;
  for (auto& c : counts) {
    const int64_t x = c;
    c = total;
    total += x;
  }
  std::vector<uint64_t> one(n), many(n);
  radix_scatter(keys.data(), 0, n, shift, mask, counts.data(), one.data());
  std::vector<int64_t> chunk_counts(chunks * 256, 0);
  for (int64_t c = 0; c < chunks; ++c) radix_count(keys.data(), n * c / chunks, n * (c + 1) / chunks, shift, mask, &chunk_counts[c * 256]);
  total = 0;
  for (int b = 0; b < 256; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t x = chunk_counts[c * 256 + b];
      chunk_counts[c * 256 + b] = total;
      total += x;
    }
  }
  for (int64_t c = 0; c < chunks; ++c) radix_scatter(keys.data(), n * c / chunks, n * (c + 1) / chunks, shift, mask, &chunk_counts[c * 256], many.data());
  EXPECT_EQ(one, many);
}

TEST(OptimMath, SegmentSumIsEntryOrder) {
  const int64_t dim = 3;
  // Entries 0..4 with rows 7, 2, 7, 7, 2.
  const float grad[] = {1e8f, 1, 2, 5, 5, 5, 1, 1, 1, -1e8f, 3, 4, 6, 6, 6};
  const KeyLayout k = KeyLayout::make(5, 8);
  const uint64_t sorted[] = {k.pack(2, 1), k.pack(2, 4), k.pack(7, 0), k.pack(7, 2), k.pack(7, 3)};
  float out[3];
  sum_segment<float>(grad, dim, sorted, 2, 5, k, out);
  // ((1e8 + 1) + -1e8) = 0 in float (1 is lost against 1e8): order matters.
  EXPECT_EQ(out[0], (1e8f + 1.0f) + -1e8f);
  EXPECT_EQ(out[1], (1.0f + 1.0f) + 3.0f);
  EXPECT_EQ(out[2], (2.0f + 1.0f) + 4.0f);
  sum_segment<float>(grad, dim, sorted, 0, 2, k, out);
  EXPECT_EQ(out[0], 11.0f);
  // A lone -0.0 is copied, not added to +0.
  const float negzero[] = {-0.0f};
  const uint64_t single[] = {0};
  sum_segment<float>(negzero, 1, single, 0, 1, KeyLayout::make(1, 1), out);
  EXPECT_TRUE(std::signbit(out[0]));
  double out_d[3];
  sum_segment<double>(grad, dim, sorted, 2, 5, k, out_d);
  EXPECT_EQ(out_d[0], 1.0);  // accumulated in double, the 1 survives
}

}  // namespace
