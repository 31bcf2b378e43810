// CPU token loop of the n-gram hash (spec §3), torch-free.
//
// Three reductions produce bit-identical ids:
//  - ScalarReducer: Barrett reduction (FastMod), any divisor, any x86-64/ARM.
//  - Avx2Reducer: the heads of one order 4 at a time in AVX2 vectors, in
//    exact double arithmetic (FMA); the avx2 level.
//  - Avx512Reducer: the same arithmetic 8 heads at a time; the avx512 level.
// The double-precision reductions need every head size below kF64MaxDivisor
// (one reduction step instead of two below kF64OneStepMaxDivisor); otherwise
// every level takes the scalar one. hash_tokens runs the kernel through
// run_for_isa (kernels/cpu_isa.h), so each level's version is compiled for it.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu_isa.h"
#include "kernels/hash.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#include <immintrin.h>
#define ENGRAM_X86_SIMD 1
#endif

namespace engram {
namespace cpu {

// Everything one call of the hash needs, as raw pointers.
struct HashPlan {
  const int64_t* canonical = nullptr;  // [B, T] compressed ids
  int64_t batch = 0, seq_len = 0;
  int64_t pad = 0;  // compressed pad id
  int num_layers = 0, max_ngram_size = 0, heads_per_order = 0, num_heads = 0;
  bool xxh64 = false;
  const int64_t* multipliers = nullptr;  // [L, N] (deepseek)
  const uint64_t* seeds = nullptr;       // [L, N-1] (xxh64)
  const int64_t* offsets = nullptr;      // [L, K] or null
  // Per (layer, head) reduction constants, [L, K] each.
  const FastMod* mods = nullptr;
  const double* divisor_f64 = nullptr;     // p
  const double* reciprocal_f64 = nullptr;  // 1 / p
  const double* two32_mod_p_f64 = nullptr; // 2^32 mod p
  int64_t* out = nullptr;  // [L, B, T, K]
  bool f64_one_step = false;  // double-precision paths: every head size below kF64OneStepMaxDivisor
  // avx2 / avx512 paths only: write 8-head blocks with non-temporal stores. Requires
  // heads_per_order % 8 == 0 and `out` 64-byte aligned; see stream_output_ok().
  bool stream_output = false;
};

// Outputs at least this big bypass the cache (most of them would be evicted
// before they are read again anyway).
constexpr int64_t kStreamMinBytes = int64_t(2) << 20;

inline bool stream_output_ok(const HashPlan& plan) {
  const int64_t bytes = int64_t(plan.num_layers) * plan.batch * plan.seq_len * plan.num_heads * 8;
  return plan.heads_per_order % 8 == 0 && reinterpret_cast<uintptr_t>(plan.out) % 64 == 0 && bytes >= kStreamMinBytes;
}

// Head sizes below this use the double-precision path: with p < 2^26 every
// intermediate stays below 2^53 and is exact in a double.
constexpr uint64_t kF64MaxDivisor = uint64_t(1) << 26;
// Below this (the reference's ~646k rows per head are), one reduction step
// suffices: |hi| * (2^32 mod p) + lo < 2^32 * 2^20 + 2^32 < 2^53.
constexpr uint64_t kF64OneStepMaxDivisor = uint64_t(1) << 20;

// The reductions map one 64-bit value (the order's mix or XXH64) to each
// head's id: floor modulo of the signed value (deepseek) or modulo of the
// unsigned value (xxh64), plus the head's offset.
struct ScalarReducer {
  template <bool kSigned, int kHeads>
  static inline void reduce(uint64_t value, const HashPlan& plan, int64_t head_base, int heads, int64_t* dst) {
    const int H = kHeads > 0 ? kHeads : heads;
    const FastMod* mods = plan.mods + head_base;
    const int64_t* offsets = plan.offsets ? plan.offsets + head_base : nullptr;
    for (int j = 0; j < H; ++j) {
      const int64_t h = static_cast<int64_t>(kSigned ? mods[j].floor_mod_i64(static_cast<int64_t>(value))
                                                     : mods[j].mod_u64(value));
      dst[j] = offsets ? h + offsets[j] : h;
    }
  }
};

#if defined(ENGRAM_X86_SIMD)
// The AVX2 version of the double-precision reduction (Avx512Reducer below
// has the steps and the proof that every one is exact). Heads go 4 to a
// vector. AVX2 has no double -> int64 conversion: r is an integer in [0, p)
// with p < 2^26, so r + 2^52 is exact and its bit pattern is that of 2^52
// with r in the low mantissa bits; XOR with the bits of 2^52 leaves r.
// kStream: as Avx512Reducer (two 32-byte non-temporal stores fill one line).
// Compiled with the avx2 level's exact target (the feature set of run_avx2),
// so that flatten inlines it there: GCC keeps a callee with another feature
// set out of line.
#if defined(ENGRAM_CPU_MULTIVERSION)
template <bool kStream, bool kOneStep>
struct Avx2Reducer {
  template <bool kSigned, int kHeads>
  __attribute__((target(ENGRAM_TARGET_AVX2))) static inline void reduce(uint64_t value, const HashPlan& plan,
                                                                int64_t head_base, int heads, int64_t* dst) {
    const int H = kHeads > 0 ? kHeads : heads;
    const double hi = kSigned ? static_cast<double>(static_cast<int64_t>(value) >> 32)
                              : static_cast<double>(value >> 32);
    const __m256d vhi = _mm256_set1_pd(hi);
    const __m256d vlo = _mm256_set1_pd(static_cast<double>(value & 0xffffffffu));
    const __m256d zero = _mm256_setzero_pd();
    const __m256d round_shift = _mm256_set1_pd(6755399441055744.0);  // 1.5 * 2^52
    const __m256d two52 = _mm256_set1_pd(4503599627370496.0);        // 2^52
    const double* P = plan.divisor_f64 + head_base;
    const double* INV = plan.reciprocal_f64 + head_base;
    const double* C = plan.two32_mod_p_f64 + head_base;
    const int64_t* offsets = plan.offsets ? plan.offsets + head_base : nullptr;
    for (int j = 0; j < H; j += 4) {
      const bool whole = H - j >= 4;
      // Lanes below H - j: the mask load and store touch no head past H.
      const __m256i m = _mm256_cmpgt_epi64(_mm256_set1_epi64x(H - j), _mm256_setr_epi64x(0, 1, 2, 3));
      const __m256d p = whole ? _mm256_loadu_pd(P + j) : _mm256_maskload_pd(P + j, m);
      const __m256d inv = whole ? _mm256_loadu_pd(INV + j) : _mm256_maskload_pd(INV + j, m);
      const __m256d c = whole ? _mm256_loadu_pd(C + j) : _mm256_maskload_pd(C + j, m);
      __m256d a = vhi;
      if (!kOneStep) {
        const __m256d q_hi = _mm256_sub_pd(_mm256_fmadd_pd(vhi, inv, round_shift), round_shift);
        a = _mm256_fnmadd_pd(q_hi, p, vhi);
      }
      const __m256d x = _mm256_fmadd_pd(a, c, vlo);
      const __m256d q = _mm256_sub_pd(_mm256_fmadd_pd(x, inv, round_shift), round_shift);
      __m256d r = _mm256_fnmadd_pd(q, p, x);
      r = _mm256_add_pd(r, _mm256_and_pd(_mm256_cmp_pd(r, zero, _CMP_LT_OQ), p));
      __m256i ids = _mm256_xor_si256(_mm256_castpd_si256(_mm256_add_pd(r, two52)), _mm256_castpd_si256(two52));
      if (offsets) {
        const __m256i off = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets + j))
                                  : _mm256_maskload_epi64(reinterpret_cast<const long long*>(offsets + j), m);
        ids = _mm256_add_epi64(ids, off);
      }
      if (kStream) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + j), ids);
      } else if (whole) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), ids);
      } else {
        _mm256_maskstore_epi64(reinterpret_cast<long long*>(dst + j), m, ids);
      }
    }
  }
};
#endif  // ENGRAM_CPU_MULTIVERSION

