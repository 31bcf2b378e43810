// Row-wise sparse optimizers for Engram tables (engram.optim), CPU kernels:
// deduplication + per-row gradient sums, and the in-place row updates (SGD,
// row-wise Adagrad, Adam / AdamW). The math is in kernels/optim_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "csrc/checks.h"
#include "kernels/layer_math.h"  // ENGRAM_RESTRICT
#include "kernels/optim_math.h"

namespace engram {

namespace {

using optim::KeyLayout;

// Work sizes below which a loop runs on one thread. Sorting and scanning a
// step's 262k keys (2 MiB) takes a few milliseconds on one core, and each
// parallel region costs a wake-up of every thread, which is slow on a busy
// machine; the segment sums and row updates move the data (tens of MB) and
// are split over all threads.
constexpr int64_t kSortGrain = int64_t(1) << 20;  // keys per radix-sort / scan chunk
constexpr int64_t kRowGrain = 256;      // table rows per update task
constexpr int64_t kPrefetchAhead = 8;   // rows (or entries) prefetched ahead

// Splits [0, n) into `chunks` near-equal ranges.
inline int64_t chunk_begin(int64_t n, int64_t chunks, int64_t c) { return n * c / chunks; }

int64_t num_chunks(int64_t n, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / grain));
}

// Prefetches the `bytes` of one row (64-byte cache lines).
inline void prefetch_row(const void* p, size_t bytes, bool write = true) {
  const char* c = static_cast<const char*>(p);
  for (size_t off = 0; off < bytes; off += 64) {
    if (write) {
      __builtin_prefetch(c + off, 1, 1);
    } else {
      __builtin_prefetch(c + off, 0, 1);
    }
  }
}

// Stable parallel LSD radix sort of keys[0, n) by `bits` bits from `shift`:
// per pass, every chunk counts its digits, the chunk-major exclusive prefix
// gives each (digit, chunk) a place after the same digit of earlier chunks,
// then every chunk scatters. Returns the buffer holding the result.
uint64_t* parallel_radix_sort(uint64_t* keys, uint64_t* tmp, int64_t n, int shift, int bits) {
  const optim::RadixPlan plan = optim::radix_plan(bits);
  const int64_t chunks = num_chunks(n, kSortGrain);
  if (chunks == 1) {
    std::vector<int64_t> counts(std::max<int64_t>(plan.passes * plan.buckets(), 1));
    return optim::radix_sort(keys, tmp, n, shift, bits, counts.data());
  }
  const int64_t buckets = plan.buckets();
  const uint64_t mask = plan.mask();
  std::vector<int64_t> counts(chunks * buckets);
  for (int p = 0; p < plan.passes; ++p) {
    const int s = shift + p * plan.digit_bits;
    at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        int64_t* chunk_counts = counts.data() + c * buckets;
        std::fill(chunk_counts, chunk_counts + buckets, 0);
        optim::radix_count(keys, chunk_begin(n, chunks, c), chunk_begin(n, chunks, c + 1), s, mask, chunk_counts);
      }
    });
    int64_t total = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t count = counts[c * buckets + b];
        counts[c * buckets + b] = total;
        total += count;
      }
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        optim::radix_scatter(keys, chunk_begin(n, chunks, c), chunk_begin(n, chunks, c + 1), s, mask,
                             counts.data() + c * buckets, tmp);
      }
    });
    std::swap(keys, tmp);
  }
  return keys;
}

