// The SIMT emulator itself (tests/cpp/simt.h): each feature the kernel tests
// rely on works, and each misuse it exists to catch is caught: a shuffle
// with a wrong mask, a divergent or missing barrier, a shared-memory race,
// a deadlock.
#include "tests/cpp/simt.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

// Runs f and expects a simt::Error whose message contains `what`.
template <typename F>
void expect_simt_error(F f, const std::string& what) {
  try {
    f();
  } catch (const simt::Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    return;
  }
  ADD_FAILURE() << "no simt::Error; expected one with \"" << what << "\"";
}

struct ScheduleGuard {
  explicit ScheduleGuard(simt::Schedule s, uint64_t seed = 0) { simt::set_schedule(s, seed); }
  ~ScheduleGuard() { simt::set_schedule(simt::Schedule::kForward); }
};

TEST(Simt, EveryThreadOfTheGridRunsOnceWithItsIndices) {
  const dim3 grid(3, 2, 2), block(5, 3, 2);
  std::vector<int> seen(grid.count() * block.count(), 0);
  simt::launch(grid, block, [&] {
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    ++seen[b * blockDim.x * blockDim.y * blockDim.z + t];
  });
  for (int s : seen) EXPECT_EQ(s, 1);
}

TEST(Simt, ShufflesFollowTheirSourceLanes) {
  std::vector<int> xor_out(64), up(64), down(64), idx(64), narrow(64);
  simt::launch(1, 64, [&] {
    const int t = static_cast<int>(threadIdx.x);
    xor_out[t] = __shfl_xor_sync(0xffffffffu, t, 5);
    up[t] = __shfl_up_sync(0xffffffffu, t, 3);
    down[t] = __shfl_down_sync(0xffffffffu, t, 3);
    idx[t] = __shfl_sync(0xffffffffu, t * 10, 7);
    narrow[t] = __shfl_xor_sync(0xffffffffu, t, 4, 8);
  });
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, base = t - lane;
    EXPECT_EQ(xor_out[t], base + (lane ^ 5));
    EXPECT_EQ(up[t], lane >= 3 ? t - 3 : t);
    EXPECT_EQ(down[t], lane + 3 < 32 ? t + 3 : t);
    EXPECT_EQ(idx[t], (base + 7) * 10);
    EXPECT_EQ(narrow[t], base + (lane ^ 4));
  }
}

TEST(Simt, XorTreeSumsAWarpAndHalfWarpsMayShuffleApart) {
  std::vector<double> sum(32);
  std::vector<unsigned> ballot(32);
  simt::launch(1, 32, [&] {
    double v = threadIdx.x + 0.5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    sum[threadIdx.x] = v;
    // Two disjoint halves, each its own collective.
    const unsigned half = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
    ballot[threadIdx.x] = __ballot_sync(half, threadIdx.x % 3 == 0);
  });
  for (unsigned t = 0; t < 32; ++t) {
    EXPECT_EQ(sum[t], 32 * 31 / 2 + 16.0);
    unsigned want = 0;
    for (unsigned l = t < 16 ? 0 : 16; l < (t < 16 ? 16u : 32u); ++l) want |= (l % 3 == 0 ? 1u : 0u) << l;
    EXPECT_EQ(ballot[t], want);
  }
}

TEST(Simt, APartialLastWarpAndActivemask) {
  std::vector<unsigned> active(40), any(40);
  simt::launch(1, 40, [&] {
    active[threadIdx.x] = __activemask();
    const unsigned warp_mask = threadIdx.x < 32 ? 0xffffffffu : 0xffu;
    any[threadIdx.x] = __any_sync(warp_mask, threadIdx.x == 37);
  });
  EXPECT_EQ(active[0], 0xffffffffu);
  EXPECT_EQ(active[39], 0xffu);
  EXPECT_EQ(any[0], 0u);
  EXPECT_EQ(any[39], 1u);
}

TEST(Simt, ShuffleMaskThatLeavesOutTheCallerFails) {
  ScheduleGuard guard(simt::Schedule::kReverse);  // lane 31 calls first
  expect_simt_error([] { simt::launch(1, 32, [] { (void)__shfl_xor_sync(0x7fffffffu, 1.0f, 1); }); },
                    "leaves out the calling lane");
}

TEST(Simt, ShuffleReadingALaneOutsideTheMaskFails) {
  // Lanes 0-15 shuffle among themselves, but xor 16 reaches the other half.
  expect_simt_error(
      [] {
        simt::launch(1, 32, [] {
          const unsigned m = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
          (void)__shfl_xor_sync(m, 1, 16);
        });
      },
      "not in the mask");
}

