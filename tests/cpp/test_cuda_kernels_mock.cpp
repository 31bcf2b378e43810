// The hash, compress and embedding CUDA kernels (kernels/cuda_kernels.cuh) run
// in the SIMT emulator (tests/cpp/simt.h) at the launch shapes of
// csrc/cuda/hash_embedding_ops.cu, against the host hash functions and plain loops: what
// each kernel writes, and the error record it leaves. Each launch runs twice:
// at the launcher's block cap, and with the grid capped at 2 blocks so that
// the grid-stride loops wrap as they do past 65,535 blocks.
#include "tests/cpp/simt.h"
// clang-format off: the emulator must come first
#include "kernels/cuda_kernels.cuh"
#include "kernels/update_rows_cuda.cuh"
// clang-format on

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

namespace {

using namespace engram;
using namespace engram::cuda;

int64_t g_block_cap = 65535;

// A launch as the launchers make it: blocks_for(threads) blocks of kThreads.
template <typename F>
void launch_1d(int64_t threads, F body) {
  simt::launch(blocks_for(threads, g_block_cap), kThreads, body);
}

// Runs test() at the launchers' cap and with a grid of at most 2 blocks.
template <typename F>
void at_both_caps(F test) {
  for (int64_t cap : {int64_t{65535}, int64_t{2}}) {
    SCOPED_TRACE(testing::Message() << "block cap " << cap);
    g_block_cap = cap;
    test();
  }
  g_block_cap = 65535;
}

// hash_mods_kernel's launch: a thread per head, no grid-stride loop.
template <typename F>
void launch_mods(int64_t heads, F body) {
  simt::launch(hash_mods_blocks(heads), kThreads, body);
}

struct ErrorSlot {
  int claimed = 0;
  DeviceErrorRecord record{};
  DeviceErrorSlot slot(int op = 7) { return DeviceErrorSlot{&claimed, &record, op}; }
};

TEST(CudaKernelsMock, CompressPassesNegativesAndOneOfTheRacingReportsWins) {
  const std::vector<int64_t> lookup = {3, 1, 4, 1, 5};
  const std::vector<int64_t> ids = {0, -2, 4, 9, 2, 5};
  // Threads 3 and 5 both report; whichever claims the slot first writes the
  // whole record, and the other's fields never mix in.
  std::vector<int64_t> winners;
  for (simt::Schedule sched : {simt::Schedule::kForward, simt::Schedule::kReverse}) {
    simt::set_schedule(sched);
    std::vector<int64_t> out(ids.size(), -100);
    ErrorSlot err;
    launch_1d(6, [&] { compress_kernel(ids.data(), static_cast<int64_t>(ids.size()), lookup.data(), 5, out.data(), err.slot(1)); });
    EXPECT_EQ(out, (std::vector<int64_t>{3, -2, 5, 0, 4, 0}));
    ASSERT_EQ(err.record.ready, 1);
    EXPECT_EQ(err.claimed, 1);
    EXPECT_EQ(err.record.op, 1);
    EXPECT_EQ(err.record.kind, kIdOutOfRange);
    ASSERT_TRUE(err.record.index == 3 || err.record.index == 5) << err.record.index;
    EXPECT_EQ(err.record.value, ids[err.record.index]);
    EXPECT_EQ(err.record.limit, 5);
    EXPECT_EQ(err.record.head, -1);
    winners.push_back(err.record.index);
  }
  simt::set_schedule(simt::Schedule::kForward);
  EXPECT_NE(winners[0], winners[1]);  // both orders of the race were run
}

TEST(CudaKernelsMock, NgramHashMatchesTheHostHashPerToken) {
  const int L = 2, N = 3, H = 2, K = (N - 1) * H, B = 2, T = 5;
  const int64_t vocab = 50, pad_id = 7;
  std::vector<int64_t> lookup(vocab);
  for (int64_t i = 0; i < vocab; ++i) lookup[i] = (i * 7) % 31;
  std::mt19937_64 rng(3);
  std::vector<int64_t> ids(B * T);
  for (auto& id : ids) id = static_cast<int64_t>(rng() % vocab);
  ids[3] = -4;  // negative ids pass through compression
  const std::vector<int64_t> sizes = {101, 103, 107, 109, 113, 127, 131, 137};
  std::vector<int64_t> offsets(L * K);
  for (int l = 0; l < L; ++l) {
    int64_t base = 0;
    for (int k = 0; k < K; ++k) offsets[l * K + k] = base, base += sizes[l * K + k];
  }
  const std::vector<int64_t> multipliers = {76632096046245LL, 4839876093313LL, 35959672319349LL,
                                            1234567LL,        98765431LL,      5555555LL};
  const std::vector<uint64_t> seeds = {xxh64_ngram_seed(0, 1, 2), xxh64_ngram_seed(0, 1, 3),
                                       xxh64_ngram_seed(0, 5, 2), xxh64_ngram_seed(0, 5, 3)};
  for (int variant = 0; variant < 4; ++variant) {
    const bool with_offsets = variant & 1, xxh64 = variant & 2;
    ErrorSlot err;
    std::vector<int64_t> canonical(B * T);
    launch_1d(B * T, [&] { compress_kernel(ids.data(), B * T, lookup.data(), vocab, canonical.data(), err.slot()); });
    std::vector<FastMod> mods(L * K);
    launch_mods(L * K, [&] { hash_mods_kernel(sizes.data(), with_offsets ? offsets.data() : nullptr, L * K, mods.data(), err.slot()); });
    std::vector<int64_t> out(static_cast<size_t>(L) * B * T * K, -1), out64(out.size(), -2);
    HashArgs a{};
    a.canonical = canonical.data();
    a.lookup = lookup.data();
    a.batch = B;
    a.seq_len = T;
    a.pad_id = pad_id;
    a.num_layers = L;
    a.max_ngram_size = N;
    a.heads_per_order = H;
    a.num_heads = K;
    a.xxh64 = xxh64;
    a.keys = xxh64 ? reinterpret_cast<const int64_t*>(seeds.data()) : multipliers.data();
    a.mods = mods.data();
    a.offsets = with_offsets ? offsets.data() : nullptr;
    a.out = out.data();
    if (variant == 0) {
      a.out = out64.data();  // the 64-bit index path the launcher takes for huge outputs
      launch_1d(int64_t{L} * B * T * K, [&] { ngram_hash_kernel<uint64_t>(a); });
      a.out = out.data();
    }
    launch_1d(int64_t{L} * B * T * K, [&] { ngram_hash_kernel<uint32_t>(a); });
    if (variant == 0) {
      EXPECT_EQ(out64, out);
    }
    EXPECT_EQ(err.record.ready, 0);
    for (int l = 0; l < L; ++l) {
      for (int b = 0; b < B; ++b) {
        for (int t = 0; t < T; ++t) {
          int64_t window[kMaxNgramSize];
          for (int k = 0; k < N; ++k) window[k] = t >= k ? canonical[b * T + t - k] : lookup[pad_id];
          FastMod host_mods[K];
          for (int k = 0; k < K; ++k) host_mods[k] = FastMod::make(static_cast<uint64_t>(sizes[l * K + k]));
          int64_t want[K];
          if (xxh64) {
            xxh64_hash_token(window, N, H, seeds.data() + l * (N - 1), host_mods,
                             with_offsets ? offsets.data() + l * K : nullptr, want);
          } else {
            deepseek_hash_token(window, N, H, multipliers.data() + l * N, host_mods,
                                with_offsets ? offsets.data() + l * K : nullptr, want);
          }
          for (int k = 0; k < K; ++k) {
            ASSERT_EQ(out[((static_cast<size_t>(l) * B + b) * T + t) * K + k], want[k])
                << "layer " << l << " token " << b << "," << t << " head " << k << " variant " << variant;
          }
        }
      }
    }
  }
}

TEST(CudaKernelsMock, HashTableErrorsAreReportedAndKeepTheKernelSafe) {
  const std::vector<int64_t> sizes = {5, 0, 7};
  std::vector<FastMod> mods(3);
  ErrorSlot err;
  launch_mods(3, [&] { hash_mods_kernel(sizes.data(), nullptr, 3, mods.data(), err.slot()); });
  EXPECT_EQ(err.record.kind, kHeadSizeInvalid);
  EXPECT_EQ(err.record.index, 1);
  EXPECT_EQ(err.record.value, 0);
  EXPECT_EQ(mods[1].divisor, 1u);  // no division by zero in the hash kernel
  EXPECT_EQ(mods[2].divisor, 7u);

  // Heads over several blocks: every one gets its constants.
  std::vector<int64_t> many(600);
  for (size_t i = 0; i < many.size(); ++i) many[i] = static_cast<int64_t>(i) + 2;
  std::vector<FastMod> many_mods(many.size());
  ErrorSlot none;
  launch_mods(600, [&] { hash_mods_kernel(many.data(), nullptr, 600, many_mods.data(), none.slot()); });
  EXPECT_EQ(none.record.ready, 0);
  for (size_t i = 0; i < many.size(); ++i) ASSERT_EQ(many_mods[i].divisor, static_cast<uint64_t>(many[i])) << i;

  const std::vector<int64_t> offsets = {0, 5, INT64_MAX - 3};
  const std::vector<int64_t> good_sizes = {5, 6, 7};
  ErrorSlot overflow;
  launch_mods(3, [&] { hash_mods_kernel(good_sizes.data(), offsets.data(), 3, mods.data(), overflow.slot()); });
  EXPECT_EQ(overflow.record.kind, kHeadOffsetOverflow);
  EXPECT_EQ(overflow.record.index, 2);
  EXPECT_EQ(overflow.record.value, INT64_MAX - 3);
  EXPECT_EQ(overflow.record.extra, 7);
}

// The launch of gather_rows_kernel (csrc/cuda/hash_embedding_ops.cu): a warp per 32 entries.
template <typename F>
void launch_gather(int64_t entries, F body) {
  simt::launch(simt::Dim3(1, gather_group_blocks(entries, g_block_cap)), simt::Dim3(kGatherLanes, kGatherEntries),
               body);
}

// The scatter's launch: a warp per entry.
template <typename F>
void launch_scatter(int64_t entries, F body) {
  simt::launch(simt::Dim3(1, gather_blocks(entries, g_block_cap)), simt::Dim3(kGatherLanes, kGatherEntries), body);
}

struct Chunk16 {  // stands in for uint4
  uint64_t lo, hi;
};

template <typename chunk_t, typename scalar_t>
void check_gather(int64_t dh) {
  const int64_t R = 9, K = 2, entries = 6;
  std::vector<scalar_t> weight(R * dh);
  for (size_t i = 0; i < weight.size(); ++i) weight[i] = static_cast<scalar_t>(0.5 * static_cast<double>(i) + 1);
  const std::vector<int64_t> ids = {0, 1, 3, 0, 2, 3};
  const std::vector<int64_t> offsets = {0, 5};
  const int64_t chunks = dh * static_cast<int64_t>(sizeof(scalar_t)) / static_cast<int64_t>(sizeof(chunk_t));
  std::vector<scalar_t> out(entries * dh, scalar_t(-1));
  ErrorSlot err;
  launch_gather(entries, [&] {
    gather_rows_kernel<chunk_t>(reinterpret_cast<const chunk_t*>(weight.data()), R, chunks, ids.data(), offsets.data(),
                                K, entries, reinterpret_cast<chunk_t*>(out.data()), err.slot());
  });
  EXPECT_EQ(err.record.ready, 0);
  for (int64_t e = 0; e < entries; ++e) {
    const int64_t row = ids[e] + offsets[e % K];
    for (int64_t d = 0; d < dh; ++d) ASSERT_EQ(out[e * dh + d], weight[row * dh + d]) << "entry " << e << " d " << d;
  }
  // Row 4 + 5 = 9 is past the table: zeros, and a report of the row.
  const std::vector<int64_t> bad = {0, 1, 3, 4, 2, 3};
  launch_gather(entries, [&] {
    gather_rows_kernel<chunk_t>(reinterpret_cast<const chunk_t*>(weight.data()), R, chunks, bad.data(), offsets.data(),
                                K, entries, reinterpret_cast<chunk_t*>(out.data()), err.slot());
  });
  for (int64_t d = 0; d < dh; ++d) EXPECT_EQ(out[3 * dh + d], scalar_t(0));
  EXPECT_EQ(err.record.kind, kIdOutOfRange);
  EXPECT_EQ(err.record.index, 3);
  EXPECT_EQ(err.record.value, 9);
  EXPECT_EQ(err.record.head, 1);
  EXPECT_EQ(err.record.limit, R);
}

TEST(CudaKernelsMock, GatherRowsInEveryChunkWidth) {
  at_both_caps([] {
    check_gather<uint32_t, float>(3);
    check_gather<uint64_t, double>(5);
    check_gather<Chunk16, float>(8);   // 32-byte rows: two 16-byte chunks
    check_gather<Chunk16, double>(2);  // one chunk per row
    check_gather<uint16_t, uint16_t>(7);
    check_gather<uint32_t, float>(301);  // rows longer than a block: the grid wraps at cap 2
  });
}

// The warp-per-32-entries gather against a plain CPU gather: groups that are
// full or not (1, 31, 33, 600 entries), rows of 1 to 130 chunks (shorter
// than a warp step, exactly 32, past 4 x 32: several steps), 3 heads with
// offsets, one bad id (zeros, reported once and exactly), at both grid caps
// (600 entries: 3 blocks, so cap 2 wraps) and under three schedules.
TEST(CudaKernelsMock, GatherLoadsIdsPerWarpAndCopiesEveryChunkOfOddRows) {
  const int64_t R = 40, K = 3;
  const std::vector<int64_t> offsets = {0, 13, 26};
  std::mt19937_64 rng(17);
  at_both_caps([&] {
    for (simt::Schedule sched : {simt::Schedule::kForward, simt::Schedule::kReverse, simt::Schedule::kShuffled}) {
      simt::set_schedule(sched, 3);
      for (int64_t entries : {1, 31, 33, 600}) {
        for (int64_t cpr : {1, 3, 31, 32, 33, 130}) {
          SCOPED_TRACE(testing::Message() << "entries " << entries << " chunks " << cpr << " schedule "
                                          << static_cast<int>(sched));
          std::vector<uint32_t> weight(R * cpr);
          for (auto& w : weight) w = static_cast<uint32_t>(rng());
          std::vector<int64_t> ids(entries);
          for (auto& id : ids) id = static_cast<int64_t>(rng() % 13);
          const int64_t bad_at = entries > 1 ? static_cast<int64_t>(rng() % static_cast<uint64_t>(entries)) : -1;
          if (bad_at >= 0) ids[bad_at] = 14;  // + offsets[bad_at % 3]: row 14, 27 or 40 (40 is past the table)
          std::vector<uint32_t> want(entries * cpr, 0);
          int64_t first_bad = -1;
          for (int64_t e = 0; e < entries; ++e) {
            const int64_t row = ids[e] + offsets[e % K];
            if (row >= R) {
              if (first_bad < 0) first_bad = e;
              continue;
            }
            std::copy(weight.begin() + row * cpr, weight.begin() + (row + 1) * cpr, want.begin() + e * cpr);
          }
          std::vector<uint32_t> out(entries * cpr + 1, 0xdeadbeefu);
          ErrorSlot err;
          launch_gather(entries, [&] {
            gather_rows_kernel<uint32_t>(weight.data(), R, cpr, ids.data(), offsets.data(), K, entries, out.data(),
                                         err.slot());
          });
          ASSERT_EQ(out.back(), 0xdeadbeefu);  // nothing past the output
          out.pop_back();
          ASSERT_EQ(out, want);
          if (first_bad < 0) {
            EXPECT_EQ(err.claimed, 0);
          } else {
            EXPECT_EQ(err.claimed, 1);
            EXPECT_EQ(err.record.kind, kIdOutOfRange);
            EXPECT_EQ(err.record.index, first_bad);
            EXPECT_EQ(err.record.value, R);
            EXPECT_EQ(err.record.head, 2);
          }
        }
      }
    }
  });
  simt::set_schedule(simt::Schedule::kForward);
}

// launch_row_gather (csrc/cuda/hash_embedding_ops.cu): the widest chunk that divides the row
// bytes and both addresses. Returns the chunk width used.
int gather_like_the_launcher(const void* table, int64_t num_rows, int64_t row_bytes, const int64_t* ids,
                             int64_t entries, void* out) {
  const uintptr_t addresses = reinterpret_cast<uintptr_t>(table) | reinterpret_cast<uintptr_t>(out);
  const auto fits = [&](int64_t width) { return row_bytes % width == 0 && addresses % width == 0; };
  const auto gather = [&](auto chunk) {
    using chunk_t = decltype(chunk);
    const int64_t chunks = row_bytes / static_cast<int64_t>(sizeof(chunk_t));
    launch_gather(entries, [&] {
      gather_rows_kernel<chunk_t>(static_cast<const chunk_t*>(table), num_rows, chunks, ids, nullptr, 1, entries,
                                  static_cast<chunk_t*>(out), DeviceErrorSlot{nullptr, nullptr, 0});
    });
    return static_cast<int>(sizeof(chunk_t));
  };
  if (fits(16)) return gather(Chunk16{});
  if (fits(8)) return gather(uint64_t{});
  if (fits(4)) return gather(uint32_t{});
  if (fits(2)) return gather(uint16_t{});
  return gather(uint8_t{});
}

// Rows at every alignment: the table or the output starting 1, 2, 4 or 8
// bytes past a 16-byte boundary, with row lengths that do and do not divide.
TEST(CudaKernelsMock, GatherOfUnalignedRowsPicksANarrowerChunkAndCopiesExactly) {
  at_both_caps([] {
    const int64_t R = 13, entries = 97;
    std::mt19937_64 rng(5);
    std::vector<int64_t> ids(entries);
    for (auto& id : ids) id = static_cast<int64_t>(rng() % R);
    for (int64_t row_bytes : {16, 32, 24, 6, 5, 68}) {
      for (int table_shift : {0, 1, 2, 4, 8}) {
        for (int out_shift : {0, 8}) {
          alignas(16) static uint8_t table[R * 68 + 16], out[entries * 68 + 16];
          for (size_t i = 0; i < sizeof table; ++i) table[i] = static_cast<uint8_t>(rng());
          std::memset(out, 0xee, sizeof out);
          const int width = gather_like_the_launcher(table + table_shift, R, row_bytes, ids.data(), entries,
                                                     out + out_shift);
          if ((table_shift | out_shift) == 0 && row_bytes % 16 == 0) {
            EXPECT_EQ(width, 16);
          }
          EXPECT_EQ((table_shift | out_shift) % width, 0) << "chunk " << width;
          for (int64_t e = 0; e < entries; ++e) {
            ASSERT_EQ(std::memcmp(out + out_shift + e * row_bytes, table + table_shift + ids[e] * row_bytes,
                                  static_cast<size_t>(row_bytes)), 0)
                << "entry " << e << " row_bytes " << row_bytes << " shifts " << table_shift << "," << out_shift;
          }
          EXPECT_EQ(out[out_shift + entries * row_bytes], 0xee);  // nothing past the output
          if (out_shift) {
            EXPECT_EQ(out[out_shift - 1], 0xee);
          }
        }
      }
    }
  });
}

TEST(CudaKernelsMock, AnUncheckedGatherReadsBadRowsAsZerosAndReportsNothing) {
  const std::vector<float> weight = {1, 2, 3, 4, 5, 6};
  const std::vector<int64_t> rows = {2, 3, -1, 0};
  std::vector<float> out(8, -1.f);
  launch_gather(4, [&] {
    gather_rows_kernel<uint32_t>(reinterpret_cast<const uint32_t*>(weight.data()), 3, 2, rows.data(), nullptr, 1, 4,
                                 reinterpret_cast<uint32_t*>(out.data()), DeviceErrorSlot{nullptr, nullptr, 0});
  });
  EXPECT_EQ(out, (std::vector<float>{5, 6, 0, 0, 0, 0, 1, 2}));
}

TEST(CudaKernelsMock, GatherReportsAnOffsetOverflowWithItsHead) {
  const std::vector<float> weight(4 * 2, 1.f);
  const std::vector<int64_t> ids = {1, 2, 0, 3};
  const std::vector<int64_t> offsets = {0, INT64_MAX};
  std::vector<float> out(4 * 2);
  ErrorSlot err;
  launch_gather(4, [&] {
    gather_rows_kernel<uint32_t>(reinterpret_cast<const uint32_t*>(weight.data()), 4, 2, ids.data(), offsets.data(), 2,
                                 4, reinterpret_cast<uint32_t*>(out.data()), err.slot());
  });
  EXPECT_EQ(err.record.kind, kIdOffsetOverflow);
  EXPECT_EQ(err.record.index, 1);
  EXPECT_EQ(err.record.value, 2);
  EXPECT_EQ(err.record.extra, INT64_MAX);
  EXPECT_EQ(err.record.head, 1);
}

TEST(CudaKernelsMock, ScatterAddSumsRepeatedRowsAndSkipsBadOnes) {
  const int64_t R = 4, dh = 3;
  const std::vector<int64_t> ids = {1, 3, 1, 7, 0};  // 7 is past the table
  std::vector<float> grad(ids.size() * dh);
  for (size_t i = 0; i < grad.size(); ++i) grad[i] = static_cast<float>(i + 1);
  std::vector<float> acc(R * dh, 0.f);
  ErrorSlot err;
  launch_scatter(static_cast<int64_t>(ids.size()), [&] {
    scatter_add_rows_kernel<float, float>(grad.data(), R, dh, ids.data(), nullptr, 1,
                                          static_cast<int64_t>(ids.size()), acc.data(), err.slot());
  });
  std::vector<float> want(R * dh, 0.f);
  for (size_t e = 0; e < ids.size(); ++e) {
    if (ids[e] >= R) continue;
    for (int64_t d = 0; d < dh; ++d) want[ids[e] * dh + d] += grad[e * dh + d];
  }
  EXPECT_EQ(acc, want);
  EXPECT_EQ(err.record.kind, kIdOutOfRange);
  EXPECT_EQ(err.record.index, 3);
  EXPECT_EQ(err.record.value, 7);
}

// The 16-bit backward's run sums as multihead_embedding_backward_cuda
// launches them: both kernels at the gather's shape, a warp per piece.
template <typename scalar_t, typename acc_t>
void sum_sorted_runs(const std::vector<scalar_t>& grad, int64_t dh, const std::vector<int64_t>& sorted_rows,
                     const std::vector<int64_t>& order, std::vector<scalar_t>& out) {
  const int64_t entries = static_cast<int64_t>(sorted_rows.size()), pieces = run_pieces(entries);
  std::vector<acc_t> partial(static_cast<size_t>(pieces * dh), acc_t(-777));  // unwritten slots are never read
  const simt::Dim3 grid(1, gather_blocks(pieces, g_block_cap)), block(kGatherLanes, kGatherEntries);
  simt::launch(grid, block, [&] {
    sorted_run_pieces_kernel<scalar_t, acc_t>(grad.data(), dh, sorted_rows.data(), order.data(), entries, out.data(),
                                              partial.data());
  });
  simt::launch(grid, block, [&] {
    sorted_run_totals_kernel<scalar_t, acc_t>(grad.data(), dh, sorted_rows.data(), order.data(), entries,
                                              partial.data(), out.data());
  });
}

TEST(CudaKernelsMock, SortedRunsSumEachRowOnceInEntryOrder) {
  // The 16-bit dense gradient: rows per entry (bad ones -1 and reported), a
  // stable sort by row (std::stable_sort standing in for the device sort),
  // then one write per row.
  const int64_t R = 6, dh = 3, K = 2;
  const std::vector<int64_t> ids = {1, 0, 2, 1, 1, 0, 9, 2};  // entry 6 (row 9 + 3) is past the table
  const std::vector<int64_t> offsets = {0, 3};
  const int64_t entries = static_cast<int64_t>(ids.size());
  std::vector<int64_t> rows(entries);
  ErrorSlot err;
  launch_1d(entries, [&] { entry_rows_kernel(ids.data(), offsets.data(), K, entries, R, rows.data(), err.slot()); });
  EXPECT_EQ(rows, (std::vector<int64_t>{1, 3, 2, 4, 1, 3, -1, 5}));
  EXPECT_EQ(err.record.kind, kIdOutOfRange);
  EXPECT_EQ(err.record.index, 6);
  EXPECT_EQ(err.record.value, 9);
  std::vector<int64_t> order(entries);
  for (int64_t e = 0; e < entries; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rows[a] < rows[b]; });
  std::vector<int64_t> sorted_rows(entries);
  for (int64_t q = 0; q < entries; ++q) sorted_rows[q] = rows[order[q]];
  std::vector<float> grad(entries * dh);
  for (size_t i = 0; i < grad.size(); ++i) grad[i] = static_cast<float>(i % 7) - 2.5f;
  std::vector<float> out(R * dh, 0.f);
  sum_sorted_runs<float, double>(grad, dh, sorted_rows, order, out);
  std::vector<float> want(R * dh, 0.f);
  for (int64_t e = 0; e < entries; ++e) {
    if (rows[e] < 0) continue;
    for (int64_t d = 0; d < dh; ++d) want[rows[e] * dh + d] += grad[e * dh + d];
  }
  EXPECT_EQ(out, want);
}

