// The CPU token loop: the double-precision reductions of the avx2 and avx512
// levels give the ids of the scalar (Barrett) one, streamed or not.
#include <gtest/gtest.h>

#include <climits>
#include <cstdio>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/hash_cpu.h"
#include "kernels/primes.h"

namespace {

using engram::cpu::CpuIsa;
using engram::cpu::HashPlan;
using engram::cpu::HeadConstants;

// The levels above scalar that this CPU and build run; the others are named
// in a note, as a skip would be.
std::vector<CpuIsa> vector_levels() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (static_cast<int>(isa) <= static_cast<int>(engram::cpu::best_cpu_isa())) {
      out.push_back(isa);
    } else {
      std::printf("note: level %s skipped: this machine's CPU (or this build) lacks it\n",
                  engram::cpu::cpu_isa_name(isa));
    }
  }
  return out;
}

struct Case {
  int B, T, L, N, H;
  bool xxh64;
  uint64_t min_size;
};

// stream: write into a 64-byte aligned buffer with the non-temporal-store path.
std::vector<int64_t> run(const Case& c, CpuIsa isa, std::vector<int64_t>& x, std::vector<int64_t>& keys,
                         std::vector<int64_t>& sizes, std::vector<int64_t>& offsets, bool stream = false) {
  const int K = (c.N - 1) * c.H;
  HeadConstants heads(sizes.data(), static_cast<int64_t>(sizes.size()));
  const size_t count = static_cast<size_t>(c.L) * c.B * c.T * K;
  std::vector<int64_t> out(count + 8, -1);
  int64_t* dst = out.data();
  while (reinterpret_cast<uintptr_t>(dst) % 64 != 0) ++dst;
  HashPlan plan;
  plan.canonical = x.data();
  plan.batch = c.B;
  plan.seq_len = c.T;
  plan.pad = 2;
  plan.num_layers = c.L;
  plan.max_ngram_size = c.N;
  plan.heads_per_order = c.H;
  plan.num_heads = K;
  plan.xxh64 = c.xxh64;
  plan.multipliers = keys.data();
  plan.seeds = reinterpret_cast<const uint64_t*>(keys.data());
  plan.offsets = offsets.data();
  heads.attach(plan);
  plan.out = dst;
  plan.stream_output = stream;
  // Two uneven ranges, as parallel_for hands them out.
  const int64_t tokens = static_cast<int64_t>(c.B) * c.T, cut = tokens / 3;
  const int64_t calls_before = engram::cpu::cpu_isa_calls[static_cast<int>(isa)].load();
  engram::cpu::hash_tokens(plan, isa, 0, cut);
  engram::cpu::hash_tokens(plan, isa, cut, tokens);
  EXPECT_EQ(engram::cpu::cpu_isa_calls[static_cast<int>(isa)].load(), calls_before + 2)
      << "the " << engram::cpu::cpu_isa_name(isa) << " version did not run";
  return std::vector<int64_t>(dst, dst + count);
}

