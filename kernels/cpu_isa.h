// CPU instruction-set levels of the CPU kernels, chosen at run time, torch-free.
//
// The extension is built for baseline x86-64. With GCC 11+ on x86-64 the hot
// kernels are compiled three times, once per level:
//   kScalar  baseline x86-64 (SSE2)
//   kAvx2    x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE
//   kAvx512  x86-64-v4: x86-64-v3 and AVX-512 F/BW/CD/DQ/VL
// and run_for_isa() calls the version of the level in use: the best one this
// CPU has unless set_cpu_isa() asked for a lower one (engram reads the
// ENGRAM_CPU_ISA environment variable at import and calls it). Unlike an
// ifunc, which the loader resolves once by CPU, this lets tests run every
// level on one machine. Elsewhere (other compilers, other architectures) the
// kernels are compiled once and the only level is kScalar.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && __GNUC__ >= 11 && defined(__x86_64__)
#define ENGRAM_CPU_MULTIVERSION 1
#endif

namespace engram {
namespace cpu {

enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumCpuIsas = 3;

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    default:
      return "scalar";
  }
}

// Bytes of the widest SIMD register of a level: the lane vectors of the row
// reductions in kernels/layer_math.h are this wide.
constexpr int cpu_isa_vector_bytes(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? 64 : isa == CpuIsa::kAvx2 ? 32 : 16;
}

// The level as a type: run_for_isa passes one to the kernel body, which can
// take its value as a template argument (e.g. the vector width).
template <CpuIsa kIsa>
using IsaTag = std::integral_constant<CpuIsa, kIsa>;

#if defined(ENGRAM_CPU_MULTIVERSION)
// The features of x86-64-v3 and x86-64-v4 that code may use, spelled out:
// GCC 11 knows neither `arch=x86-64-v3` targets in every release nor
// __builtin_cpu_supports("x86-64-v3").
#define ENGRAM_TARGET_AVX2 "avx,avx2,bmi,bmi2,f16c,fma,lzcnt,movbe,popcnt"
#define ENGRAM_TARGET_AVX512 ENGRAM_TARGET_AVX2 ",avx512f,avx512bw,avx512cd,avx512dq,avx512vl"

// __builtin_cpu_supports checks the CPUID bits and that the OS saves the
// AVX / AVX-512 registers (XCR0).
inline bool cpu_has_avx2_level() {
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("lzcnt") && __builtin_cpu_supports("movbe") && __builtin_cpu_supports("popcnt");
}

inline bool cpu_has_avx512_level() {
  return cpu_has_avx2_level() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

// The best level this CPU runs and this build has.
inline CpuIsa detect_cpu_isa() {
#if defined(ENGRAM_CPU_MULTIVERSION)
  __builtin_cpu_init();
  if (cpu_has_avx512_level()) return CpuIsa::kAvx512;
  if (cpu_has_avx2_level()) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kScalar;
}

inline CpuIsa best_cpu_isa() {
  static const CpuIsa best = detect_cpu_isa();
  return best;
}

// The level in use; -1 until set_cpu_isa: the best.
inline std::atomic<int> selected_cpu_isa{-1};

inline CpuIsa current_cpu_isa() {
  const int selected = selected_cpu_isa.load(std::memory_order_relaxed);
  return selected < 0 ? best_cpu_isa() : static_cast<CpuIsa>(selected);
}

// Uses `isa` from the next kernel call on; false (and no change) if this CPU
// or build lacks it. Kernels read the level once per op call.
inline bool set_cpu_isa(CpuIsa isa) {
  if (static_cast<int>(isa) < 0 || static_cast<int>(isa) > static_cast<int>(best_cpu_isa())) return false;
  selected_cpu_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

// Kernel calls per compiled version, so that tests can tell which version
// ran (not only which was asked for). One relaxed increment per call of a
// whole chunk of rows: negligible.
inline std::atomic<int64_t> cpu_isa_calls[kNumCpuIsas];

inline void note_cpu_isa_call(CpuIsa isa) {
  cpu_isa_calls[static_cast<int>(isa)].fetch_add(1, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------
// run_for_isa(isa, body): calls body(IsaTag<isa>{}) compiled for `isa`.
//
// Each level has its own wrapper with that level's target attribute and
// `flatten`, which inlines the whole call tree of body into it, so the kernel
// and every helper it calls are compiled for the level. Helpers that
// must stay out of line (calls into ATen, which has its own CPU dispatch) are
// marked ENGRAM_NOINLINE and run the baseline code whatever the level.
// ---------------------------------------------------------------------------

#if defined(__GNUC__) || defined(__clang__)
#define ENGRAM_NOINLINE __attribute__((noinline))
#define ENGRAM_FLATTEN __attribute__((flatten, noinline))
#else
#define ENGRAM_NOINLINE
#define ENGRAM_FLATTEN
#endif

template <class Body>
ENGRAM_FLATTEN void run_scalar(const Body& body) {
  note_cpu_isa_call(CpuIsa::kScalar);
  body(IsaTag<CpuIsa::kScalar>{});
}

#if defined(ENGRAM_CPU_MULTIVERSION)
template <class Body>
__attribute__((target(ENGRAM_TARGET_AVX2))) ENGRAM_FLATTEN void run_avx2(const Body& body) {
  note_cpu_isa_call(CpuIsa::kAvx2);
  body(IsaTag<CpuIsa::kAvx2>{});
}

template <class Body>
__attribute__((target(ENGRAM_TARGET_AVX512))) ENGRAM_FLATTEN void run_avx512(const Body& body) {
  note_cpu_isa_call(CpuIsa::kAvx512);
  body(IsaTag<CpuIsa::kAvx512>{});
}
#endif

template <class Body>
inline void run_for_isa(CpuIsa isa, const Body& body) {
#if defined(ENGRAM_CPU_MULTIVERSION)
  if (isa == CpuIsa::kAvx512) return run_avx512(body);
  if (isa == CpuIsa::kAvx2) return run_avx2(body);
#endif
  (void)isa;
  run_scalar(body);
}

}  // namespace cpu
}  // namespace engram