// kStream: store each 8-head block (one 64-byte line) with a non-temporal
// store. Set only when the blocks are 64-byte aligned and the output is too
// big to stay in cache: it skips reading every output line before writing it.
// kOneStep: every head size is below kF64OneStepMaxDivisor, so `a` below is
// hi itself (no first reduction).
template <bool kStream, bool kOneStep>
struct Avx512Reducer {
  // value = hi * 2^32 + lo with hi signed (deepseek) or unsigned (xxh64):
  //   a = hi - round(hi / p) * p    (|a| <= p/2 + 1, congruent to hi)
  //   x = a * (2^32 mod p) + lo     (|x| < 2^53, congruent to value)
  //   r = x - round(x / p) * p, plus p if negative: value mod p in [0, p).
  // Each quotient only needs to be within one of the nearest integer, so it is
  // rounded by adding and subtracting 1.5 * 2^52 (cheaper than roundscale);
  // every product and difference is an integer below 2^53, hence exact.
  // Why exact, for every 64-bit value and every p < 2^26 (kF64MaxDivisor):
  //  - hi and lo (|hi| <= 2^32, 0 <= lo < 2^32) convert to double exactly.
  //  - inv = fl(1/p) has relative error <= 2^-53, so for |y| < 2^53
  //    |y*inv - y/p| < 1/p; the FMA adds 1.5*2^52 (ulp 1) with one rounding,
  //    so q is an integer with |q - y/p| <= 1/2 + 1/p. (p a power of two:
  //    inv is exact and |q - y/p| <= 1/2.) Hence |y - q*p| <= p/2 + 1 < p for
  //    p >= 3, and <= p/2 for p = 1, 2.
  //  - fnmadd computes y - q*p with one rounding of an exact integer of
  //    magnitude < p < 2^53: exact. So |a| <= p/2 + 1 < 2^25 + 1.
  //  - x = a*c + lo with c < p: |x| < (2^25 + 1) * 2^26 + 2^32 < 2^53 (two
  //    steps); with one step (p < 2^20, kF64OneStepMaxDivisor) a = hi and
  //    |x| <= 2^32 * 2^20 + 2^32 < 2^53. The FMA rounds once an exact
  //    integer below 2^53: exact. x == value (mod p) in both.
  //  - r = x - q*p is in (-p, p) by the bound above, exact, congruent to the
  //    value; adding p when negative gives the floor modulo in [0, p).
  template <bool kSigned, int kHeads>
  __attribute__((target("avx512f,avx512dq"))) static inline void reduce(uint64_t value, const HashPlan& plan,
                                                                         int64_t head_base, int heads, int64_t* dst) {
    const int H = kHeads > 0 ? kHeads : heads;
    const double hi = kSigned ? static_cast<double>(static_cast<int64_t>(value) >> 32)
                              : static_cast<double>(value >> 32);
    const __m512d vhi = _mm512_set1_pd(hi);
    const __m512d vlo = _mm512_set1_pd(static_cast<double>(value & 0xffffffffu));
    const __m512d zero = _mm512_setzero_pd();
    const __m512d round_shift = _mm512_set1_pd(6755399441055744.0);  // 1.5 * 2^52
    const double* P = plan.divisor_f64 + head_base;
    const double* INV = plan.reciprocal_f64 + head_base;
    const double* C = plan.two32_mod_p_f64 + head_base;
    const int64_t* offsets = plan.offsets ? plan.offsets + head_base : nullptr;
    for (int j = 0; j < H; j += 8) {
      const __mmask8 m = (H - j >= 8) ? __mmask8(0xff) : __mmask8((1u << (H - j)) - 1);
      const __m512d p = _mm512_maskz_loadu_pd(m, P + j);
      const __m512d inv = _mm512_maskz_loadu_pd(m, INV + j);
      const __m512d c = _mm512_maskz_loadu_pd(m, C + j);
      __m512d a = vhi;
      if (!kOneStep) {
        const __m512d q_hi = _mm512_sub_pd(_mm512_fmadd_pd(vhi, inv, round_shift), round_shift);
        a = _mm512_fnmadd_pd(q_hi, p, vhi);
      }
      const __m512d x = _mm512_fmadd_pd(a, c, vlo);
      const __m512d q = _mm512_sub_pd(_mm512_fmadd_pd(x, inv, round_shift), round_shift);
      __m512d r = _mm512_fnmadd_pd(q, p, x);
      r = _mm512_mask_add_pd(r, _mm512_cmp_pd_mask(r, zero, _CMP_LT_OQ), r, p);
      __m512i ids = _mm512_cvttpd_epi64(r);
      if (offsets) ids = _mm512_add_epi64(ids, _mm512_maskz_loadu_epi64(m, offsets + j));
      if (kStream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + j), ids);
      } else {
        _mm512_mask_storeu_epi64(dst + j, m, ids);
      }
    }
  }
};

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}
#else
inline bool cpu_has_avx512() { return false; }
#endif

