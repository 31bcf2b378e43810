// Torch-free math of the row-wise sparse table optimizers (engram.optim),
// shared by the CPU kernels (csrc/cpu_optim.cpp), the CUDA kernels
// (csrc/cuda/optim.cu) and the GoogleTest suite (tests/cpp/test_optim.cpp).
//
// A training step of an Engram table sees each touched row once, with the
// sum of its gradients over the batch: first the (token, head) entries are
// deduplicated (a stable radix sort of their rows, so equal rows keep entry
// order) and summed per row, then one rule updates each touched row in place.
//
// Every rule is written once, generically over the value type V: float or
// double (host and device) or a SIMD wrapper the CPU kernels define. Each
// arithmetic step goes through rn_add / rn_sub / rn_mul / rn_div / rn_sqrt /
// rn_fma: one IEEE operation, rounded once, never fused with its neighbour
// by the compiler. That pins the results down to the bit, so that
//   - Adam equals torch.optim.SparseAdam, which runs the same operations as
//     separate tensor ops (each rounded once), and
//   - SGD equals torch.optim.SGD, whose vectorised `param.add_(grad, alpha=-lr)`
//     is one fused multiply-add per element on AVX2/AVX-512 CPUs,
// and the CPU and CUDA kernels agree with each other.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/hash.h"  // ENGRAM_HD

namespace engram {
namespace optim {

// ---------------------------------------------------------------------------
// Exactly rounded primitives
// ---------------------------------------------------------------------------

// The compiler may contract a*b + c into one fused multiply-add (GCC does by
// default, nvcc too), which rounds once instead of twice and changes the last
// bit. An empty asm that claims to modify the product hides it from the
// optimiser, so it cannot be fused; on the device the _rn intrinsics are
// never fused.
template <typename T>
inline T opaque(T x) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(x));
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
  asm("" : "+w"(x));
#endif
  return x;
}

#if defined(__CUDA_ARCH__)
ENGRAM_HD float rn_add(float a, float b) { return __fadd_rn(a, b); }
ENGRAM_HD float rn_sub(float a, float b) { return __fsub_rn(a, b); }
ENGRAM_HD float rn_mul(float a, float b) { return __fmul_rn(a, b); }
ENGRAM_HD float rn_div(float a, float b) { return __fdiv_rn(a, b); }
ENGRAM_HD float rn_sqrt(float a) { return __fsqrt_rn(a); }
ENGRAM_HD float rn_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
ENGRAM_HD double rn_add(double a, double b) { return __dadd_rn(a, b); }
ENGRAM_HD double rn_sub(double a, double b) { return __dsub_rn(a, b); }
ENGRAM_HD double rn_mul(double a, double b) { return __dmul_rn(a, b); }
ENGRAM_HD double rn_div(double a, double b) { return __ddiv_rn(a, b); }
ENGRAM_HD double rn_sqrt(double a) { return __dsqrt_rn(a); }
ENGRAM_HD double rn_fma(double a, double b, double c) { return __fma_rn(a, b, c); }
#else
ENGRAM_HD float rn_add(float a, float b) { return a + b; }
ENGRAM_HD float rn_sub(float a, float b) { return a - b; }
ENGRAM_HD float rn_mul(float a, float b) { return opaque(a * b); }
ENGRAM_HD float rn_div(float a, float b) { return a / b; }
ENGRAM_HD float rn_sqrt(float a) { return std::sqrt(a); }
ENGRAM_HD float rn_fma(float a, float b, float c) { return std::fma(a, b, c); }
ENGRAM_HD double rn_add(double a, double b) { return a + b; }
ENGRAM_HD double rn_sub(double a, double b) { return a - b; }
ENGRAM_HD double rn_mul(double a, double b) { return opaque(a * b); }
ENGRAM_HD double rn_div(double a, double b) { return a / b; }
ENGRAM_HD double rn_sqrt(double a) { return std::sqrt(a); }
ENGRAM_HD double rn_fma(double a, double b, double c) { return std::fma(a, b, c); }
#endif

// ---------------------------------------------------------------------------
// Update rules, one element (or one SIMD vector of elements) at a time
// ---------------------------------------------------------------------------
//
// Weight decay is applied to the touched rows only, when they are touched:
// a row that no token looks up keeps its value (and its state), where a
// dense optimizer would decay it every step.

// SGD: w -= lr * (g + wd * w). Both steps are fused multiply-adds, as in
// torch.optim.SGD (`grad.add(param, alpha=wd)`, `param.add_(grad, alpha=-lr)`).
template <typename V>
struct SgdCoeffs {
  V neg_lr;
  V weight_decay;
  bool l2;
};

