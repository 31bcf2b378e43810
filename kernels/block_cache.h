// Freed host blocks kept for the next request of the same size, torch-free
// (the CPU ops in csrc/cpu_hash_embedding_ops.cpp use it; GoogleTest checks it under the
// sanitizers).
//
// Fresh blocks of megabytes come from mmap, and the OS faulting in and
// zeroing their pages costs more than the kernels that fill them (hash
// outputs: as much as the hashing; a table gradient: ~5x re-zeroing a kept
// block). A block comes back here only when its owner is done with it.
//
// Thread-safe: the list is only touched under the mutex, a taken block
// belongs to its caller alone until it is kept again, and the `enabled` flag
// is read under the same mutex, so once the owner has turned it off and
// released everything, nothing is kept any more.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

namespace engram {

class BlockCache {
 public:
  BlockCache(size_t max_kept, const std::atomic<bool>& enabled) : max_kept_(max_kept), enabled_(enabled) {}

  // A kept block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->first == bytes) {
        void* block = it->second;
        kept_.erase(it);
        return block;
      }
    }
    return nullptr;
  }

  // Keeps a malloc-family block of `bytes`; frees the oldest beyond
  // max_kept, or this one if caching is off.
  void keep(void* block, size_t bytes) {
    void* evicted = block;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (enabled_.load()) {
        kept_.emplace_back(bytes, block);
        evicted = nullptr;
        if (kept_.size() > max_kept_) {
          evicted = kept_.front().second;
          kept_.pop_front();
        }
      }
    }
    std::free(evicted);
  }

  // Frees every kept block; returns their bytes.
  size_t release_all() {
    std::deque<std::pair<size_t, void*>> kept;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      kept.swap(kept_);
    }
    size_t bytes = 0;
    for (const auto& [size, block] : kept) {
      bytes += size;
      std::free(block);
    }
    return bytes;
  }

  // For holding the cache across fork(): a child must not inherit the mutex
  // locked by a thread it does not have.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  const size_t max_kept_;
  const std::atomic<bool>& enabled_;
  std::mutex mutex_;
  std::deque<std::pair<size_t, void*>> kept_;
};

}  // namespace engram
