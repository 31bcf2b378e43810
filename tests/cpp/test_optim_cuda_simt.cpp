// The row-wise optimizer CUDA kernels (kernels/optim_cuda.cuh) in the SIMT
// emulator (tests/cpp/simt.h), one warp per item as csrc/cuda/optim.cu
// launches them: the deduplication pipeline (keys, a sort, run heads, a
// running max, flags, scans, segments, piece sums, row sums) with the
// launcher's torch steps done on the host, and the SGD / Adam / Adagrad row
// updates. Every result must equal the CPU kernels of kernels/optim_math.h
// bit for bit: a row of at most kPieceEntries entries summed in pure entry
// order (sum_segment), a hotter one piece by piece; the updates the CPU row
// functions. Each case also runs with the grid capped at 2 blocks (the
// grid-stride loops wrap) and in reverse thread order.
#include "tests/cpp/simt.h"
// clang-format off: the emulator must come first
#include "kernels/optim_cuda.cuh"
// clang-format on

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

namespace {

using namespace engram;
using namespace engram::cuda_optim;

int64_t g_block_cap = 65535;

template <typename F>
void launch_1d(int64_t threads, F body) {
  simt::launch(blocks_for(threads, g_block_cap), kThreads, body);
}

// Runs test() at the launcher's cap, capped at 2 blocks, and in reverse order.
template <typename F>
void in_every_shape(F test) {
  struct Run {
    int64_t cap;
    simt::Schedule schedule;
  };
  for (const Run run : {Run{65535, simt::Schedule::kForward}, Run{2, simt::Schedule::kForward},
                        Run{65535, simt::Schedule::kReverse}}) {
    SCOPED_TRACE(testing::Message() << "block cap " << run.cap << " schedule " << static_cast<int>(run.schedule));
    g_block_cap = run.cap;
    simt::set_schedule(run.schedule);
    test();
  }
  g_block_cap = 65535;
  simt::set_schedule(simt::Schedule::kForward);
}

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

template <typename T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!same_bits(got[i], want[i])) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << want[i];
      if (++reported >= 5) return;
    }
  }
}

// dedup_row_grads_cuda's steps; returns false if an id was out of range.
template <typename scalar_t, typename acc_t>
bool gpu_dedup(const std::vector<scalar_t>& grad, int64_t dim, const std::vector<int64_t>& ids,
               const std::vector<int64_t>* offsets, int64_t num_rows, std::vector<int64_t>& unique_rows,
               std::vector<scalar_t>& row_grads) {
  const int64_t E = static_cast<int64_t>(ids.size()), K = offsets ? static_cast<int64_t>(offsets->size()) : 1;
  const optim::KeyLayout layout = optim::KeyLayout::make(static_cast<uint64_t>(E), static_cast<uint64_t>(num_rows));
  std::vector<int64_t> keys(E, -1);
  int bad = 0;
  const int64_t* offset_ptr = offsets ? offsets->data() : nullptr;
  launch_1d(E, [&] { dedup_keys_kernel(ids.data(), offset_ptr, K, E, num_rows, layout, keys.data(), &bad); });
  if (bad) return false;
  std::vector<int64_t> sorted = keys;
  std::sort(sorted.begin(), sorted.end());  // at::sort
  std::vector<int64_t> head_pos(E, -1);
  launch_1d(E, [&] { run_heads_kernel(sorted.data(), E, layout, head_pos.data()); });
  std::vector<int64_t> run_start(E);  // at::cummax
  for (int64_t i = 0; i < E; ++i) run_start[i] = i == 0 ? head_pos[0] : std::max(run_start[i - 1], head_pos[i]);
  std::vector<int64_t> flags(2 * E, -1);
  launch_1d(E, [&] { run_flags_kernel(run_start.data(), E, flags.data()); });
  std::vector<int64_t> scans(2 * E);  // at::cumsum(flags, 1)
  for (int half = 0; half < 2; ++half) {
    int64_t total = 0;
    for (int64_t i = 0; i < E; ++i) scans[half * E + i] = total += flags[half * E + i];
  }
  const int64_t U = scans[E - 1], pieces = scans[2 * E - 1];
  unique_rows.assign(U, -1);
  std::vector<int64_t> row_first_piece(U + 1, -1), piece_start(pieces + 1, -1);
  launch_1d(E, [&] {
    segments_kernel(sorted.data(), scans.data(), E, U, pieces, layout, unique_rows.data(), row_first_piece.data(),
                    piece_start.data());
  });
  std::vector<acc_t> partial(pieces * dim, acc_t(-1));
  launch_1d(pieces * kWarp, [&] {
    piece_sums_kernel<scalar_t, acc_t>(grad.data(), dim, sorted.data(), layout, piece_start.data(), pieces,
                                       partial.data());
  });
  row_grads.assign(U * dim, scalar_t(-1));
  launch_1d(U * kWarp, [&] {
    row_sums_kernel<scalar_t, acc_t>(partial.data(), dim, row_first_piece.data(), U, row_grads.data());
  });
  return true;
}

