// Prefetch engine of engram.Prefetcher: a pool of worker threads that, for one
// Engram table and the rows a batch will look up, deduplicates the rows and
// copies them into a staging buffer ahead of use. Each submission returns its
// own ticket (a future), so a layer waits only on its own rows.
//
// Header-only and included by python/prefetch.cpp (the engram._engine
// module): the engine is not an operator, so it stays out of the op library.
// Workers use no Python and no at::parallel_for: they never need the GIL, and
// do not compete with the caller's intra-op thread pool for its threads.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace engram::prefetch {

// What a gather produces. Deduplicated: rows [U] int64 strictly increasing,
// staged [U, Dh] = table[rows], inverse shaped like the ids with
// rows[inverse] == ids. Expanded: staged = table[ids], shaped ids.shape + [Dh]
// (rows and inverse undefined).
struct Staged {
  at::Tensor rows, staged, inverse;
};

inline void check_row(int64_t row, int64_t position, int64_t num_rows) {
  TORCH_CHECK_INDEX(row >= 0 && row < num_rows, "engram.Prefetcher: row ", row, " at position ", position,
                    " is outside the table's ", num_rows, " rows");
}

// staged = table[ids]: the lookup's output itself, for a consumer on the CPU
// (nothing crosses a link there, so deduplicating would only add the sort).
inline Staged expand_gather(const at::Tensor& table, const at::Tensor& ids, bool pin_memory) {
  const int64_t num_rows = table.size(0);
  const int64_t n = ids.numel();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) check_row(id[i], i, num_rows);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(table.size(1));
  Staged out;
  out.staged = at::empty(shape, table.options().pinned_memory(pin_memory));
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(out.staged.mutable_data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dst + static_cast<size_t>(i) * row_bytes, src + static_cast<size_t>(id[i]) * row_bytes, row_bytes);
  }
  return out;
}

// rows = unique(ids), inverse, staged = table[rows]; ids must be row numbers in
// [0, table.size(0)) (int64, CPU, contiguous); table a contiguous CPU [R, Dh].
inline Staged dedup_gather(const at::Tensor& table, const at::Tensor& ids, bool pin_memory) {
  const int64_t num_rows = table.size(0);
  const int64_t n = ids.numel();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> sorted(id, id + n);
  for (int64_t i = 0; i < n; ++i) check_row(id[i], i, num_rows);
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  const int64_t unique = static_cast<int64_t>(sorted.size());

  Staged out;
  out.rows = at::empty({unique}, ids.options());
  std::memcpy(out.rows.mutable_data_ptr<int64_t>(), sorted.data(), sizeof(int64_t) * static_cast<size_t>(unique));
  out.inverse = at::empty(ids.sizes(), ids.options());
  int64_t* inv = out.inverse.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    inv[i] = std::lower_bound(sorted.begin(), sorted.end(), id[i]) - sorted.begin();
  }
  // 64-bit byte offsets: a table may hold more than 2^31 elements.
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  out.staged = at::empty({unique, table.size(1)}, table.options().pinned_memory(pin_memory));
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(out.staged.mutable_data_ptr());
  for (int64_t u = 0; u < unique; ++u) {
    std::memcpy(dst + static_cast<size_t>(u) * row_bytes, src + static_cast<size_t>(sorted[u]) * row_bytes,
                row_bytes);
  }
  return out;
}

inline void check_gather_args(const at::Tensor& table, const at::Tensor& ids) {
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.dim() == 2 && table.is_contiguous(),
                    "engram.Prefetcher: table must be a contiguous 2-D CPU tensor, got a ", table.dim(),
                    "-D tensor on ", table.device(), table.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
                    "engram.Prefetcher: ids must be contiguous int64 on the CPU, got ", ids.scalar_type(), " on ",
                    ids.device());
}

// One submission's future: wait() returns the result or rethrows the worker's
// exception (with its message) in the caller.
class Ticket {
 public:
  bool ready() {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_;
  }
  Staged wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return done_; });
    if (error_) std::rethrow_exception(error_);
    return result_;
  }
  void finish(Staged result) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      result_ = std::move(result);
      done_ = true;
    }
    cv_.notify_all();
  }
  void fail(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::move(error);
      done_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  Staged result_;
};

class GatherPool {
 public:
  explicit GatherPool(int num_threads) {
    TORCH_CHECK_VALUE(num_threads >= 1 && num_threads <= 256, "engram.Prefetcher: num_threads=", num_threads,
                      ", expected 1..256");
    for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { run(); });
  }
  GatherPool(const GatherPool&) = delete;
  GatherPool& operator=(const GatherPool&) = delete;
  virtual ~GatherPool() { close(); }

  int num_threads() const { return static_cast<int>(workers_.size()); }

  std::shared_ptr<Ticket> submit(const at::Tensor& table, const at::Tensor& ids, bool pin_memory, bool dedup) {
    check_gather_args(table, ids);
    auto ticket = std::make_shared<Ticket>();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(!closed_, "engram.Prefetcher: the prefetch engine is closed");
      tasks_.push_back(Task{ticket, table, ids, pin_memory, dedup});
    }
    cv_.notify_one();
    return ticket;
  }

  // Cancels the gathers not started yet (their tickets raise), lets running
  // ones finish and joins the workers. Idempotent.
  void close() {
    std::deque<Task> cancelled;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return;
      closed_ = true;
      cancelled.swap(tasks_);
    }
    cv_.notify_all();
    for (auto& task : cancelled) {
      task.ticket->fail(std::make_exception_ptr(
          std::runtime_error("engram.Prefetcher: the prefetch engine was closed before this gather ran")));
    }
    for (auto& worker : workers_) {
      if (worker.joinable()) worker.join();
    }
  }

 private:
  struct Task {
    std::shared_ptr<Ticket> ticket;
    at::Tensor table, ids;
    bool pin_memory, dedup;
  };

  void run() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [this] { return closed_ || !tasks_.empty(); });
        if (tasks_.empty()) return;  // closed
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      Staged result;
      std::exception_ptr error;
      try {
        result = task.dedup ? dedup_gather(task.table, task.ids, task.pin_memory)
                            : expand_gather(task.table, task.ids, task.pin_memory);
      } catch (...) {
        error = std::current_exception();
      }
      // Drop the inputs before the caller can go on: if the caller then drops
      // the last other reference, freeing a numpy-backed (mmap) table here
      // would need the GIL the caller may hold while it joins the workers.
      task.table.reset();
      task.ids.reset();
      if (error) {
        task.ticket->fail(error);
      } else {
        task.ticket->finish(std::move(result));
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Task> tasks_;
  bool closed_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace engram::prefetch