// Hashes tokens [begin, end) of the flattened [B, T] ids for every layer.
// kN / kHeads > 0 fix N and H at compile time for the common shapes.
// The plan is taken by value: a local copy lets the compiler keep its fields
// in registers instead of reloading them after every int64 store to `out`.
template <class Reducer, bool kXxh64, int kN, int kHeads>
__attribute__((always_inline)) inline void hash_token_range(const HashPlan plan, int64_t begin, int64_t end) {
  const int N = kN > 0 ? kN : plan.max_ngram_size;
  const int H = kHeads > 0 ? kHeads : plan.heads_per_order;
  const int L = plan.num_layers;
  const int64_t K = plan.num_heads, T = plan.seq_len, tokens = plan.batch * plan.seq_len;
  const int64_t* x = plan.canonical;
  int64_t window[kMaxNgramSize];
  int64_t t = begin % T;  // position in the sequence, advanced without a division per token
  for (int64_t i = begin; i < end; ++i, ++t) {
    if (t == T) t = 0;
    for (int k = 0; k < N; ++k) window[k] = t >= k ? x[i - k] : plan.pad;
    for (int l = 0; l < L; ++l) {
      int64_t* dst = plan.out + (l * tokens + i) * K;
      const int64_t head_base = static_cast<int64_t>(l) * K;
      if constexpr (!kXxh64) {
        const int64_t* m = plan.multipliers + l * N;
        uint64_t mix = deepseek_mix_step(0, window[0], m[0]);
        for (int n = 2; n <= N; ++n) {
          mix = deepseek_mix_step(mix, window[n - 1], m[n - 1]);
          Reducer::template reduce<true, kHeads>(mix, plan, head_base + (n - 2) * H, H, dst + (n - 2) * H);
        }
      } else {
        const uint64_t* seeds = plan.seeds + l * (N - 1);
        for (int n = 2; n <= N; ++n) {
          const uint64_t h64 = xxh64_words(window, n, seeds[n - 2]);
          Reducer::template reduce<false, kHeads>(h64, plan, head_base + (n - 2) * H, H, dst + (n - 2) * H);
        }
      }
    }
  }
}