TEST(Simt, LanesOfOneShuffleWithDifferentMasksFail) {
  expect_simt_error(
      [] {
        simt::launch(1, 32, [] {
          const unsigned m = threadIdx.x == 3 ? 0x0000000fu : 0xffffffffu;
          (void)__shfl_xor_sync(m, 1, 1);
        });
      },
      "with mask");
}

TEST(Simt, AShuffleOfALaneThatExitedDeadlocks) {
  expect_simt_error(
      [] {
        simt::launch(1, 32, [] {
          if (threadIdx.x == 31) return;
          (void)__shfl_xor_sync(0xffffffffu, 1, 1);
        });
      },
      "lane 31 exited");
}

// A block sum through shared memory, as a kernel would write it.
void block_sum(std::vector<int>& out, bool drop_barrier, bool race) {
  simt::launch(2, 64, [&] {
    ENGRAM_SHARED(int, partial, 64);
    const unsigned t = threadIdx.x;
    partial[t] = static_cast<int>(t + 100 * blockIdx.x);
    if (race && t == 5) partial[6] = 0;
    if (!drop_barrier) __syncthreads();
    for (unsigned stride = 32; stride > 0; stride >>= 1) {
      if (t < stride) partial[t] = partial[t] + partial[t + stride];
      __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
  });
}

TEST(Simt, SharedMemoryWithBarriersSums) {
  std::vector<int> out(2, -1);
  block_sum(out, false, false);
  EXPECT_EQ(out[0], 64 * 63 / 2);
  EXPECT_EQ(out[1], 64 * 63 / 2 + 6400);
}

TEST(Simt, SharedMemoryRaceIsReported) {
  std::vector<int> out(2, -1);
  expect_simt_error([&] { block_sum(out, false, true); }, "shared memory race on element 6");
}

TEST(Simt, DroppedBarrierIsReportedAsARace) {
  std::vector<int> out(2, -1);
  expect_simt_error([&] { block_sum(out, true, false); }, "shared memory race");
}

TEST(Simt, SyncwarpOrdersSharedMemoryWithinAWarp) {
  std::vector<int> out(32, -1);
  simt::launch(1, 32, [&] {
    ENGRAM_SHARED(int, v, 32);
    v[threadIdx.x] = static_cast<int>(threadIdx.x);
    __syncwarp();
    out[threadIdx.x] = v[31 - threadIdx.x];
  });
  for (int t = 0; t < 32; ++t) EXPECT_EQ(out[t], 31 - t);
  expect_simt_error(
      [&] {
        simt::launch(1, 32, [&] {
          ENGRAM_SHARED(int, w, 32);
          w[threadIdx.x] = 1;
          out[threadIdx.x] = w[31 - threadIdx.x];
        });
      },
      "shared memory race");
}

TEST(Simt, DivergentBarriersFail) {
  expect_simt_error(
      [] {
        simt::launch(1, 64, [] {
          if (threadIdx.x < 32) {
            __syncthreads();
          } else {
            __syncthreads();
          }
        });
      },
      "divergent __syncthreads");
  expect_simt_error(
      [] {
        simt::launch(1, 64, [] {
          if (threadIdx.x >= 40) return;
          __syncthreads();
        });
      },
      "exited while thread");
}

TEST(Simt, AtomicsInterleaveAndTheFirstClaimWins) {
  for (simt::Schedule s : {simt::Schedule::kForward, simt::Schedule::kReverse, simt::Schedule::kShuffled}) {
    ScheduleGuard guard(s, 7);
    int claimed = 0, winners = 0;
    double sum = 0;
    int winner = -1;
    simt::launch(3, 96, [&] {
      atomicAdd(&sum, 1.0);
      if (atomicCAS(&claimed, 0, 1) == 0) {
        ++winners;
        if (blockIdx.x == 0) winner = static_cast<int>(threadIdx.x);
        __threadfence_system();
      }
    });
    EXPECT_EQ(sum, 3 * 96);
    EXPECT_EQ(winners, 1);
    if (s == simt::Schedule::kForward) {
      EXPECT_EQ(winner, 0);
    }
    if (s == simt::Schedule::kReverse) {
      EXPECT_EQ(winner, 95);
    }
  }
}

TEST(Simt, AnExceptionInAThreadAbortsTheLaunchAndTheNextLaunchRuns) {
  expect_simt_error(
      [] {
        simt::launch(1, 64, [] {
          if (threadIdx.x == 9) throw std::runtime_error("boom");
          __syncthreads();
        });
      },
      "boom");
  int n = 0;
  simt::launch(2, 33, [&] { ++n; });
  EXPECT_EQ(n, 66);
}

}  // namespace