std::tuple<at::Tensor, at::Tensor> dedup_row_grads_cpu(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                                       const std::optional<at::Tensor>& offsets,
                                                       int64_t num_rows) {
  constexpr const char* op = "dedup_row_grads";
  const int64_t K = check_dedup_args(grad_in, ids_in, offsets, num_rows);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t* offset_ptr = offsets.has_value() ? offset_table.const_data_ptr<int64_t>() : nullptr;
  const int64_t* id_ptr = ids.const_data_ptr<int64_t>();
  const int64_t E = ids.numel(), Dh = grad.size(-1);
  const KeyLayout layout = KeyLayout::make(static_cast<uint64_t>(E), static_cast<uint64_t>(num_rows));
  TORCH_CHECK_VALUE(layout.fits, op, ": ", E, " entries of a ", num_rows,
                    "-row table need more than 64 key bits; split the batch");

  // 1. Packed (row, entry) keys, token by token (no per-entry modulo for the
  // head's offset); out-of-range rows are reported after.
  // Left uninitialised: every key is written below, the scratch by the sort.
  const std::unique_ptr<uint64_t[]> buffer_a(new uint64_t[E]), buffer_b(new uint64_t[E]);
  std::atomic<bool> ok{true};
  at::parallel_for(0, E / K, std::max<int64_t>(1, kSortGrain / K), [&](int64_t begin, int64_t end) {
    bool good = true;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = t * K + k;
        const int64_t row = id_ptr[e] + (offset_ptr ? offset_ptr[k] : 0);
        const bool in_range = row >= 0 && row < num_rows;
        good &= in_range;
        buffer_a[e] = in_range ? layout.pack(static_cast<uint64_t>(row), static_cast<uint64_t>(e)) : 0;
      }
    }
    if (!good) ok.store(false, std::memory_order_relaxed);
  });
  if (!ok.load()) report_id_out_of_range({op, "ids", "num_rows"}, ids, offsets, num_rows);

  // 2. Sort by row, entries of a row in entry order.
  const uint64_t* sorted =
      parallel_radix_sort(buffer_a.get(), buffer_b.get(), E, layout.entry_bits, layout.row_bits);

  // 3. Segments: one per distinct row.
  const int64_t chunks = num_chunks(E, kSortGrain);
  std::vector<int64_t> chunk_heads(chunks + 1, 0);
  auto is_head = [&](int64_t i) { return i == 0 || layout.row(sorted[i]) != layout.row(sorted[i - 1]); };
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t heads = 0;
      for (int64_t i = chunk_begin(E, chunks, c); i < chunk_begin(E, chunks, c + 1); ++i) heads += is_head(i);
      chunk_heads[c + 1] = heads;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) chunk_heads[c + 1] += chunk_heads[c];
  const int64_t U = chunk_heads[chunks];
  at::Tensor unique_rows = at::empty({U}, ids.options());
  int64_t* unique_ptr = unique_rows.data_ptr<int64_t>();
  std::vector<int64_t> seg_start(U + 1);
  seg_start[U] = E;
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t u = chunk_heads[c];
      for (int64_t i = chunk_begin(E, chunks, c); i < chunk_begin(E, chunks, c + 1); ++i) {
        if (!is_head(i)) continue;
        unique_ptr[u] = static_cast<int64_t>(layout.row(sorted[i]));
        seg_start[u++] = i;
      }
    }
  });

  // 4. Per-row sums in entry order. Work is split by entries, not rows, so a
  // hot row (n-grams are Zipfian) does not leave the other threads idle;
  // each part takes the segments that start in its share of the entries.
  at::Tensor row_grads = at::empty({U, Dh}, grad.options());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, U / kRowGrain));
  auto first_segment = [&](int64_t part) {
    if (part >= parts) return U;
    const int64_t target = chunk_begin(E, parts, part);
    return static_cast<int64_t>(std::lower_bound(seg_start.begin(), seg_start.end() - 1, target) - seg_start.begin());
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = row_grads.data_ptr<scalar_t>();
    const size_t row_bytes = static_cast<size_t>(Dh) * sizeof(scalar_t);
    at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
      std::vector<acc_t> acc(Dh);
      const int64_t u_end = first_segment(p_end);
      for (int64_t u = first_segment(p_begin); u < u_end; ++u) {
        const int64_t begin = seg_start[u], end = seg_start[u + 1];
        for (int64_t i = begin; i < end; ++i) {
          if (i + kPrefetchAhead < E) {
            const int64_t ahead = static_cast<int64_t>(layout.entry(sorted[i + kPrefetchAhead]));
            prefetch_row(grad_ptr + ahead * Dh, row_bytes, /*write=*/false);
          }
          optim::add_entry(acc.data(), grad_ptr + static_cast<int64_t>(layout.entry(sorted[i])) * Dh, Dh, i == begin);
        }
        scalar_t* dst = out_ptr + u * Dh;
        for (int64_t d = 0; d < Dh; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return {unique_rows, row_grads};
}

// Rows must be in [0, num_rows) and strictly increasing (so no two tasks
// update one row), but for a suffix of -1 (dedup_row_grads_padded's padding),
// which is skipped; checked before anything is written. Returns the number of
// rows before the padding.
int64_t check_update_rows(const char* op, const at::Tensor& rows_in, int64_t num_rows) {
  const int64_t* r = rows_in.const_data_ptr<int64_t>();
  int64_t U = rows_in.numel();
  while (U > 0 && r[U - 1] == -1) --U;
  const at::Tensor rows = rows_in.narrow(0, 0, U);
  std::atomic<bool> ok{true};
  at::parallel_for(0, U, kSortGrain, [&](int64_t begin, int64_t end) {
    bool good = true;
    for (int64_t u = begin; u < end; ++u) {
      good &= r[u] >= 0 && r[u] < num_rows && (u == 0 || r[u - 1] < r[u]);
    }
    if (!good) ok.store(false, std::memory_order_relaxed);
  });
  if (!ok.load()) report_bad_update_rows(op, rows, num_rows);
  return U;
}

// --- SIMD value type for the float rules (x86-64: SSE2 is the baseline) ----

}  // namespace

namespace optim {
#if defined(__SSE2__)
// Four floats; the rules in optim_math.h run on it unchanged, one IEEE
// operation per step, so results equal the scalar rule's.
struct F32x4 {
  __m128 v;
  static F32x4 load(const float* p) { return {_mm_loadu_ps(p)}; }
  static F32x4 splat(float x) { return {_mm_set1_ps(x)}; }
  void store(float* p) const { _mm_storeu_ps(p, v); }
};
inline F32x4 rn_add(F32x4 a, F32x4 b) { return {_mm_add_ps(a.v, b.v)}; }
inline F32x4 rn_sub(F32x4 a, F32x4 b) { return {_mm_sub_ps(a.v, b.v)}; }
inline F32x4 rn_mul(F32x4 a, F32x4 b) { return {opaque(_mm_mul_ps(a.v, b.v))}; }
inline F32x4 rn_div(F32x4 a, F32x4 b) { return {_mm_div_ps(a.v, b.v)}; }
inline F32x4 rn_sqrt(F32x4 a) { return {_mm_sqrt_ps(a.v)}; }
#endif
}  // namespace optim

namespace {

// --- the update kernels ------------------------------------------------------

// Applies `update(u, row)` to every (u, rows[u]) on all threads, prefetching
// the rows of `tables` a few steps ahead (the rows are scattered over a table
// far bigger than the caches).
template <typename Update>
void for_each_row(const int64_t* rows, int64_t U, std::initializer_list<std::pair<const void*, size_t>> tables,
                  const Update& update) {
  std::vector<std::pair<const char*, size_t>> bases;
  for (const auto& t : tables) bases.emplace_back(static_cast<const char*>(t.first), t.second);
  at::parallel_for(0, U, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchAhead < end) {
        const int64_t ahead = rows[u + kPrefetchAhead];
        for (const auto& b : bases) prefetch_row(b.first + ahead * b.second, b.second);
      }
      update(u, rows[u]);
    }
  });
}