// Compile-time family, N and H for the reference shape family, run-time otherwise.
template <class Reducer, bool kXxh64>
inline void dispatch_shape(const HashPlan& plan, int64_t begin, int64_t end) {
  const int N = plan.max_ngram_size, H = plan.heads_per_order;
  if (N == 3 && H == 8) return hash_token_range<Reducer, kXxh64, 3, 8>(plan, begin, end);
  if (N == 2 && H == 8) return hash_token_range<Reducer, kXxh64, 2, 8>(plan, begin, end);
  if (N == 4 && H == 8) return hash_token_range<Reducer, kXxh64, 4, 8>(plan, begin, end);
  if (N == 3 && H == 4) return hash_token_range<Reducer, kXxh64, 3, 4>(plan, begin, end);
  return hash_token_range<Reducer, kXxh64, 0, 0>(plan, begin, end);
}

template <class Reducer>
inline void dispatch_token_range(const HashPlan& plan, int64_t begin, int64_t end) {
  if (plan.xxh64) return dispatch_shape<Reducer, true>(plan, begin, end);
  return dispatch_shape<Reducer, false>(plan, begin, end);
}

inline void hash_tokens_scalar(const HashPlan& plan, int64_t begin, int64_t end) {
  dispatch_token_range<ScalarReducer>(plan, begin, end);
}