// Runs of every length against the pieces of 32 positions: one far longer
// than several pieces (the pad row's: 13 whole pieces between its ends), runs that end or start exactly at a
// piece's edge or straddle it, bad entries (-1, sorted first), at odd dh
// (below 32, and past 32 but not a multiple), at both grid caps and under
// three schedules.
TEST(CudaKernelsMock, LongSortedRunsAreSummedInPiecesExactlyAndDeterministically) {
  const int64_t R = 12;
  // Run lengths of rows 0..R-1 (0: untouched), plus 3 bad entries.
  const std::vector<int64_t> lengths = {1, 0, 2, 31, 32, 33, 420, 5, 64, 65, 0, 3};
  std::vector<int64_t> rows;
  for (int b = 0; b < 3; ++b) rows.push_back(-1);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < lengths[r]; ++i) rows.push_back(r);
  }
  const int64_t entries = static_cast<int64_t>(rows.size());
  ASSERT_GT(lengths[6], (kPartialBatch + 3) * kRunPiece);  // the totals load a batch of partials and more
  // The entries in a shuffled order, as the stable sort's permutation.
  std::mt19937_64 rng(11);
  std::vector<int64_t> order(entries);
  for (int64_t e = 0; e < entries; ++e) order[e] = e;
  std::shuffle(order.begin(), order.end(), rng);
  const std::vector<int64_t> sorted_rows = rows;
  // Keep each run's order ascending in entry index (a stable sort's).
  for (int64_t q = 0; q < entries;) {
    int64_t end = q;
    while (end < entries && rows[end] == rows[q]) ++end;
    std::sort(order.begin() + q, order.begin() + end);
    q = end;
  }
  for (int64_t dh : {3, 33, 70}) {
    SCOPED_TRACE(testing::Message() << "dh " << dh);
    // Integer-valued gradients: every sum is exact in any order, so the
    // kernels must equal the CPU's entry-order sum bit for bit.
    std::vector<float> exact(entries * dh), noisy(entries * dh);
    for (size_t i = 0; i < exact.size(); ++i) {
      exact[i] = static_cast<float>(static_cast<int64_t>(rng() % 17) - 8);
      noisy[i] = std::ldexp(static_cast<float>(rng() % (1u << 24)), -20) - 8.f;
    }
    std::vector<float> want_exact(R * dh, 0.f), want_serial(R * dh, 0.f);
    for (int64_t q = 0; q < entries; ++q) {
      if (sorted_rows[q] < 0) continue;
      for (int64_t d = 0; d < dh; ++d) {
        want_exact[sorted_rows[q] * dh + d] += exact[order[q] * dh + d];
        want_serial[sorted_rows[q] * dh + d] += noisy[order[q] * dh + d];
      }
    }
    // The documented order of a run over pieces j0..j1: the run's positions
    // in piece j0 in order, each whole piece between as one partial sum, then
    // the positions in piece j1 one by one.
    std::vector<float> want_pieces(R * dh, 0.f);
    for (int64_t q = 0; q < entries;) {
      int64_t end = q;
      while (end < entries && sorted_rows[end] == sorted_rows[q]) ++end;
      if (sorted_rows[q] >= 0) {
        const int64_t j0 = q / kRunPiece, j1 = (end - 1) / kRunPiece;
        for (int64_t d = 0; d < dh; ++d) {
          float sum = 0.f;
          for (int64_t p = q; p < std::min(end, (j0 + 1) * kRunPiece); ++p) sum += noisy[order[p] * dh + d];
          for (int64_t j = j0 + 1; j < j1; ++j) {
            float part = 0.f;
            for (int64_t p = j * kRunPiece; p < (j + 1) * kRunPiece; ++p) part += noisy[order[p] * dh + d];
            sum += part;
          }
          if (j1 > j0) {
            for (int64_t p = j1 * kRunPiece; p < end; ++p) sum += noisy[order[p] * dh + d];
          }
          want_pieces[sorted_rows[q] * dh + d] = sum;
        }
      }
      q = end;
    }
    std::vector<float> first_noisy;
    at_both_caps([&] {
      for (simt::Schedule sched : {simt::Schedule::kForward, simt::Schedule::kReverse, simt::Schedule::kShuffled}) {
        simt::set_schedule(sched, 5);
        std::vector<float> out(R * dh, 0.f);
        sum_sorted_runs<float, float>(exact, dh, sorted_rows, order, out);
        ASSERT_EQ(out, want_exact);
        std::fill(out.begin(), out.end(), 0.f);
        sum_sorted_runs<float, float>(noisy, dh, sorted_rows, order, out);
        ASSERT_EQ(out, want_pieces);
        if (first_noisy.empty()) first_noisy = out;
        ASSERT_EQ(out, first_noisy);  // the same bits at every cap and schedule
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t d = 0; d < dh; ++d) {
            const float got = out[r * dh + d], serial = want_serial[r * dh + d];
            if (lengths[r] <= kRunPiece + 1) {
              // Within at most two pieces: the CPU's entry-order sum exactly.
              ASSERT_EQ(got, serial) << "row " << r << " d " << d;
            } else {
              ASSERT_NEAR(got, serial, 1e-4 * lengths[r]) << "row " << r << " d " << d;
            }
          }
        }
      }
    });
    simt::set_schedule(simt::Schedule::kForward);
  }
}

