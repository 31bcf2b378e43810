// The CPU ISA levels (kernels/cpu_isa.h) and the row reductions of
// kernels/layer_math.h compiled for each level this CPU has.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu_isa.h"
#include "kernels/layer_math.h"

namespace {

using engram::cpu::CpuIsa;

std::vector<CpuIsa> levels() {
  std::vector<CpuIsa> out;
  for (int i = 0; i <= static_cast<int>(engram::cpu::best_cpu_isa()); ++i) out.push_back(static_cast<CpuIsa>(i));
  return out;
}

// The reductions' definition, written out: 8 partial sums, lane l taking the
// elements i = l mod 8 of the whole groups of 8, added in lane order, then
// the tail in order.
template <typename T, typename Term>
T lane_sum(int64_t n, Term term) {
  T lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += term(i + l);
  }
  T total = 0;
  for (int l = 0; l < 8; ++l) total += lanes[l];
  for (; i < n; ++i) total += term(i);
  return total;
}

template <typename T>
struct Rows {
  std::vector<T> a, b, c, d;
  explicit Rows(int64_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    for (auto* v : {&a, &b, &c, &d}) {
      for (int64_t i = 0; i < n; ++i) v->push_back(static_cast<T>(normal(rng)));
    }
  }
};

struct Results {
  double squares, triple, gate_score;
};

// The three reductions at `isa`, through the level's compiled version.
template <typename T>
Results reduce_at(CpuIsa isa, const Rows<T>& r, int64_t n) {
  Results out{};
  engram::cpu::run_for_isa(isa, [&](auto level) {
    constexpr int kBytes = engram::cpu::cpu_isa_vector_bytes(decltype(level)::value);
    out.squares = engram::sum_of_squares<T, kBytes>(r.a.data(), n);
    out.triple = engram::sum_of_triple_products<T, kBytes>(r.a.data(), r.b.data(), r.c.data(), n);
    out.gate_score =
        engram::gate_row_state<T, kBytes>(r.a.data(), r.b.data(), r.c.data(), r.d.data(), n, T(1e-6)).score;
  });
  return out;
}

TEST(CpuIsa, SettingALevelTheCpuLacksFailsAndChangesNothing) {
  const CpuIsa best = engram::cpu::best_cpu_isa();
  EXPECT_EQ(engram::cpu::current_cpu_isa(), best);
  for (CpuIsa isa : levels()) {
    EXPECT_TRUE(engram::cpu::set_cpu_isa(isa));
    EXPECT_EQ(engram::cpu::current_cpu_isa(), isa);
  }
  for (int beyond = static_cast<int>(best) + 1; beyond <= engram::cpu::kNumCpuIsas; ++beyond) {
    EXPECT_FALSE(engram::cpu::set_cpu_isa(static_cast<CpuIsa>(beyond)));
  }
  EXPECT_FALSE(engram::cpu::set_cpu_isa(static_cast<CpuIsa>(-1)));
  EXPECT_EQ(engram::cpu::current_cpu_isa(), best);  // the last level set above
}

TEST(CpuIsa, RunForIsaRunsAndCountsTheRequestedLevel) {
  for (CpuIsa isa : levels()) {
    int64_t before[engram::cpu::kNumCpuIsas];
    for (int i = 0; i < engram::cpu::kNumCpuIsas; ++i) before[i] = engram::cpu::cpu_isa_calls[i].load();
    CpuIsa seen = static_cast<CpuIsa>(-1);
    engram::cpu::run_for_isa(isa, [&](auto level) { seen = decltype(level)::value; });
    EXPECT_EQ(seen, isa);
    for (int i = 0; i < engram::cpu::kNumCpuIsas; ++i) {
      EXPECT_EQ(engram::cpu::cpu_isa_calls[i].load() - before[i], i == static_cast<int>(isa) ? 1 : 0)
          << "level " << engram::cpu::cpu_isa_name(isa) << ", counter " << i;
    }
  }
}

template <typename T>
void check_reductions(double tolerance) {
  for (int64_t n : {0, 1, 7, 8, 9, 16, 21, 64, 77, 1000}) {
    const Rows<T> r(n, 11 + n);
    const T squares = lane_sum<T>(n, [&](int64_t i) { return r.a[i] * r.a[i]; });
    const T triple = lane_sum<T>(n, [&](int64_t i) { return r.a[i] * r.b[i] * r.c[i]; });
    const T sum_kk = squares, sum_qq = lane_sum<T>(n, [&](int64_t i) { return r.b[i] * r.b[i]; });
    const T sum_kq = lane_sum<T>(n, [&](int64_t i) { return r.a[i] * r.c[i] * r.b[i] * r.d[i]; });
    // gate_row_state's score from the written-out sums (n >= 1).
    const T rk = T(1) / std::sqrt(sum_kk / static_cast<T>(n) + T(1e-6));
    const T rq = T(1) / std::sqrt(sum_qq / static_cast<T>(n) + T(1e-6));
    const T score = sum_kq * rk * rq / std::sqrt(static_cast<T>(n));
    // Bounds for the FMA levels: the rounding of each partial product.
    double abs_squares = 0, abs_triple = 0, abs_kq = 0;
    for (int64_t i = 0; i < n; ++i) {
      abs_squares += double(r.a[i]) * r.a[i];
      abs_triple += std::fabs(double(r.a[i]) * r.b[i] * r.c[i]);
      abs_kq += std::fabs(double(r.a[i]) * r.b[i] * r.c[i] * r.d[i]);
    }
    for (CpuIsa isa : levels()) {
      const Results got = reduce_at<T>(isa, r, n);
      SCOPED_TRACE(testing::Message() << "n=" << n << " level " << engram::cpu::cpu_isa_name(isa));
      if (isa == CpuIsa::kScalar) {
        // Baseline x86-64 has no FMA: the same operations in the same order, bit for bit.
        EXPECT_EQ(got.squares, double(squares));
        EXPECT_EQ(got.triple, double(triple));
        if (n > 0) {
          EXPECT_EQ(got.gate_score, double(score));
        }
      } else {
        EXPECT_NEAR(got.squares, squares, tolerance * abs_squares);
        EXPECT_NEAR(got.triple, triple, tolerance * abs_triple);
        if (n > 0) {
          EXPECT_NEAR(got.gate_score, score, tolerance * abs_kq * rk * rq / std::sqrt(double(n)));
        }
      }
    }
  }
}

TEST(CpuIsa, ReductionsAtEveryLevelFollowTheirDefinition) {
  check_reductions<float>(1e-6);
  check_reductions<double>(1e-14);
}

}  // namespace