// The documented order on the host: each row's entries in entry order, cut
// into pieces of kPieceEntries from the row's first entry; pieces summed in
// entry order (first copied), then added in order.
template <typename scalar_t, typename acc_t>
void host_dedup(const std::vector<scalar_t>& grad, int64_t dim, const std::vector<int64_t>& ids,
                const std::vector<int64_t>* offsets, int64_t num_rows, std::vector<int64_t>& unique_rows,
                std::vector<scalar_t>& row_grads, std::vector<int64_t>& counts) {
  const int64_t E = static_cast<int64_t>(ids.size()), K = offsets ? static_cast<int64_t>(offsets->size()) : 1;
  const optim::KeyLayout layout = optim::KeyLayout::make(static_cast<uint64_t>(E), static_cast<uint64_t>(num_rows));
  std::vector<uint64_t> keys(E), tmp(E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t row = optim::entry_row(ids.data(), offsets ? offsets->data() : nullptr, K, e, num_rows);
    keys[e] = layout.pack(static_cast<uint64_t>(row), static_cast<uint64_t>(e));
  }
  std::vector<int64_t> radix_counts(1 << 13);
  const uint64_t* sorted =
      optim::radix_sort(keys.data(), tmp.data(), E, layout.entry_bits, layout.row_bits, radix_counts.data());
  unique_rows.clear();
  row_grads.clear();
  counts.clear();
  for (int64_t begin = 0; begin < E;) {
    int64_t end = begin;
    while (end < E && layout.row(sorted[end]) == layout.row(sorted[begin])) ++end;
    std::vector<acc_t> row(dim), piece(dim);
    for (int64_t p = begin; p < end; p += kPieceEntries) {
      const int64_t p_end = std::min(end, p + kPieceEntries);
      optim::sum_segment(grad.data(), dim, sorted, p, p_end, layout, piece.data());
      for (int64_t d = 0; d < dim; ++d) row[d] = p == begin ? piece[d] : optim::rn_add(row[d], piece[d]);
    }
    if (end - begin <= kPieceEntries) {  // and a cold row is exactly the CPU's segment sum
      std::vector<acc_t> cpu(dim);
      optim::sum_segment(grad.data(), dim, sorted, begin, end, layout, cpu.data());
      for (int64_t d = 0; d < dim; ++d) EXPECT_TRUE(same_bits(cpu[d], row[d]));
    }
    unique_rows.push_back(static_cast<int64_t>(layout.row(sorted[begin])));
    for (int64_t d = 0; d < dim; ++d) row_grads.push_back(static_cast<scalar_t>(row[d]));
    counts.push_back(end - begin);
    begin = end;
  }
}