// Per-row kernels: the scalar rules of optim_math.h, and for float tables
// the same rules on F32x4 (SGD: fma loops).
template <typename T>
struct SgdRow {
  optim::SgdCoeffs<T> c;
  void operator()(T* w, const T* g, int64_t dim) const { optim::sgd_row(w, g, dim, c); }
};

// SGD is fused multiply-adds only (as torch.optim.SGD's add with alpha), so
// the result is the same on every CPU; built for baseline x86-64, std::fma is
// a call into the C library, which uses the FMA instruction where it exists.
// (The optimizer's kernels are not multiversioned by ENGRAM_CPU_ISA.)
inline void sgd_row_float(float* ENGRAM_RESTRICT w, const float* ENGRAM_RESTRICT g, int64_t dim,
                                     float neg_lr, float weight_decay, bool l2) {
  if (l2) {
    for (int64_t d = 0; d < dim; ++d) w[d] = std::fma(std::fma(w[d], weight_decay, g[d]), neg_lr, w[d]);
  } else {
    for (int64_t d = 0; d < dim; ++d) w[d] = std::fma(g[d], neg_lr, w[d]);
  }
}

template <>
struct SgdRow<float> {
  optim::SgdCoeffs<float> c;
  void operator()(float* w, const float* g, int64_t dim) const {
    sgd_row_float(w, g, dim, c.neg_lr, c.weight_decay, c.l2);
  }
};

