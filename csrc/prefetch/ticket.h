// The future of one prefetched batch of one layer: the gather's result or
// error, the stamps of the table's state it read, what a lookup matches it by.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>

#include "csrc/prefetch/gather.h"

namespace engram::prefetch {

// Who made a ticket's rows: a worker's gather of given ids or of the token ids it hashed, or the caller on a
// device (zero-copy: ready once its stream reaches the caller's event). kPatch: reads updated rows again.
enum class TaskKind : int { kGather, kHashAndGather, kPatch, kDeviceGather };

// The table's state a gather read: its version counter, the caller's count of recorded updates of the table
// and those updates' version bumps.
struct Stamps {
  int64_t table_version = -1, epoch = 0, own_bumps = 0;
};

enum class Match { kNo, kYes, kUnknown };  // how a ticket relates to a lookup's token ids

class Ticket {
 public:
  explicit Ticket(TaskKind kind) : kind_(kind) {}

  // Set once before the ticket is queued (read without the lock): source, the token tensor given to prefetch;
  // tokens, a copy (hashed by the workers) or undefined; key, the caller's hash ids; generation, the spec's.
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

  // The very token tensor, unchanged, decides without comparing anything; a copy of the tokens decides by
  // their values (a few KB compared here, not in Python on the critical path); else the hash ids must.
  Match matches(const at::Tensor& ids) const {
    if (!ids.defined()) return Match::kUnknown;
    if (source_.defined() && ids.unsafeGetTensorImpl() == source_.unsafeGetTensorImpl() &&
        ids._version() == source_version_) {
      return Match::kYes;
    }
    if (!tokens_.defined() || !ids.device().is_cpu() || ids.scalar_type() != at::kLong) return Match::kUnknown;
    return at::equal(ids, tokens_) ? Match::kYes : Match::kNo;
  }
  // The hash ids [B, T, K] (no offsets) of this batch: the caller's (on its device), or after wait() the worker's.
  at::Tensor key() {
    std::lock_guard<std::mutex> lock(mutex_);
    return key_.defined() ? key_ : result_.hashed;
  }

  Stamps stamps() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stamps_;
  }

  // A patch (GatherPool::submit_patch) brings the staged rows up to the table's state `stamps`; wait() and
  // ready() wait for it. False unless the gather finished well, with known rows (not a device gather), no
  // hot-row cache (those are brought up to date at use) and rows of row_width.
  bool begin_patch(Stamps stamps, int64_t row_width) {
    std::lock_guard<std::mutex> lock(mutex_);
    const Staged& r = result_;
    if (!done_ || error_ || r.cached || !(r.rows.defined() || r.ids.defined())) return false;
    if (!r.staged.defined() || r.staged.size(-1) != row_width) return false;
    ++patches_;
    stamps_ = stamps;
    return true;
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
  // Ends a patch (patch), else finishes the ticket with its result; the first error is kept.
  void settle(bool patch, Staged result, std::exception_ptr error = nullptr) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (patch) {
        --patches_;
      } else {
        result_ = std::move(result);
        done_ = true;
      }
      if (error && !error_) error_ = std::move(error);
    }
    cv_.notify_all();
  }

  // A Python object the caller keeps with the batch (the hot-row snapshot used, a device gather's event).
  std::shared_ptr<void> payload;

 private:
  const TaskKind kind_;
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