#if defined(ENGRAM_X86_SIMD)
// The double-precision reductions (Avx2Reducer / Avx512Reducer), streamed or
// not, one step or two. Inlined into the level's run_for_isa wrapper, which
// compiles it for that level.
template <template <bool, bool> class Reducer>
inline void hash_tokens_f64(const HashPlan& plan, int64_t begin, int64_t end) {
  if (plan.stream_output) {
    if (plan.f64_one_step) {
      dispatch_token_range<Reducer<true, true>>(plan, begin, end);
    } else {
      dispatch_token_range<Reducer<true, false>>(plan, begin, end);
    }
    _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the caller joins
  } else if (plan.f64_one_step) {
    dispatch_token_range<Reducer<false, true>>(plan, begin, end);
  } else {
    dispatch_token_range<Reducer<false, false>>(plan, begin, end);
  }
}
#endif

// Per-head constants of both reductions; owns the storage the plan points to.
struct HeadConstants {
  std::vector<FastMod> mods;
  std::vector<double> divisor, reciprocal, two32_mod_p;
  bool f64_exact = true;     // every divisor below kF64MaxDivisor
  bool f64_one_step = true;  // every divisor below kF64OneStepMaxDivisor

  explicit HeadConstants(const int64_t* sizes, int64_t count) {
    mods.reserve(count);
    for (int64_t i = 0; i < count; ++i) {
      const uint64_t p = static_cast<uint64_t>(sizes[i]);
      mods.push_back(FastMod::make(p));
      divisor.push_back(static_cast<double>(p));
      reciprocal.push_back(1.0 / static_cast<double>(p));
      two32_mod_p.push_back(static_cast<double>((uint64_t(1) << 32) % p));
      f64_exact = f64_exact && p < kF64MaxDivisor;
      f64_one_step = f64_one_step && p < kF64OneStepMaxDivisor;
    }
  }

  void attach(HashPlan& plan) const {
    plan.mods = mods.data();
    plan.divisor_f64 = divisor.data();
    plan.reciprocal_f64 = reciprocal.data();
    plan.two32_mod_p_f64 = two32_mod_p.data();
    plan.f64_one_step = f64_one_step;
  }
};

// The level hash_tokens should run for a plan at ISA level `isa`: the
// double-precision reductions need every head below kF64MaxDivisor, else the
// scalar (Barrett) one runs at every level.
inline CpuIsa hash_isa(CpuIsa isa, const HeadConstants& heads) { return heads.f64_exact ? isa : CpuIsa::kScalar; }

// Hashes [begin, end) with the reduction of `isa` (from hash_isa; at most the
// best level of this CPU), through run_for_isa, so cpu_isa_calls counts the
// version that ran. The stream_output plans of avx2 / avx512 write with
// non-temporal stores; the scalar reduction ignores stream_output.
inline void hash_tokens(const HashPlan& plan, CpuIsa isa, int64_t begin, int64_t end) {
  run_for_isa(isa, [&](auto level) {
    constexpr CpuIsa kIsa = decltype(level)::value;
#if defined(ENGRAM_X86_SIMD)
    if constexpr (kIsa == CpuIsa::kAvx512) {
      hash_tokens_f64<Avx512Reducer>(plan, begin, end);
#if defined(ENGRAM_CPU_MULTIVERSION)
    } else if constexpr (kIsa == CpuIsa::kAvx2) {
      hash_tokens_f64<Avx2Reducer>(plan, begin, end);
#endif
    } else {
      hash_tokens_scalar(plan, begin, end);
    }
#else
    (void)kIsa;
    hash_tokens_scalar(plan, begin, end);
#endif
  });
}

}  // namespace cpu
}  // namespace engram