template <typename T>
struct AdamRow {
  explicit AdamRow(const optim::AdamCoeffs<T>& coeffs) : c(coeffs) {}
  optim::AdamCoeffs<T> c;
  void operator()(T* w, T* m, T* v, const T* g, int64_t dim) const { optim::adam_row(w, m, v, g, dim, c); }
};

template <typename T>
struct AdagradRow {
  explicit AdagradRow(const optim::AdagradCoeffs<T>& coeffs) : c(coeffs) {}
  optim::AdagradCoeffs<T> c;
  void operator()(T* w, T& acc, const T* g, int64_t dim) const { optim::adagrad_row(w, acc, g, dim, c); }
};

#if defined(__SSE2__)
using optim::F32x4;

template <>
struct AdamRow<float> {
  explicit AdamRow(const optim::AdamCoeffs<float>& coeffs)
      : c(coeffs),
        c4{F32x4::splat(c.one_minus_beta1), F32x4::splat(c.one_minus_beta2), F32x4::splat(c.eps),
           F32x4::splat(c.neg_step_size),   F32x4::splat(c.weight_decay),    F32x4::splat(c.decay),
           c.l2,                            c.decoupled} {}
  optim::AdamCoeffs<float> c;
  optim::AdamCoeffs<F32x4> c4;

  void operator()(float* w, float* m, float* v, const float* g, int64_t dim) const {
    int64_t d = 0;
    for (; d + 4 <= dim; d += 4) {
      F32x4 wv = F32x4::load(w + d), mv = F32x4::load(m + d), vv = F32x4::load(v + d);
      optim::adam_update(wv, mv, vv, F32x4::load(g + d), c4);
      wv.store(w + d);
      mv.store(m + d);
      vv.store(v + d);
    }
    for (; d < dim; ++d) optim::adam_update(w[d], m[d], v[d], g[d], c);
  }
};

template <>
struct AdagradRow<float> {
  explicit AdagradRow(const optim::AdagradCoeffs<float>& coeffs)
      : c(coeffs), c4{F32x4::splat(c.lr), F32x4::splat(c.eps), F32x4::splat(c.weight_decay), c.l2} {}
  optim::AdagradCoeffs<float> c;
  optim::AdagradCoeffs<F32x4> c4;

  void operator()(float* w, float& acc, const float* g, int64_t dim) const {
    if (dim % optim::kRowLanes != 0) return optim::adagrad_row(w, acc, g, dim, c);
    // Lanes 4j..4j+3 of the fixed reduction order live in vector j.
    constexpr int kVectors = optim::kRowLanes / 4;
    F32x4 sums[kVectors];
    for (auto& s : sums) s = F32x4::splat(0.0f);
    for (int64_t d = 0; d < dim; d += optim::kRowLanes) {
      for (int j = 0; j < kVectors; ++j) {
        const F32x4 gd = optim::adagrad_decayed_grad(F32x4::load(w + d + 4 * j), F32x4::load(g + d + 4 * j), c4);
        sums[j] = optim::rn_add(sums[j], optim::rn_mul(gd, gd));
      }
    }
    alignas(16) float lanes[optim::kRowLanes];
    for (int j = 0; j < kVectors; ++j) sums[j].store(lanes + 4 * j);
    const F32x4 multiplier = F32x4::splat(optim::adagrad_accumulate(acc, optim::reduce_row_lanes(lanes), dim, c));
    for (int64_t d = 0; d < dim; d += 4) {
      F32x4 wv = F32x4::load(w + d);
      optim::adagrad_apply(wv, optim::adagrad_decayed_grad(wv, F32x4::load(g + d), c4), multiplier);
      wv.store(w + d);
    }
  }
};
#endif

// dedup_row_grads, padded to the entries with rows of -1 and zero grads.
std::tuple<at::Tensor, at::Tensor> dedup_row_grads_padded_cpu(const at::Tensor& grad, const at::Tensor& ids,
                                                              const std::optional<at::Tensor>& offsets,
                                                              int64_t num_rows) {
  const auto [rows, row_grads] = dedup_row_grads_cpu(grad, ids, offsets, num_rows);
  const int64_t E = ids.numel(), U = rows.size(0);
  at::Tensor padded_rows = at::full({E}, -1, rows.options());
  at::Tensor padded_grads = at::zeros({E, row_grads.size(1)}, row_grads.options());
  padded_rows.narrow(0, 0, U).copy_(rows);
  padded_grads.narrow(0, 0, U).copy_(row_grads);
  return {padded_rows, padded_grads};
}

