// Torch-free hashing helpers shared by the CPU and CUDA kernels.
//
// Everything here works on raw integers so that GoogleTest can check it
// without torch, and so that the same code runs on host and device.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define ENGRAM_HD __host__ __device__ __forceinline__
#else
#define ENGRAM_HD inline
#endif

namespace engram {

// ---------------------------------------------------------------------------
// 64-bit high multiply
// ---------------------------------------------------------------------------
ENGRAM_HD uint64_t mul_hi_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// ---------------------------------------------------------------------------
// Fast modulo by a fixed divisor (Barrett reduction).
//
// Every token needs K reductions by K different primes; a hardware 64-bit
// division costs tens of cycles, a Barrett reduction a multiply-high, a
// multiply and two compares.
// ---------------------------------------------------------------------------
struct FastMod {
  uint64_t divisor;      // p >= 1
  uint64_t reciprocal;   // floor((2^64 - 1) / p)
  uint64_t two64_mod_p;  // 2^64 mod p, to fold negative signed values

  ENGRAM_HD static FastMod make(uint64_t p) {
    FastMod f;
    f.divisor = p;
    f.reciprocal = ~uint64_t(0) / p;
    // 2^64 mod p == ((2^64 - 1) mod p + 1) mod p
    uint64_t r = (~uint64_t(0)) % p + 1;
    f.two64_mod_p = (r == p) ? 0 : r;
    return f;
  }

  // u mod p for unsigned u.
  ENGRAM_HD uint64_t mod_u64(uint64_t u) const {
    // reciprocal underestimates 2^64/p by < 1 + 1/p, so the quotient estimate
    // is at most 2 too small: two conditional subtractions finish the job.
    uint64_t q = mul_hi_u64(u, reciprocal);
    uint64_t r = u - q * divisor;
    if (r >= divisor) r -= divisor;
    if (r >= divisor) r -= divisor;
    return r;
  }

  // u / p, and u mod p into *rem: mod_u64's estimate, with the quotient
  // corrected along (the CUDA kernels' 64-bit index split, without the
  // hardware-less 64-bit division).
  ENGRAM_HD uint64_t div_u64(uint64_t u, uint64_t* rem) const {
    uint64_t q = mul_hi_u64(u, reciprocal);
    uint64_t r = u - q * divisor;
    if (r >= divisor) r -= divisor, ++q;
    if (r >= divisor) r -= divisor, ++q;
    *rem = r;
    return q;
  }

