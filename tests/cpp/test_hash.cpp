// GoogleTest for the torch-free kernel helpers in kernels/.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/hash.h"
#include "kernels/primes.h"

namespace {

uint64_t xxh64_str(const std::string& s, uint64_t seed) {
  return engram::xxh64(reinterpret_cast<const uint8_t*>(s.data()), s.size(), seed);
}

// Known vectors of the public XXH64 algorithm (from its specification's
// reference implementation output).
TEST(XXH64, KnownVectors) {
  EXPECT_EQ(xxh64_str("", 0), 0xEF46DB3751D8E999ULL);
  EXPECT_EQ(xxh64_str("a", 0), 0xD24EC4F1A98C6E5BULL);
  EXPECT_EQ(xxh64_str("abc", 0), 0x44BC2CF5AD770999ULL);
  EXPECT_EQ(xxh64_str("xxhash", 0), 0x32DD38952C4BC720ULL);
  EXPECT_EQ(xxh64_str("xxhash", 20141025), 0xB559B98D844E0635ULL);
  EXPECT_EQ(xxh64_str("Nobody inspects the spammish repetition", 0), 0xFBCEA83C8A378BF1ULL);
}

TEST(XXH64, WordsEqualBytes) {
  std::mt19937_64 rng(1);
  for (int n = 0; n <= 12; ++n) {
    std::vector<int64_t> words(n);
    for (auto& w : words) w = static_cast<int64_t>(rng());
    std::vector<uint8_t> bytes(8 * n);
    for (int i = 0; i < n; ++i)
      for (int b = 0; b < 8; ++b) bytes[8 * i + b] = static_cast<uint8_t>(static_cast<uint64_t>(words[i]) >> (8 * b));
    const uint64_t seed = rng();
    EXPECT_EQ(engram::xxh64_words(words.data(), n, seed), engram::xxh64(bytes.data(), bytes.size(), seed)) << n;
  }
}

TEST(FastMod, MatchesHardwareModulo) {
  std::mt19937_64 rng(2);
  const std::vector<uint64_t> divisors = {1, 2, 3, 7, 646403, 646523, 1000003, (1ULL << 31) - 1, (1ULL << 32) + 15,
                                          (1ULL << 62) + 135, ~0ULL};
  std::vector<uint64_t> values = {0, 1, 2, ~0ULL, ~0ULL - 1, 1ULL << 63, (1ULL << 63) - 1};
  for (int i = 0; i < 20000; ++i) values.push_back(rng());
  for (uint64_t p : divisors) {
    const engram::FastMod f = engram::FastMod::make(p);
    for (uint64_t u : values) {
      ASSERT_EQ(f.mod_u64(u), u % p) << "u=" << u << " p=" << p;
      ASSERT_EQ(f.mod_u64(u - u % p), 0u);  // exact multiples: the quotient estimate's worst case
    }
  }
}

TEST(FastMod, DividesLikeHardwareDivision) {
  std::mt19937_64 rng(4);
  const std::vector<uint64_t> divisors = {1, 2, 3, 7, 12, 4096, 646403, (1ULL << 31) - 1, (1ULL << 32) + 15,
                                          (1ULL << 62) + 135, ~0ULL};
  std::vector<uint64_t> values = {0, 1, 2, ~0ULL, ~0ULL - 1, 1ULL << 63, (1ULL << 63) - 1, 1ULL << 32};
  for (int i = 0; i < 20000; ++i) values.push_back(i % 2 ? rng() : rng() >> (rng() % 64));
  for (uint64_t p : divisors) {
    const engram::FastMod f = engram::FastMod::make(p);
    for (uint64_t u : values) {
      for (uint64_t v : {u, u - u % p, u - u % p - 1}) {  // exact multiples and one below: the estimate's edges
        uint64_t rem = ~0ULL;
        ASSERT_EQ(f.div_u64(v, &rem), v / p) << "v=" << v << " p=" << p;
        ASSERT_EQ(rem, v % p) << "v=" << v << " p=" << p;
      }
    }
  }
}

TEST(FastMod, FloorModOfSignedValues) {
  std::mt19937_64 rng(3);
  for (int64_t p : {2LL, 3LL, 646403LL, 1000003LL, (1LL << 40) + 15}) {
    const engram::FastMod f = engram::FastMod::make(static_cast<uint64_t>(p));
    for (int i = 0; i < 20000; ++i) {
      const int64_t x = static_cast<int64_t>(rng());
      int64_t want = x % p;  // C++ truncates toward zero; floor modulo is non-negative
      if (want < 0) want += p;
      ASSERT_EQ(static_cast<int64_t>(f.floor_mod_i64(x)), want) << "x=" << x << " p=" << p;
    }
    EXPECT_EQ(f.floor_mod_i64(-1), static_cast<uint64_t>(p - 1));
    EXPECT_EQ(f.floor_mod_i64(INT64_MIN), static_cast<uint64_t>(((INT64_MIN % p) + p) % p));
  }
}

TEST(DeepSeekHash, MixAndHeadsMatchPlainFormula) {
  // window = s_0, s_1, s_2; orders 2 and 3, two heads each.
  const int64_t window[3] = {5, 123456, 2};
  const int64_t mult[3] = {76632096046245LL, 4839876093313LL, 35959672319349LL};
  const int64_t sizes[4] = {646403, 646411, 646421, 646423};
  engram::FastMod mods[4];
  for (int k = 0; k < 4; ++k) mods[k] = engram::FastMod::make(sizes[k]);
  int64_t out[4];
  engram::deepseek_hash_token(window, 3, 2, mult, mods, nullptr, out);
  const int64_t mix2 = (window[0] * mult[0]) ^ (window[1] * mult[1]);  // no overflow at these sizes
  const int64_t mix3 = mix2 ^ (window[2] * mult[2]);
  EXPECT_EQ(out[0], mix2 % sizes[0]);
  EXPECT_EQ(out[1], mix2 % sizes[1]);
  EXPECT_EQ(out[2], mix3 % sizes[2]);
  EXPECT_EQ(out[3], mix3 % sizes[3]);
  const int64_t offsets[4] = {0, 646403, 1292814, 1939235};
  int64_t rows[4];
  engram::deepseek_hash_token(window, 3, 2, mult, mods, offsets, rows);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(rows[k], out[k] + offsets[k]);
}

TEST(Xxh64Hash, HeadsReduceTheWordHash) {
  const int64_t window[3] = {-7, 42, 2};
  const uint64_t seeds[2] = {engram::xxh64_ngram_seed(0, 1, 2), engram::xxh64_ngram_seed(0, 1, 3)};
  engram::FastMod mods[2] = {engram::FastMod::make(646403), engram::FastMod::make(646411)};
  int64_t out[2];
  engram::xxh64_hash_token(window, 3, 1, seeds, mods, nullptr, out);
  EXPECT_EQ(static_cast<uint64_t>(out[0]), engram::xxh64_words(window, 2, seeds[0]) % 646403ULL);
  EXPECT_EQ(static_cast<uint64_t>(out[1]), engram::xxh64_words(window, 3, seeds[1]) % 646411ULL);
  EXPECT_NE(seeds[0], seeds[1]);
}

TEST(Primes, IsPrime) {
  const std::vector<uint64_t> primes = {2, 3, 5, 7, 646403, 646411, 1000003, 2147483647ULL};
  const std::vector<uint64_t> composites = {0, 1, 4, 9, 646401, 646407, 1000001, 2147483649ULL};
  for (uint64_t p : primes) EXPECT_TRUE(engram::is_prime(p)) << p;
  for (uint64_t c : composites) EXPECT_FALSE(engram::is_prime(c)) << c;
}

TEST(Primes, ReferenceHeadSizes) {
  const auto sizes = engram::head_primes({646400, 646400}, 8, 2);
  ASSERT_EQ(sizes.size(), 2u);
  const std::vector<uint64_t> first = {646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523};
  EXPECT_EQ(std::vector<uint64_t>(sizes[0].begin(), sizes[0].begin() + 8), first);
  uint64_t rows0 = 0, rows1 = 0;
  for (uint64_t p : sizes[0]) rows0 += p;
  for (uint64_t p : sizes[1]) rows1 += p;
  EXPECT_EQ(rows0, 10344164u);
  EXPECT_EQ(rows1, 10348242u);
  // 3-gram heads take the primes right after the 2-gram heads.
  EXPECT_GT(sizes[0][8], sizes[0][7]);
}

TEST(Primes, DistinctAcrossLayersAndOrders) {
  const auto sizes = engram::head_primes({10, 10, 10}, 4, 3);
  std::set<uint64_t> all;
  for (const auto& layer : sizes)
    for (uint64_t p : layer) {
      EXPECT_TRUE(engram::is_prime(p));
      EXPECT_GT(p, 9u);
      all.insert(p);
    }
  EXPECT_EQ(all.size(), 3u * 3u * 4u);
}

}  // namespace
