// The worker threads of engram.Prefetcher's engine: one queue of tasks, each finishing its own ticket, so a layer
// waits only on its own rows. No Python, no intra-op threads: workers never need the GIL nor take the compute's cores.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cerrno>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

#include "csrc/prefetch/gather.h"
#include "csrc/prefetch/ticket.h"

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace engram::prefetch {

// Names the calling worker "engram-gather" (for top, py-spy, the tests) and, with nice_increment >= 0, makes it
// a background thread (Linux): SCHED_BATCH, so that a submit does not preempt the submitter (the model's
// compute), and a higher nice value, so that gathers take idle cores before the caller's. Best effort.
inline void set_up_worker_thread(int nice_increment) {
#ifdef __linux__
  (void)pthread_setname_np(pthread_self(), "engram-gather");
  if (nice_increment < 0) return;
  sched_param param{};
  (void)sched_setscheduler(0, SCHED_BATCH, &param);  // 0: this thread
  const auto tid = static_cast<id_t>(syscall(SYS_gettid));
  errno = 0;
  const int current = getpriority(PRIO_PROCESS, tid);
  if (nice_increment > 0 && errno == 0) (void)setpriority(PRIO_PROCESS, tid, std::min(19, current + nice_increment));
#else
  (void)nice_increment;
#endif
}

// One worker task. kGather: table[ids (+ offsets)]; kHashAndGather: the same after hashing hash.input_ids;
// kPatch: ids are the rows an update changed.
struct Task {
  TaskKind kind = TaskKind::kGather;
  std::shared_ptr<Ticket> ticket;
  at::Tensor table, ids, offsets;
  Cache cache;
  HashSpec hash;
  bool dedup = false, pin_memory = false;
};

class GatherPool {
 public:
  // background_nice: see set_up_worker_thread; -1 leaves ordinary threads.
  explicit GatherPool(int num_threads, int background_nice = 5) {
    check_pool_args(num_threads, background_nice);
    for (int i = 0; i < num_threads; ++i) {
      workers_.emplace_back([this, background_nice] {
        set_up_worker_thread(background_nice);
        // The ops a worker calls run on this thread alone: after ATen's per-thread init (which would set the
        // intra-op count), an OpenMP team of one.
        at::internal::lazy_init_num_threads();
#ifdef _OPENMP
        omp_set_num_threads(1);
#endif
        run();
      });
    }
  }
  virtual ~GatherPool() { close(); }

  // Queues the gather of table rows `ids` (+ `offsets` [K] per head, if given), deduplicated or expanded,
  // skipping the hot-row cache's sorted `cache_rows` (expanded: copied from cache_data = table[cache_rows]).
  std::shared_ptr<Ticket> submit(const at::Tensor& table, const at::Tensor& ids, bool pin_memory, bool dedup,
                                 const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& cache_rows,
                                 const std::optional<at::Tensor>& cache_data) {
    const Cache cache{cache_rows.value_or(at::Tensor()), cache_data.value_or(at::Tensor())};
    const at::Tensor offs = offsets.value_or(at::Tensor());
    check_gather_args(table, ids, offs, cache.rows, cache.data, dedup);
    auto ticket = std::make_shared<Ticket>(TaskKind::kGather);
    enqueue({Task{.kind = TaskKind::kGather, .ticket = ticket, .table = table, .ids = ids, .offsets = offs,
                  .cache = cache, .dedup = dedup, .pin_memory = pin_memory}});
    return ticket;
  }

  // Queues tasks in one lock and one wake-up (a batch of every layer).
  void enqueue(std::vector<Task> tasks) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(!closed_, "engram.Prefetcher: the prefetch engine is closed");
      for (auto& task : tasks) tasks_.push_back(std::move(task));
    }
    tasks.size() > 1 ? cv_.notify_all() : cv_.notify_one();
  }

  // Queues the patch of a finished gather (patch_staged) with the rows an update changed, its stamps moved to
  // the table's state after it. False, queuing nothing, if Ticket::begin_patch refuses.
  bool submit_patch(const std::shared_ptr<Ticket>& ticket, const at::Tensor& table, const at::Tensor& changed,
                    int64_t table_version, int64_t epoch, int64_t own_bumps) {
    check_table(table);
    check_long(changed, changed.dim() == 1 && changed.is_contiguous(),
               "changed rows must be a contiguous 1-D int64 CPU tensor");
    if (!ticket->begin_patch(Stamps{table_version, epoch, own_bumps}, table.size(1))) return false;
    try {
      enqueue({Task{.kind = TaskKind::kPatch, .ticket = ticket, .table = table, .ids = changed}});
      return true;
    } catch (const c10::Error&) {  // closed
      ticket->settle(true, {}, std::current_exception());
      return false;
    }
  }

  // Cancels the tasks not started yet (their tickets raise), lets running ones finish, joins the workers. Idempotent.
  void close() {
    std::deque<Task> cancelled;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return;
      closed_ = true;
      cancelled.swap(tasks_);
    }
    cv_.notify_all();
    const auto error = std::make_exception_ptr(
        std::runtime_error("engram.Prefetcher: the prefetch engine was closed before this gather ran"));
    for (auto& task : cancelled) task.ticket->settle(task.kind == TaskKind::kPatch, {}, error);
    for (auto& worker : workers_) {
      if (worker.joinable()) worker.join();
    }
  }

 private:
  static Staged run_task(const Task& task) {
    if (task.kind == TaskKind::kPatch) {
      patch_staged(task.table, task.ticket->peek(), task.ids);
      return {};
    }
    const at::Tensor hashed = task.kind == TaskKind::kHashAndGather ? hash_layer(task.hash).contiguous() : task.ids;
    Staged result = gather(task.table, task.offsets.defined() ? hashed + task.offsets : hashed, task.dedup,
                           task.pin_memory, task.cache);
    result.hashed = hashed;  // the backward's ids: no copy from an accelerator (a host sync) at use
    return result;
  }

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
        result = run_task(task);
      } catch (...) {
        error = std::current_exception();
      }
      const bool patch = task.kind == TaskKind::kPatch;
      auto ticket = std::move(task.ticket);
      // Drop the inputs before the caller can go on: if the caller then drops
      // the last other reference, freeing a numpy-backed (mmap) table here
      // would need the GIL the caller may hold while it joins the workers.
      task = Task{};
      ticket->settle(patch, std::move(result), error);
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Task> tasks_;
  bool closed_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace engram::prefetch