template <typename scalar_t, typename acc_t>
void check_dedup(int64_t entries, int64_t dim, int64_t num_rows, int64_t hot_entries, bool with_offsets,
                 uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "entries " << entries << " dim " << dim << " rows " << num_rows << " hot "
                                  << hot_entries << " offsets " << with_offsets);
  std::mt19937_64 rng(seed);
  const std::vector<int64_t> offsets = {0, num_rows / 2};
  const int64_t K = with_offsets ? 2 : 1, span = with_offsets ? num_rows / 2 : num_rows;
  std::vector<int64_t> ids(entries);
  for (int64_t e = 0; e < entries; ++e) ids[e] = static_cast<int64_t>(rng() % static_cast<uint64_t>(span));
  // A Zipfian head: many entries of one row (every K-th entry, head 0).
  for (int64_t e = 0; e < entries && e / K < hot_entries; e += K) ids[e] = 3 % span;
  std::uniform_real_distribution<double> dist(-1, 1);
  std::vector<scalar_t> grad(entries * dim);
  for (scalar_t& g : grad) g = static_cast<scalar_t>(dist(rng));
  const std::vector<int64_t>* off = with_offsets ? &offsets : nullptr;
  std::vector<int64_t> want_rows, counts;
  std::vector<scalar_t> want;
  host_dedup<scalar_t, acc_t>(grad, dim, ids, off, num_rows, want_rows, want, counts);
  if (hot_entries > kPieceEntries) {
    EXPECT_GT(*std::max_element(counts.begin(), counts.end()), kPieceEntries);
  }
  in_every_shape([&] {
    std::vector<int64_t> rows;
    std::vector<scalar_t> got;
    ASSERT_TRUE((gpu_dedup<scalar_t, acc_t>(grad, dim, ids, off, num_rows, rows, got)));
    EXPECT_EQ(rows, want_rows);
    expect_same_bits(got, want, "row_grads");
  });
}

TEST(OptimCudaSimt, DedupEqualsTheCpuOrderBitForBit) {
  uint64_t seed = 1;
  for (int64_t dim : {1, 5, 31, 32, 33, 70}) {
    check_dedup<float, float>(1, dim, 7, 0, false, seed++);  // one entry
    check_dedup<float, float>(40, dim, 9, 0, true, seed++);
    check_dedup<double, double>(150, dim, 64, 100, false, seed++);  // a row of 100 entries: 4 pieces
  }
  check_dedup<float, double>(600, 3, 1000, 500, true, seed++);  // over 2 blocks of items
}

// dedup_keys_kernel steps each thread's head (e % K) along its grid-stride
// loop: head counts that do not divide the grid's stride, a grid of one
// block (each thread wraps several times) and one of 2, against entry_row.
TEST(OptimCudaSimt, DedupKeysStepTheHeadOfEveryEntry) {
  const int64_t E = 1000, num_rows = 400;
  std::mt19937_64 rng(21);
  for (int64_t K : {1, 3, 7}) {
    std::vector<int64_t> offsets(K), ids(E);
    for (int64_t k = 0; k < K; ++k) offsets[k] = 10 * k;
    for (auto& id : ids) id = static_cast<int64_t>(rng() % 330);
    const optim::KeyLayout layout = optim::KeyLayout::make(E, num_rows);
    for (const int64_t* off : {static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(offsets.data())}) {
      std::vector<int64_t> want(E);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t row = optim::entry_row(ids.data(), off, K, e, num_rows);
        want[e] = static_cast<int64_t>(layout.pack(static_cast<uint64_t>(row), static_cast<uint64_t>(e)));
      }
      for (int64_t cap : {int64_t{65535}, int64_t{2}, int64_t{1}}) {
        std::vector<int64_t> keys(E, -1);
        int bad = 0;
        simt::launch(blocks_for(E, cap), kThreads,
                     [&] { dedup_keys_kernel(ids.data(), off, K, E, num_rows, layout, keys.data(), &bad); });
        EXPECT_EQ(bad, 0);
        EXPECT_EQ(keys, want) << "K " << K << " offsets " << (off != nullptr) << " cap " << cap;
      }
    }
  }
}