// One entry, and a single run that fills whole pieces exactly.
TEST(CudaKernelsMock, SortedRunsOfOneEntryAndOfWholePieces) {
  for (int64_t entries : {int64_t{1}, int64_t{2} * kRunPiece, int64_t{3} * kRunPiece}) {
    const int64_t dh = 5;
    std::vector<int64_t> sorted_rows(entries, 2), order(entries);
    for (int64_t e = 0; e < entries; ++e) order[e] = e;
    std::vector<float> grad(entries * dh);
    for (size_t i = 0; i < grad.size(); ++i) grad[i] = static_cast<float>(i % 5) + 1.f;
    std::vector<float> want(4 * dh, 0.f);
    for (int64_t e = 0; e < entries; ++e) {
      for (int64_t d = 0; d < dh; ++d) want[2 * dh + d] += grad[e * dh + d];
    }
    std::vector<float> out(4 * dh, 0.f);
    sum_sorted_runs<float, float>(grad, dh, sorted_rows, order, out);
    EXPECT_EQ(out, want) << entries << " entries";
  }
}

// The update ops' row check (kernels/update_rows_cuda.cuh), here since it includes cuda_kernels.cuh.
TEST(CudaKernelsMock, CheckUpdateRowsSkipsAndReportsUnsortedAndOutOfRangeRows) {
  // {skip flag, reported kind}: one report per launch, and *skip set whenever a row is bad.
  const auto check = [](const std::vector<int64_t>& rows, int64_t num_rows) {
    int skip = 0, claimed = 0;
    DeviceErrorRecord record{};
    const DeviceErrorSlot slot{&claimed, &record, 5};
    const int64_t n = static_cast<int64_t>(rows.size());
    launch_1d(n, [&] { check_update_rows_kernel(rows.data(), n, num_rows, &skip, slot); });
    EXPECT_EQ(claimed, skip);
    return std::make_pair(skip, skip ? record.kind : 0);
  };
  std::vector<int64_t> many(700);
  for (int64_t i = 0; i < 700; ++i) many[i] = 2 * i;
  at_both_caps([&] {
    EXPECT_EQ(check({0, 2, 5}, 6), std::make_pair(0, 0));
    EXPECT_EQ(check({0, 2, 6}, 6), std::make_pair(1, kUpdateRowOutOfRange));
    EXPECT_EQ(check({-1, 2}, 6), std::make_pair(1, kUpdateRowOutOfRange));
    EXPECT_EQ(check({1, 1}, 6), std::make_pair(1, kUpdateRowsUnordered));
    EXPECT_EQ(check(many, 1400), std::make_pair(0, 0));
    // dedup_row_grads_padded's padding: -1 only as a suffix.
    EXPECT_EQ(check({0, 2, -1, -1}, 6), std::make_pair(0, 0));
    EXPECT_EQ(check({-1, -1}, 6), std::make_pair(0, 0));
    EXPECT_EQ(check({0, -1, 3}, 6), std::make_pair(1, kUpdateRowOutOfRange));
    EXPECT_EQ(check({0, -2}, 6), std::make_pair(1, kUpdateRowOutOfRange));
    std::vector<int64_t> swapped = many;
    std::swap(swapped[600], swapped[601]);
    EXPECT_EQ(check(swapped, 1400), std::make_pair(1, kUpdateRowsUnordered));
  });
}

}  // namespace