TEST(HashCpu, VectorLevelsEqualScalar) {
  const auto levels = vector_levels();
  if (levels.empty()) GTEST_SKIP() << "this machine's CPU (or this build) has neither the avx2 nor the avx512 level";
  std::mt19937_64 rng(5);
  const std::vector<Case> cases = {{2, 37, 2, 3, 8, false, 646400}, {1, 5, 1, 4, 3, false, 1000},
                                   {3, 17, 2, 2, 8, true, 646400},  {1, 9, 3, 3, 11, true, 50000000},
                                   {2, 64, 1, 3, 8, false, 2},      {1, 3, 1, 5, 8, false, 67108000}};
  for (const Case& c : cases) {
    const int K = (c.N - 1) * c.H;
    std::vector<int64_t> x(static_cast<size_t>(c.B) * c.T);
    for (auto& v : x) v = static_cast<int64_t>(rng() % 200000) - 100;  // a few negative ids too
    std::vector<int64_t> keys(static_cast<size_t>(c.L) * c.N);
    for (auto& k : keys) k = static_cast<int64_t>(rng() | 1);  // full 64-bit range: many negative mixes
    const auto primes = engram::head_primes(std::vector<uint64_t>(c.N - 1, c.min_size), c.H, c.L);
    std::vector<int64_t> sizes, offsets;
    for (const auto& layer : primes) {
      int64_t offset = 0;
      for (uint64_t p : layer) {
        sizes.push_back(static_cast<int64_t>(p));
        offsets.push_back(offset);
        offset += static_cast<int64_t>(p);
      }
    }
    ASSERT_EQ(static_cast<int>(sizes.size()), c.L * K);
    const auto scalar = run(c, CpuIsa::kScalar, x, keys, sizes, offsets);
    for (CpuIsa isa : levels) {
      const char* name = engram::cpu::cpu_isa_name(isa);
      EXPECT_EQ(run(c, isa, x, keys, sizes, offsets), scalar)
          << name << ": B=" << c.B << " T=" << c.T << " N=" << c.N << " H=" << c.H << " xxh64=" << c.xxh64;
      if (c.H % 8 == 0) {
        EXPECT_EQ(run(c, isa, x, keys, sizes, offsets, /*stream=*/true), scalar)
            << name << " streamed: B=" << c.B << " T=" << c.T << " N=" << c.N << " H=" << c.H
            << " xxh64=" << c.xxh64;
      }
    }
  }
}

// Tiny and odd divisors (every quotient lands near a rounding boundary) and the
// extreme 64-bit mixes, on both families.
TEST(HashCpu, VectorLevelsEqualScalarOnTinyDivisorsAndExtremeMixes) {
  const auto levels = vector_levels();
  if (levels.empty()) GTEST_SKIP() << "this machine's CPU (or this build) has neither the avx2 nor the avx512 level";
  std::mt19937_64 rng(11);
  // The largest size decides between the one-step and the two-step reduction.
  for (int64_t largest : {(int64_t(1) << 20) - 3, (int64_t(1) << 26) - 5}) {
    for (bool xxh64 : {false, true}) {
      const Case c{1, 64, 1, 2, 8, xxh64, 0};
      std::vector<int64_t> sizes = {1, 2, 3, 4, 5, 7, 8, largest};
      std::vector<int64_t> offsets(8, 0);
      std::vector<int64_t> x(64);
      for (auto& v : x) v = static_cast<int64_t>(rng() % 1000);
      // Multipliers that make s0*m0 ^ s1*m1 hit 0, -1, INT64_MIN, INT64_MAX and
      // everything between; a multiplier of 1 leaves small exact values.
      for (int64_t m1 : {int64_t(1), int64_t(-1), INT64_MIN, INT64_MAX, int64_t(rng())}) {
        std::vector<int64_t> keys = {static_cast<int64_t>(rng()), m1};
        const auto scalar = run(c, CpuIsa::kScalar, x, keys, sizes, offsets);
        for (CpuIsa isa : levels) {
          const char* name = engram::cpu::cpu_isa_name(isa);
          EXPECT_EQ(run(c, isa, x, keys, sizes, offsets), scalar)
              << name << ": m1=" << m1 << " xxh64=" << xxh64 << " largest=" << largest;
          EXPECT_EQ(run(c, isa, x, keys, sizes, offsets, /*stream=*/true), scalar)
              << name << " streamed: m1=" << m1 << " largest=" << largest;
        }
      }
    }
  }
}

TEST(HashCpu, HeadConstantsPickTheExactPath) {
  const int64_t small[2] = {646403, (int64_t(1) << 26) - 5};
  const int64_t large[2] = {646403, int64_t(1) << 26};
  EXPECT_TRUE(HeadConstants(small, 2).f64_exact);
  EXPECT_FALSE(HeadConstants(large, 2).f64_exact);
  const int64_t one_step[2] = {646403, (int64_t(1) << 20) - 3};
  const int64_t two_step[2] = {646403, int64_t(1) << 20};
  EXPECT_TRUE(HeadConstants(one_step, 2).f64_one_step);
  EXPECT_FALSE(HeadConstants(two_step, 2).f64_one_step);
  EXPECT_TRUE(HeadConstants(two_step, 2).f64_exact);
}

}  // namespace