TEST(OptimCudaSimt, DedupFlagsAnIdOutsideTheTable) {
  const std::vector<int64_t> ids = {0, 4, 9, 1};
  const std::vector<float> grad(4 * 2, 1.f);
  std::vector<int64_t> rows;
  std::vector<float> got;
  EXPECT_FALSE((gpu_dedup<float, float>(grad, 2, ids, nullptr, 9, rows, got)));
  const std::vector<int64_t> offsets = {0, 5};
  EXPECT_FALSE((gpu_dedup<float, float>(grad, 2, {0, 4, 1, -6}, &offsets, 9, rows, got)));
  EXPECT_TRUE((gpu_dedup<float, float>(grad, 2, {0, 3, 1, 2}, &offsets, 9, rows, got)));
  EXPECT_EQ(rows, (std::vector<int64_t>{0, 1, 7, 8}));
}

enum class Rule { kSgd, kAdam, kAdagrad };

template <typename T>
void check_update(Rule rule, int64_t num_rows, int64_t dim, const std::vector<int64_t>& rows, bool decay,
                  uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "rule " << static_cast<int>(rule) << " dim " << dim << " rows "
                                  << rows.size() << " decay " << decay);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-1, 1);
  const int64_t U = static_cast<int64_t>(rows.size());
  std::vector<T> weight(num_rows * dim), state1(num_rows * dim), state2(num_rows * dim), acc(num_rows),
      grads(U * dim);
  for (T& w : weight) w = static_cast<T>(dist(rng));
  for (T& m : state1) m = static_cast<T>(0.1 * dist(rng));
  for (T& v : state2) v = static_cast<T>(0.01 + 0.01 * dist(rng));
  for (T& a : acc) a = static_cast<T>(0.5 + 0.25 * dist(rng));
  for (T& g : grads) g = static_cast<T>(dist(rng));
  const double wd = decay ? 0.01 : 0.0;
  const auto sgd = optim::sgd_coeffs<T>(0.1, wd);
  const auto adam = optim::adam_coeffs<T>(1e-3, 0.9, 0.999, 1e-8, wd, true, 3);
  const auto adagrad = optim::adagrad_coeffs<T>(0.05, 1e-10, wd);
  std::vector<T> want_w = weight, want_1 = state1, want_2 = state2, want_acc = acc;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t r = rows[u];
    const T* g = grads.data() + u * dim;
    if (rule == Rule::kSgd) optim::sgd_row(&want_w[r * dim], g, dim, sgd);
    if (rule == Rule::kAdam) optim::adam_row(&want_w[r * dim], &want_1[r * dim], &want_2[r * dim], g, dim, adam);
    if (rule == Rule::kAdagrad) optim::adagrad_row(&want_w[r * dim], want_acc[r], g, dim, adagrad);
  }
  in_every_shape([&] {
    std::vector<T> w = weight, m = state1, v = state2, a = acc;
    const int run = 0;  // the check found the rows good
    launch_1d(U * kWarp, [&] {
      if (rule == Rule::kSgd) sgd_rows_kernel<T>(w.data(), rows.data(), grads.data(), U, dim, sgd, &run);
      if (rule == Rule::kAdam)
        adam_rows_kernel<T>(w.data(), m.data(), v.data(), rows.data(), grads.data(), U, dim, adam, &run);
      if (rule == Rule::kAdagrad)
        adagrad_rows_kernel<T>(w.data(), a.data(), rows.data(), grads.data(), U, dim, adagrad, &run);
    });
    expect_same_bits(w, want_w, "weight");
    // A launch after a failed check (skip set) writes nothing.
    std::vector<T> w_skipped = weight, m_skipped = state1;
    const int skipped = 1;
    launch_1d(U * kWarp, [&] {
      if (rule == Rule::kSgd) sgd_rows_kernel<T>(w_skipped.data(), rows.data(), grads.data(), U, dim, sgd, &skipped);
      if (rule == Rule::kAdam)
        adam_rows_kernel<T>(w_skipped.data(), m_skipped.data(), v.data(), rows.data(), grads.data(), U, dim, adam,
                            &skipped);
      if (rule == Rule::kAdagrad)
        adagrad_rows_kernel<T>(w_skipped.data(), a.data(), rows.data(), grads.data(), U, dim, adagrad, &skipped);
    });
    expect_same_bits(w_skipped, weight, "weight after a skipped update");
    expect_same_bits(m, want_1, "exp_avg");
    expect_same_bits(v, want_2, "exp_avg_sq");
    expect_same_bits(a, want_acc, "sum_sq");
  });
}