template <typename T>
inline SgdCoeffs<T> sgd_coeffs(double lr, double weight_decay) {
  return {static_cast<T>(-lr), static_cast<T>(weight_decay), weight_decay != 0.0};
}

template <typename V>
ENGRAM_HD void sgd_update(V& w, V g, const SgdCoeffs<V>& c) {
  if (c.l2) g = rn_fma(w, c.weight_decay, g);
  w = rn_fma(g, c.neg_lr, w);
}

// Adam / AdamW on the touched rows, with torch.optim.SparseAdam's operations
// in its order (m, v: per-element moments; t: the optimizer's global step,
// counted once per update call, as SparseAdam counts it):
//   g  = g + wd * w                 (Adam's L2 weight decay, if wd > 0)
//   w  = w * (1 - lr * wd)          (AdamW's decoupled decay instead)
//   m += (g - m) * (1 - beta1)
//   v += (g * g - v) * (1 - beta2)
//   w += -step_size * (m / (sqrt(v) + eps)),
//   step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)   (in double)
template <typename V>
struct AdamCoeffs {
  V one_minus_beta1;
  V one_minus_beta2;
  V eps;
  V neg_step_size;
  V weight_decay;  // L2 (Adam)
  V decay;         // 1 - lr * wd (AdamW)
  bool l2;
  bool decoupled;
};

// -step_size for update number `step`, the same double expressions as
// SparseAdam's Python lines; on the host, or on the device from a step count
// held there (a captured CUDA graph replays it with the count of each replay).
ENGRAM_HD double adam_neg_step_size(double lr, double beta1, double beta2, int64_t step) {
  const double bias_correction1 = 1.0 - pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - pow(beta2, static_cast<double>(step));
  return -(lr * sqrt(bias_correction2) / bias_correction1);
}

template <typename T>
inline AdamCoeffs<T> adam_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay,
                                 bool decoupled, int64_t step) {
  const double step_size = -adam_neg_step_size(lr, beta1, beta2, step);
  AdamCoeffs<T> c;
  c.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  c.eps = static_cast<T>(eps);
  c.neg_step_size = static_cast<T>(-step_size);
  c.weight_decay = static_cast<T>(weight_decay);
  c.decay = static_cast<T>(1.0 - lr * weight_decay);
  c.l2 = weight_decay != 0.0 && !decoupled;
  c.decoupled = weight_decay != 0.0 && decoupled;
  return c;
}

template <typename V>
ENGRAM_HD void adam_update(V& w, V& m, V& v, V g, const AdamCoeffs<V>& c) {
  if (c.l2) g = rn_add(g, rn_mul(c.weight_decay, w));
  if (c.decoupled) w = rn_mul(w, c.decay);
  m = rn_add(m, rn_mul(rn_sub(g, m), c.one_minus_beta1));
  v = rn_add(v, rn_mul(rn_sub(rn_mul(g, g), v), c.one_minus_beta2));
  const V denom = rn_add(rn_sqrt(v), c.eps);
  w = rn_add(w, rn_mul(c.neg_step_size, rn_div(m, denom)));
}

// Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per
// row instead of one per element,
//   g   = g + wd * w                (L2 weight decay, if wd > 0)
//   acc += mean(g * g) over the row's Dh values
//   w  -= (lr / (sqrt(acc) + eps)) * g
template <typename V>
struct AdagradCoeffs {
  V lr;
  V eps;
  V weight_decay;
  bool l2;
};

template <typename T>
inline AdagradCoeffs<T> adagrad_coeffs(double lr, double eps, double weight_decay) {
  return {static_cast<T>(lr), static_cast<T>(eps), static_cast<T>(weight_decay), weight_decay != 0.0};
}

template <typename V>
ENGRAM_HD V adagrad_decayed_grad(V w, V g, const AdagradCoeffs<V>& c) {
  return c.l2 ? rn_add(g, rn_mul(c.weight_decay, w)) : g;
}

// The mean of g*g over a row is summed in one fixed order on every device:
// 32 lanes, lane l adding the values d = l, l + 32, l + 64, ... in turn, then
// the lanes pairwise (l + l^16, then l + l^8, ..., l + l^1), which is what a
// CUDA warp's xor-shuffle reduction computes in every lane.
constexpr int kRowLanes = 32;

