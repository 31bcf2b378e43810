// The future of one prefetched batch of one layer (engram.Prefetcher's
// engine): the gather's result or error, the stamps of the table's state it
// was read from, and what a lookup matches it by.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>

#include "csrc/prefetch/gather.h"

namespace engram::prefetch {

// Who made a ticket's rows: a worker's gather of given ids, a worker's
// hashing and gather of token ids, or the caller on a device (zero-copy: the
// rows are a device tensor, ready once its stream reaches the caller's event).
// kPatch names the worker task that reads updated rows again into a ticket.
enum class TaskKind : int { kGather, kHashAndGather, kPatch, kDeviceGather };

// The table's state a gather read: its version counter, and the caller's
// count of recorded updates of the table and those updates' version bumps.
struct Stamps {
  int64_t table_version = -1, epoch = 0, own_bumps = 0;
};

enum class Match { kNo, kYes, kUnknown };  // how a ticket relates to a lookup's token ids

class Ticket {
 public:
  explicit Ticket(TaskKind kind, bool dedup) : kind_(kind), dedup_(dedup) {}

  // Set once before the ticket is queued (what a lookup matches it by: read
  // without the lock): source, the token tensor given to prefetch; tokens, a
  // copy (hashed by the workers) or undefined; key, the caller's hash ids;
  // generation, the layer spec's (LayerQueues); stamps, the table's state.
  void set_source(const at::Tensor& source, at::Tensor tokens, at::Tensor key, int64_t generation, Stamps stamps) {
    stamps_ = stamps;
    source_ = source;
    source_version_ = source.defined() ? source._version() : -1;
    tokens_ = std::move(tokens);
    key_ = std::move(key);
    generation_ = generation;
  }
  int64_t generation() const { return generation_; }
  TaskKind kind() const { return kind_; }
  bool dedup() const { return dedup_; }

  // The very token tensor, unchanged, decides without comparing anything; a
  // copy of the tokens decides by their values (a few KB compared here, not
  // on the model's critical path in Python); else the hash ids must.
  Match matches(const at::Tensor& ids) const {
    if (!ids.defined()) return Match::kUnknown;
    if (source_.defined() && ids.unsafeGetTensorImpl() == source_.unsafeGetTensorImpl() &&
        ids._version() == source_version_) {
      return Match::kYes;
    }
    if (!tokens_.defined() || !ids.device().is_cpu() || ids.scalar_type() != at::kLong) return Match::kUnknown;
    if (ids.sizes() != tokens_.sizes()) return Match::kNo;
    const at::Tensor dense = ids.contiguous();
    return std::memcmp(dense.const_data_ptr<int64_t>(), tokens_.const_data_ptr<int64_t>(),
                       sizeof(int64_t) * static_cast<size_t>(dense.numel())) == 0
               ? Match::kYes
               : Match::kNo;
  }
  // The hash ids [B, T, K] (no offsets) of this batch: the caller's, or after wait() the worker's.
  at::Tensor key() {
    std::lock_guard<std::mutex> lock(mutex_);
    return key_.defined() ? key_ : result_.hashed;
  }

  Stamps stamps() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stamps_;
  }

  // A patch (GatherPool::submit_patch) brings the staged rows up to the
  // table's state `stamps`; wait() and ready() wait for it too. False unless
  // the gather finished well and is patchable with rows of row_width.
  bool begin_patch(Stamps stamps, int64_t row_width) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!done_ || error_ || !patchable(result_) || result_.staged.size(-1) != row_width) return false;
    ++patches_;
    stamps_ = stamps;
    return true;
  }
  void end_patch(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --patches_;
      if (error && !error_) error_ = std::move(error);
    }
    cv_.notify_all();
  }
  // The result as it stands (for a patch, which writes into its staged rows).
  Staged peek() {
    std::lock_guard<std::mutex> lock(mutex_);
    return result_;
  }
  bool ready() {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_ && patches_ == 0;
  }
  // The result, or the worker's exception (with its message) rethrown here.
  Staged wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return done_ && patches_ == 0; });
    if (error_) std::rethrow_exception(error_);
    return result_;
  }
  void finish(Staged result, std::exception_ptr error = nullptr) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      result_ = std::move(result);
      error_ = std::move(error);
      done_ = true;
    }
    cv_.notify_all();
  }

  // A Python object the caller keeps with the batch (the hot-row snapshot used, a device gather's event).
  std::shared_ptr<void> payload;

 private:
  const TaskKind kind_;
  const bool dedup_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  int patches_ = 0;
  std::exception_ptr error_;
  Staged result_;
  Stamps stamps_;
  at::Tensor source_, tokens_, key_;
  int64_t source_version_ = -1, generation_ = 0;
};

}  // namespace engram::prefetch