void rowwise_sgd_update_cpu(at::Tensor& weight, const at::Tensor& rows_in, const at::Tensor& row_grads_in, double lr,
                            double weight_decay) {
  constexpr const char* op = "rowwise_sgd_update";
  const int64_t entries = check_sgd_update_args(weight, rows_in, row_grads_in, lr, weight_decay);
  if (entries == 0) return;
  const at::Tensor rows = rows_in.contiguous(), row_grads = row_grads_in.contiguous();
  const int64_t U = check_update_rows(op, rows, weight.size(0));
  const int64_t Dh = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* g = row_grads.const_data_ptr<scalar_t>();
    const SgdRow<scalar_t> kernel{optim::sgd_coeffs<scalar_t>(lr, weight_decay)};
    for_each_row(rows.const_data_ptr<int64_t>(), U, {{w, Dh * sizeof(scalar_t)}},
                 [&](int64_t u, int64_t r) { kernel(w + r * Dh, g + u * Dh, Dh); });
  });
}

void rowwise_adam_update_cpu(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                             const at::Tensor& rows_in, const at::Tensor& row_grads_in, double lr, double beta1,
                             double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                             int64_t step, const std::optional<at::Tensor>& step_count) {
  constexpr const char* op = "rowwise_adam_update";
  const int64_t entries = check_adam_update_args(weight, exp_avg, exp_avg_sq, rows_in, row_grads_in, lr, beta1, beta2,
                                                 eps, weight_decay, step, step_count);
  if (step_count.has_value()) {
    step = step_count->item<int64_t>();  // on the CPU: a read, no sync
    TORCH_CHECK_VALUE(step >= 1, adam_step_message(op, "step_count holds ", step));
  }
  if (entries == 0) return;
  const at::Tensor rows = rows_in.contiguous(), row_grads = row_grads_in.contiguous();
  const int64_t U = check_update_rows(op, rows, weight.size(0));
  const int64_t Dh = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* g = row_grads.const_data_ptr<scalar_t>();
    const AdamRow<scalar_t> kernel(
        optim::adam_coeffs<scalar_t>(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, step));
    const size_t row_bytes = Dh * sizeof(scalar_t);
    for_each_row(rows.const_data_ptr<int64_t>(), U, {{w, row_bytes}, {m, row_bytes}, {v, row_bytes}},
                 [&](int64_t u, int64_t r) { kernel(w + r * Dh, m + r * Dh, v + r * Dh, g + u * Dh, Dh); });
  });
}

void rowwise_adagrad_update_cpu(at::Tensor& weight, at::Tensor& sum_sq, const at::Tensor& rows_in,
                                const at::Tensor& row_grads_in, double lr, double eps, double weight_decay) {
  constexpr const char* op = "rowwise_adagrad_update";
  const int64_t entries = check_adagrad_update_args(weight, sum_sq, rows_in, row_grads_in, lr, eps, weight_decay);
  if (entries == 0) return;
  const at::Tensor rows = rows_in.contiguous(), row_grads = row_grads_in.contiguous();
  const int64_t U = check_update_rows(op, rows, weight.size(0));
  const int64_t Dh = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* acc = sum_sq.data_ptr<scalar_t>();
    const scalar_t* g = row_grads.const_data_ptr<scalar_t>();
    const AdagradRow<scalar_t> kernel(optim::adagrad_coeffs<scalar_t>(lr, eps, weight_decay));
    for_each_row(rows.const_data_ptr<int64_t>(), U, {{w, Dh * sizeof(scalar_t)}},
                 [&](int64_t u, int64_t r) { kernel(w + r * Dh, acc[r], g + u * Dh, Dh); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("dedup_row_grads", &dedup_row_grads_cpu);
  m.impl("dedup_row_grads_padded", &dedup_row_grads_padded_cpu);
  m.impl("rowwise_sgd_update", &rowwise_sgd_update_cpu);
  m.impl("rowwise_adagrad_update", &rowwise_adagrad_update_cpu);
  m.impl("rowwise_adam_update", &rowwise_adam_update_cpu);
}

}  // namespace engram