template <typename T>
ENGRAM_HD T reduce_row_lanes(T* lanes) {
  for (int width = kRowLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] = rn_add(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

// New accumulator value and the row's step multiplier lr / (sqrt(acc) + eps),
// from the lane-reduced sum of squares.
template <typename T>
ENGRAM_HD T adagrad_accumulate(T& acc, T sum_of_squares, int64_t dim, const AdagradCoeffs<T>& c) {
  acc = rn_add(acc, rn_div(sum_of_squares, static_cast<T>(dim)));
  return rn_div(c.lr, rn_add(rn_sqrt(acc), c.eps));
}

template <typename V>
ENGRAM_HD void adagrad_apply(V& w, V g, V multiplier) {
  w = rn_sub(w, rn_mul(multiplier, g));
}

// Whole rows, for scalar types (the SIMD CPU kernels and the CUDA warps
// reproduce exactly these operations).
template <typename T>
ENGRAM_HD void sgd_row(T* w, const T* g, int64_t dim, const SgdCoeffs<T>& c) {
  for (int64_t d = 0; d < dim; ++d) sgd_update(w[d], g[d], c);
}

template <typename T>
ENGRAM_HD void adam_row(T* w, T* m, T* v, const T* g, int64_t dim, const AdamCoeffs<T>& c) {
  for (int64_t d = 0; d < dim; ++d) adam_update(w[d], m[d], v[d], g[d], c);
}

template <typename T>
ENGRAM_HD void adagrad_row(T* w, T& acc, const T* g, int64_t dim, const AdagradCoeffs<T>& c) {
  T lanes[kRowLanes];
  for (int l = 0; l < kRowLanes; ++l) lanes[l] = T(0);
  for (int64_t d = 0; d < dim; ++d) {
    const T gd = adagrad_decayed_grad(w[d], g[d], c);
    lanes[d % kRowLanes] = rn_add(lanes[d % kRowLanes], rn_mul(gd, gd));
  }
  const T multiplier = adagrad_accumulate(acc, reduce_row_lanes(lanes), dim, c);
  for (int64_t d = 0; d < dim; ++d) {
    // The decayed gradient is recomputed from the unchanged w[d]: the same value.
    adagrad_apply(w[d], adagrad_decayed_grad(w[d], g[d], c), multiplier);
  }
}

// ---------------------------------------------------------------------------
// Deduplication: stable LSD radix sort of packed (row, entry) keys
// ---------------------------------------------------------------------------
//
// Entry e (a flat index into ids [..., K]) that reads table row r becomes the
// 64-bit key (r << entry_bits) | e. Sorting by the row bits alone with a
// stable sort leaves the entries of each row in increasing order, so every
// row's gradients are summed in entry order, the order in which
// torch.sparse's coalesce() and the dense embedding backward add them: the
// sums are deterministic and match PyTorch's bit for bit.

// Smallest b with 2^b >= n (so values in [0, n) fit in b bits); 0 for n <= 1.
ENGRAM_HD int bits_for(uint64_t n) {
  int b = 0;
  while (b < 64 && (uint64_t(1) << b) < n) ++b;
  return b;
}

struct KeyLayout {
  int entry_bits;  // low bits: the entry index
  int row_bits;    // high bits: the row
  bool fits;       // entry_bits + row_bits <= 64

  ENGRAM_HD static KeyLayout make(uint64_t num_entries, uint64_t num_rows) {
    KeyLayout k;
    k.entry_bits = bits_for(num_entries);
    k.row_bits = bits_for(num_rows);
    k.fits = k.entry_bits + k.row_bits <= 64;
    return k;
  }
  ENGRAM_HD uint64_t pack(uint64_t row, uint64_t entry) const { return (row << entry_bits) | entry; }
  ENGRAM_HD uint64_t row(uint64_t key) const { return entry_bits >= 64 ? 0 : key >> entry_bits; }
  ENGRAM_HD uint64_t entry(uint64_t key) const {
    return entry_bits >= 64 ? key : key & ((uint64_t(1) << entry_bits) - 1);
  }
};

// Table row of entry e of ids [..., K] (+ offsets [K]), or -1 when outside
// [0, num_rows).
// entry_row with the entry's head (e % num_heads) given: the CUDA kernel steps
// it along its grid-stride loop instead of dividing per entry.
ENGRAM_HD int64_t entry_row_of_head(const int64_t* ids, const int64_t* offsets, int64_t head, int64_t e,
                                    int64_t num_rows) {
  const int64_t row = offsets ? ids[e] + offsets[head] : ids[e];
  return (row >= 0 && row < num_rows) ? row : -1;
}

ENGRAM_HD int64_t entry_row(const int64_t* ids, const int64_t* offsets, int64_t num_heads, int64_t e,
                            int64_t num_rows) {
  return entry_row_of_head(ids, offsets, offsets ? e % num_heads : 0, e, num_rows);
}

// Digit sizes of an LSD sort over `bits` key bits: as few passes as digits of
// at most max_digit_bits allow, the bits spread evenly over them (a 10.34 M-row
// table's 24 row bits: two 12-bit passes, whose 4096 counters stay in L1).
struct RadixPlan {
  int passes;
  int digit_bits;
  int64_t buckets() const { return int64_t(1) << digit_bits; }
  uint64_t mask() const { return (uint64_t(1) << digit_bits) - 1; }
};

constexpr int kMaxDigitBits = 12;

inline RadixPlan radix_plan(int bits, int max_digit_bits = kMaxDigitBits) {
  if (bits <= 0) return {0, 0};
  const int passes = (bits + max_digit_bits - 1) / max_digit_bits;
  return {passes, (bits + passes - 1) / passes};
}

// counts[digit] += number of keys in [begin, end) with that digit.
inline void radix_count(const uint64_t* keys, int64_t begin, int64_t end, int shift, uint64_t mask,
                        int64_t* counts) {
  for (int64_t i = begin; i < end; ++i) ++counts[(keys[i] >> shift) & mask];
}

// The digit counts of every pass in one read of the keys: counts[p * buckets
// + digit] for pass p (a pass does not change how many keys have a digit).
inline void radix_count_all(const uint64_t* keys, int64_t begin, int64_t end, int shift, const RadixPlan& plan,
                            int64_t* counts) {
  const uint64_t mask = plan.mask();
  const int64_t buckets = plan.buckets();
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t key = keys[i] >> shift;
    for (int p = 0; p < plan.passes; ++p) ++counts[p * buckets + ((key >> (p * plan.digit_bits)) & mask)];
  }
}

// Writes the keys of [begin, end) to out[next[digit]++], in input order.
inline void radix_scatter(const uint64_t* in, int64_t begin, int64_t end, int shift, uint64_t mask, int64_t* next,
                          uint64_t* out) {
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t key = in[i];
    out[next[(key >> shift) & mask]++] = key;
  }
}