  // Floor modulo of a signed value: the result is in [0, p) also for x < 0,
  // like Python's and numpy's `%`.
  ENGRAM_HD uint64_t floor_mod_i64(int64_t x) const {
    uint64_t r = mod_u64(static_cast<uint64_t>(x));
    if (x < 0) {
      // x == u - 2^64, so x mod p == (u mod p) - (2^64 mod p), folded into [0, p)
      r = (r >= two64_mod_p) ? r - two64_mod_p : r + (divisor - two64_mod_p);
    }
    return r;
  }
};

// ---------------------------------------------------------------------------
// The reference ("deepseek") mix of spec §3:
//   mix = (s_0*m_0) ^ (s_1*m_1) ^ ... ^ (s_{n-1}*m_{n-1}), int64 arithmetic.
// Products are taken in uint64 so that wrap-around matches numpy's int64
// (two's complement) bit for bit without signed-overflow UB.
// ---------------------------------------------------------------------------
ENGRAM_HD uint64_t deepseek_mix_step(uint64_t mix, int64_t s_k, int64_t m_k) {
  return mix ^ (static_cast<uint64_t>(s_k) * static_cast<uint64_t>(m_k));
}

// ---------------------------------------------------------------------------
// XXH64 (public algorithm by Yann Collet), written once for host and device.
// ---------------------------------------------------------------------------
namespace xxh {
constexpr uint64_t P1 = 11400714785074694791ULL;
constexpr uint64_t P2 = 14029467366897019727ULL;
constexpr uint64_t P3 = 1609587929392839161ULL;
constexpr uint64_t P4 = 9650029242287828579ULL;
constexpr uint64_t P5 = 2870177450012600261ULL;

ENGRAM_HD uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

ENGRAM_HD uint64_t round(uint64_t acc, uint64_t input) {
  acc += input * P2;
  acc = rotl(acc, 31);
  return acc * P1;
}

ENGRAM_HD uint64_t merge_round(uint64_t acc, uint64_t val) {
  acc ^= round(0, val);
  return acc * P1 + P4;
}

ENGRAM_HD uint64_t avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

ENGRAM_HD uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

ENGRAM_HD uint32_t read_le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// Stripe loop shared by the byte and the word entry points; `word(i)` yields
// the i-th little-endian 64-bit word of the input.
template <typename WordAt>
ENGRAM_HD uint64_t consume_words(uint64_t seed, size_t num_words, size_t len_bytes, WordAt word, size_t* consumed) {
  size_t i = 0;
  uint64_t h;
  if (len_bytes >= 32) {
    uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
    for (; i + 4 <= num_words && (i + 4) * 8 <= len_bytes; i += 4) {
      v1 = round(v1, word(i));
      v2 = round(v2, word(i + 1));
      v3 = round(v3, word(i + 2));
      v4 = round(v4, word(i + 3));
    }
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = merge_round(h, v1);
    h = merge_round(h, v2);
    h = merge_round(h, v3);
    h = merge_round(h, v4);
  } else {
    h = seed + P5;
  }
  h += static_cast<uint64_t>(len_bytes);
  for (; i < num_words; ++i) {
    h ^= round(0, word(i));
    h = rotl(h, 27) * P1 + P4;
  }
  *consumed = i * 8;
  return h;
}
}  // namespace xxh

// XXH64 of `len` bytes.
ENGRAM_HD uint64_t xxh64(const uint8_t* data, size_t len, uint64_t seed) {
  size_t consumed = 0;
  uint64_t h = xxh::consume_words(
      seed, len / 8, len, [data](size_t i) { return xxh::read_le64(data + 8 * i); }, &consumed);
  const uint8_t* p = data + consumed;
  size_t rest = len - consumed;
  if (rest >= 4) {
    h ^= static_cast<uint64_t>(xxh::read_le32(p)) * xxh::P1;
    h = xxh::rotl(h, 23) * xxh::P2 + xxh::P3;
    p += 4;
    rest -= 4;
  }
  while (rest > 0) {
    h ^= (*p) * xxh::P5;
    h = xxh::rotl(h, 11) * xxh::P1;
    ++p;
    --rest;
  }
  return xxh::avalanche(h);
}

// XXH64 of the little-endian bytes of `n` int64 words, without building the
// byte string: what the n-gram hash feeds it.
ENGRAM_HD uint64_t xxh64_words(const int64_t* words, int n, uint64_t seed) {
  size_t consumed = 0;
  uint64_t h = xxh::consume_words(
      seed, static_cast<size_t>(n), static_cast<size_t>(n) * 8,
      [words](size_t i) { return static_cast<uint64_t>(words[i]); }, &consumed);
  return xxh::avalanche(h);
}

// Seed of the xxh64 family for one (seed, layer id, order): XXH64 of the
// three little-endian int64 values, with seed 0.
ENGRAM_HD uint64_t xxh64_ngram_seed(int64_t seed, int64_t layer_id, int64_t order) {
  const int64_t words[3] = {seed, layer_id, order};
  return xxh64_words(words, 3, 0);
}

}  // namespace engram

namespace engram {

// ---------------------------------------------------------------------------
// One token's K hash ids (spec §3), shared by the CPU and CUDA kernels.
//   window[k] = s_k, the canonical id k positions back (pad before t = 0)
//   out[(n-2)*H + j] = hash of order n, head j (+ offsets[...] if given)
// ---------------------------------------------------------------------------
ENGRAM_HD void deepseek_hash_token(const int64_t* window, int max_ngram_size, int heads_per_order,
                                   const int64_t* multipliers, const FastMod* mods,
                                   const int64_t* offsets, int64_t* out) {
  uint64_t mix = deepseek_mix_step(0, window[0], multipliers[0]);
  for (int n = 2; n <= max_ngram_size; ++n) {
    mix = deepseek_mix_step(mix, window[n - 1], multipliers[n - 1]);
    const int base = (n - 2) * heads_per_order;
    for (int j = 0; j < heads_per_order; ++j) {
      const int k = base + j;
      int64_t h = static_cast<int64_t>(mods[k].floor_mod_i64(static_cast<int64_t>(mix)));
      out[k] = offsets ? h + offsets[k] : h;
    }
  }
}

// xxh64 family: XXH64 over s_0 .. s_{n-1} as little-endian int64, seeded per
// order (seeds[n-2]), reduced by each head's prime as an unsigned value.
ENGRAM_HD void xxh64_hash_token(const int64_t* window, int max_ngram_size, int heads_per_order,
                                const uint64_t* seeds, const FastMod* mods, const int64_t* offsets,
                                int64_t* out) {
  for (int n = 2; n <= max_ngram_size; ++n) {
    const uint64_t h64 = xxh64_words(window, n, seeds[n - 2]);
    const int base = (n - 2) * heads_per_order;
    for (int j = 0; j < heads_per_order; ++j) {
      const int k = base + j;
      int64_t h = static_cast<int64_t>(mods[k].mod_u64(h64));
      out[k] = offsets ? h + offsets[k] : h;
    }
  }
}

// Largest order the kernels accept: the window lives in registers/stack.
constexpr int kMaxNgramSize = 16;

}  // namespace engram