TEST(OptimCudaSimt, RowUpdatesEqualTheCpuRowsBitForBit) {
  uint64_t seed = 50;
  std::vector<int64_t> many;  // 70 warps of rows: 9 blocks, or wrapped in 2
  for (int64_t r = 1; r < 140; r += 2) many.push_back(r);
  for (Rule rule : {Rule::kSgd, Rule::kAdam, Rule::kAdagrad}) {
    for (int64_t dim : {1, 7, 32, 45, 64}) {
      check_update<float>(rule, 10, dim, {2}, false, seed++);
      check_update<float>(rule, 10, dim, {0, 3, 4, 9}, true, seed++);
      check_update<double>(rule, 10, dim, {1, 5, 8}, true, seed++);
    }
    check_update<float>(rule, 140, 33, many, true, seed++);
  }
}

TEST(OptimCudaSimt, PaddingRowsAreSkippedByEveryUpdateKernel) {
  // rows {1, 3} then dedup_row_grads_padded's -1 padding: the same result as rows {1, 3} alone.
  const int64_t dim = 37, num_rows = 5;
  std::vector<float> weight(num_rows * dim), state(num_rows * dim), acc(num_rows, 0.5f), grads(4 * dim);
  for (size_t i = 0; i < weight.size(); ++i) weight[i] = 0.01f * static_cast<float>(i % 17) - 0.05f;
  for (size_t i = 0; i < grads.size(); ++i) grads[i] = 0.02f * static_cast<float>(i % 11) - 0.1f;
  const std::vector<int64_t> padded = {1, 3, -1, -1}, plain = {1, 3};
  const auto sgd = optim::sgd_coeffs<float>(0.1, 0.0);
  const auto adam = optim::adam_coeffs<float>(1e-3, 0.9, 0.999, 1e-8, 0.0, true, 1);
  const auto adagrad = optim::adagrad_coeffs<float>(0.05, 1e-10, 0.0);
  const int run = 0;
  in_every_shape([&] {
    for (int rule = 0; rule < 3; ++rule) {
      SCOPED_TRACE(testing::Message() << "rule " << rule);
      std::vector<float> w1 = weight, m1 = state, v1 = state, a1 = acc, w2 = weight, m2 = state, v2 = state, a2 = acc;
      const auto launch = [&](const std::vector<int64_t>& rows, std::vector<float>& w, std::vector<float>& m,
                              std::vector<float>& v, std::vector<float>& a) {
        const int64_t U = static_cast<int64_t>(rows.size());
        launch_1d(U * kWarp, [&] {
          if (rule == 0) sgd_rows_kernel<float>(w.data(), rows.data(), grads.data(), U, dim, sgd, &run);
          if (rule == 1)
            adam_rows_kernel<float>(w.data(), m.data(), v.data(), rows.data(), grads.data(), U, dim, adam, &run);
          if (rule == 2)
            adagrad_rows_kernel<float>(w.data(), a.data(), rows.data(), grads.data(), U, dim, adagrad, &run);
        });
      };
      launch(padded, w1, m1, v1, a1);
      launch(plain, w2, m2, v2, a2);
      expect_same_bits(w1, w2, "weight");
      expect_same_bits(m1, m2, "exp_avg");
      expect_same_bits(a1, a2, "sum_sq");
      EXPECT_NE(w1, weight);
    }
  });
}

}  // namespace