// Single-threaded stable sort of n keys by bits [shift, shift + bits), using
// tmp (n keys) as scratch and counts (plan.passes * plan.buckets() counters);
// returns the buffer that holds the result (keys or tmp).
inline uint64_t* radix_sort(uint64_t* keys, uint64_t* tmp, int64_t n, int shift, int bits, int64_t* counts,
                            int max_digit_bits = kMaxDigitBits) {
  const RadixPlan plan = radix_plan(bits, max_digit_bits);
  const int64_t buckets = plan.buckets();
  for (int64_t b = 0; b < plan.passes * buckets; ++b) counts[b] = 0;
  radix_count_all(keys, 0, n, shift, plan, counts);
  for (int p = 0; p < plan.passes; ++p) {
    int64_t* next = counts + p * buckets;
    int64_t total = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      const int64_t c = next[b];
      next[b] = total;
      total += c;
    }
    radix_scatter(keys, 0, n, shift + p * plan.digit_bits, plan.mask(), next, tmp);
    uint64_t* t = keys;
    keys = tmp;
    tmp = t;
  }
  return keys;
}

// ---------------------------------------------------------------------------
// Segment sum
// ---------------------------------------------------------------------------

// Adds one entry's gradient row to a row sum in acc_t; the first entry of a
// row is copied, as torch.sparse's coalesce() does (so a lone -0.0 stays -0.0).
template <typename acc_t, typename scalar_t>
ENGRAM_HD void add_entry(acc_t* sum, const scalar_t* src, int64_t dim, bool first) {
  if (first) {
    for (int64_t d = 0; d < dim; ++d) sum[d] = static_cast<acc_t>(src[d]);
  } else {
    for (int64_t d = 0; d < dim; ++d) sum[d] = rn_add(sum[d], static_cast<acc_t>(src[d]));
  }
}

// Sum of the gradient rows of the entries sorted_keys[begin..end) (one table
// row's segment, begin < end), in entry order.
template <typename acc_t, typename scalar_t>
inline void sum_segment(const scalar_t* grad, int64_t dim, const uint64_t* sorted_keys, int64_t begin, int64_t end,
                        const KeyLayout& layout, acc_t* out) {
  for (int64_t i = begin; i < end; ++i) {
    add_entry(out, grad + static_cast<int64_t>(layout.entry(sorted_keys[i])) * dim, dim, i == begin);
  }
}

}  // namespace optim
}  // namespace engram
