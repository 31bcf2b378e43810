// BlockCache (kernels/block_cache.h): what it keeps, and that threads taking,
// keeping, releasing and switching it off at once never share a block.
// scripts/sanitize.sh runs these under ASan+UBSan and ThreadSanitizer.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "kernels/block_cache.h"

namespace {

using engram::BlockCache;

TEST(BlockCache, TakesOnlyExactSizesAndKeepsTheNewest) {
  std::atomic<bool> enabled{true};
  BlockCache cache(2, enabled);
  EXPECT_EQ(cache.take(64), nullptr);
  void* a = std::malloc(64);
  void* b = std::malloc(128);
  void* c = std::malloc(64);
  cache.keep(a, 64);
  cache.keep(b, 128);
  cache.keep(c, 64);  // three kept, room for two: `a`, the oldest, is freed
  EXPECT_EQ(cache.take(32), nullptr);
  EXPECT_EQ(cache.take(64), c);
  EXPECT_EQ(cache.take(64), nullptr);
  EXPECT_EQ(cache.release_all(), 128u);  // b
  EXPECT_EQ(cache.release_all(), 0u);
  std::free(c);
}

TEST(BlockCache, KeepsNothingWhileDisabled) {
  std::atomic<bool> enabled{false};
  BlockCache cache(4, enabled);
  cache.keep(std::malloc(64), 64);  // freed at once (ASan reports a leak otherwise)
  EXPECT_EQ(cache.take(64), nullptr);
  EXPECT_EQ(cache.release_all(), 0u);
  enabled = true;
  cache.keep(std::malloc(64), 64);
  EXPECT_EQ(cache.release_all(), 64u);
}

// Each thread takes a block (or allocates one), fills it with its own
// pattern, checks the pattern is intact after the others had a chance to
// run, and keeps it again; one more thread releases everything and switches
// the cache off and on. A block handed to two threads at once shows up as a
// broken pattern (and to the sanitizers as a race or a double free).
TEST(BlockCache, ManyThreadsNeverShareABlock) {
  std::atomic<bool> enabled{true};
  BlockCache cache(3, enabled);
  constexpr int kThreads = 8;
  constexpr int kRounds = 20000;
  constexpr size_t kSizes[] = {256, 512, 1024};
  std::atomic<int> broken{0};
  std::atomic<int> running{kThreads};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        const size_t bytes = kSizes[(t + r) % 3];
        auto* block = static_cast<unsigned char*>(cache.take(bytes));
        if (block == nullptr) block = static_cast<unsigned char*>(std::malloc(bytes));
        const unsigned char mark = static_cast<unsigned char>(t * 31 + r);
        std::memset(block, mark, bytes);
        std::this_thread::yield();
        for (size_t i = 0; i < bytes; ++i) {
          if (block[i] != mark) {
            broken.fetch_add(1);
            break;
          }
        }
        cache.keep(block, bytes);
      }
      running.fetch_sub(1);
    });
  }
  threads.emplace_back([&] {
    while (running.load() > 0) {
      cache.release_all();
      enabled = false;
      cache.release_all();
      enabled = true;
      std::this_thread::yield();
    }
  });
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(broken.load(), 0);
  cache.release_all();
}

}  // namespace
