// CPU token loop of the n-gram hash (spec §3), torch-free.
//
// Two reductions produce bit-identical ids:
//  - ScalarReducer: Barrett reduction (FastMod), any divisor, any x86-64/ARM.
//  - Avx512Reducer: the 8 heads of one order in one AVX-512 vector, in exact
//    double arithmetic; picked at run time when the ISA level in use is
//    avx512 (kernels/cpu_isa.h) and every head size is below kF64MaxDivisor (one reduction step instead of
//    two below kF64OneStepMaxDivisor).
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
  bool f64_one_step = false;  // AVX-512 path: every head size below kF64OneStepMaxDivisor
  // AVX-512 path only: write 8-head blocks with non-temporal stores. Requires
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
__attribute__((target("avx512f,avx512dq"))) inline void hash_tokens_avx512(const HashPlan& plan, int64_t begin,
                                                                           int64_t end) {
  if (plan.stream_output) {
    if (plan.f64_one_step) {
      dispatch_token_range<Avx512Reducer<true, true>>(plan, begin, end);
    } else {
      dispatch_token_range<Avx512Reducer<true, false>>(plan, begin, end);
    }
    _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the caller joins
  } else if (plan.f64_one_step) {
    dispatch_token_range<Avx512Reducer<false, true>>(plan, begin, end);
  } else {
    dispatch_token_range<Avx512Reducer<false, false>>(plan, begin, end);
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

// Hashes [begin, end) with the AVX-512 reduction if use_avx512 (the caller
// checked the CPU, the ISA level and the head sizes), else the scalar one.
// Counted in cpu_isa_calls, so tests can tell which one ran.
inline void hash_tokens(const HashPlan& plan, bool use_avx512, int64_t begin, int64_t end) {
#if defined(ENGRAM_X86_SIMD)
  if (use_avx512) {
    note_cpu_isa_call(CpuIsa::kAvx512);
    return hash_tokens_avx512(plan, begin, end);
  }
#endif
  (void)use_avx512;
  note_cpu_isa_call(CpuIsa::kScalar);
  hash_tokens_scalar(plan, begin, end);
}

}  // namespace cpu
}  // namespace engram
