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
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cerrno>
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

#include "csrc/checks.h"

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace engram::prefetch {

// Makes the calling worker thread a background thread (Linux): SCHED_BATCH,
// so that waking it up (a submit) does not preempt the thread that submitted,
// i.e. the model's compute, and a nice value above the caller's, so that on a
// machine whose cores the compute keeps busy the gathers take the idle time
// first. Without this, on a small machine every submit could hand the
// caller's core to the worker for the whole gather: the very time the
// prefetch is meant to hide. Best effort: failures leave the defaults.
inline void lower_worker_priority(int nice_increment) {
#ifdef __linux__
  sched_param param{};
  param.sched_priority = 0;
  (void)sched_setscheduler(0, SCHED_BATCH, &param);  // 0: this thread
  if (nice_increment > 0) {
    const pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
    errno = 0;
    const int current = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
    if (errno == 0) (void)setpriority(PRIO_PROCESS, static_cast<id_t>(tid), std::min(19, current + nice_increment));
  }
#else
  (void)nice_increment;
#endif
}

// Names the calling worker thread "engram-gather" (Linux), so that it can be
// told apart in top, py-spy and /proc/<pid>/task/*/comm, and by the tests.
inline void name_worker_thread() {
#ifdef __linux__
  (void)pthread_setname_np(pthread_self(), "engram-gather");
#endif
}

// What a gather produces. Deduplicated: rows [U] int64 strictly increasing,
// staged [U, Dh] = table[rows], inverse shaped like the ids with
// rows[inverse] == ids. Expanded: staged = table[ids], shaped ids.shape + [Dh]
// (rows and inverse undefined).
//
// With a hot-row cache (Cache below), deduplicated: slots [U] holds each
// row's cache slot or -1, and staged holds only the rows not cached (slot
// -1), in order: the cached ones never cross the link. Expanded: the cached
// rows are copied from the cache's data (a compact tensor, not the table).
// cache_hits counts the lookups (ids) whose row is cached.
struct Staged {
  at::Tensor rows, staged, inverse, slots;
  int64_t cache_hits = 0;
  at::Tensor hashed;  // the hash ids [B, T, K] when the worker hashed them (HashSpec)
  at::Tensor ids;     // expanded gathers: the table row of each lookup (ids plus offsets), shaped like the ids
};

// The hashing of one layer's ids, done by the worker rather than by the
// caller (the engram::ngram_hash op, called through the dispatcher: the
// engine does not link the op library): input_ids [B, T], the layer's lookup,
// keys [1, *], head_sizes [1, K], no offsets.
struct HashSpec {
  at::Tensor input_ids, lookup, keys, head_sizes;
  int64_t pad_id = 0;
  std::string family;
  bool defined() const { return input_ids.defined(); }
};

inline at::Tensor hash_layer(const HashSpec& spec) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("engram::ngram_hash", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t, c10::string_view)>();
  return op.call(spec.input_ids, spec.lookup, spec.keys, spec.head_sizes, std::nullopt, spec.pad_id,
                 c10::string_view(spec.family))[0];
}

// A snapshot of the hot-row cache a gather may use: rows [H] int64 strictly
// increasing (table rows), data [H, Dh] = table[rows] on the CPU (expanded
// gathers read it) or undefined (deduplicated gathers only skip those rows).
// The caller must not write data while a gather using it runs.
struct Cache {
  at::Tensor rows, data;
  bool defined() const { return rows.defined(); }
  // The slot of `row`, or -1.
  int64_t slot(int64_t row) const {
    const int64_t* begin = rows.const_data_ptr<int64_t>();
    const int64_t* end = begin + rows.numel();
    const int64_t* it = std::lower_bound(begin, end, row);
    return (it != end && *it == row) ? it - begin : -1;
  }
};

// ids, with offsets[k] added to the ids of head k (the last dim) when offsets
// is defined: the hash ids of a layer become table rows here, on the worker,
// rather than on the caller's critical path.
inline at::Tensor add_offsets(const at::Tensor& ids, const at::Tensor& offsets) {
  if (!offsets.defined()) return ids;
  const int64_t k = offsets.numel();
  TORCH_CHECK_VALUE(ids.dim() >= 1 && ids.size(-1) == k, "engram.Prefetcher: offsets has ", k,
                    " entries but ids has shape ", ids.sizes(), "; expected one offset per head (last dim)");
  at::Tensor out = at::empty_like(ids);
  const int64_t* in = ids.const_data_ptr<int64_t>();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const int64_t n = ids.numel();
  for (int64_t i = 0; i < n; ++i) o[i] = in[i] + off[i % k];
  return out;
}

inline void check_row(int64_t row, int64_t position, int64_t num_rows) {
  TORCH_CHECK_INDEX(row >= 0 && row < num_rows,
                    id_out_of_range_message({"engram.Prefetcher", "rows", "table.size(0)"}, row, position, num_rows));
}

// staged = table[ids]: the lookup's output itself, for a consumer on the CPU
// (nothing crosses a link there, so deduplicating would only add the sort).
inline Staged expand_gather(const at::Tensor& table, const at::Tensor& ids, bool pin_memory,
                            const Cache& cache = {}) {
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
  const bool cached = cache.defined() && cache.rows.numel() > 0;
  const char* hot = cached ? static_cast<const char*>(cache.data.const_data_ptr()) : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = cached ? cache.slot(id[i]) : -1;
    const char* from = slot >= 0 ? hot + static_cast<size_t>(slot) * row_bytes
                                 : src + static_cast<size_t>(id[i]) * row_bytes;
    out.cache_hits += slot >= 0;
    std::memcpy(dst + static_cast<size_t>(i) * row_bytes, from, row_bytes);
  }
  return out;
}

// rows = unique(ids), inverse, staged = table[rows]; ids must be row numbers in
// [0, table.size(0)) (int64, CPU, contiguous); table a contiguous CPU [R, Dh].
inline Staged dedup_gather(const at::Tensor& table, const at::Tensor& ids, bool pin_memory,
                           const Cache& cache = {}) {
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
  // Rows the cache holds are not gathered: the consumer takes them from its
  // own copy (on the device), so only the others cross the link.
  std::vector<int64_t> fetch;
  const std::vector<int64_t>* gathered = &sorted;
  if (cache.defined()) {
    out.slots = at::empty({unique}, ids.options());
    int64_t* slot = out.slots.mutable_data_ptr<int64_t>();
    std::vector<int64_t> uses(static_cast<size_t>(unique), 0);
    for (int64_t i = 0; i < n; ++i) ++uses[static_cast<size_t>(inv[i])];
    for (int64_t u = 0; u < unique; ++u) {
      slot[u] = cache.slot(sorted[u]);
      if (slot[u] < 0) {
        fetch.push_back(sorted[u]);
      } else {
        out.cache_hits += uses[static_cast<size_t>(u)];
      }
    }
    gathered = &fetch;
  }
  const int64_t count = static_cast<int64_t>(gathered->size());
  // 64-bit byte offsets: a table may hold more than 2^31 elements.
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  out.staged = at::empty({count, table.size(1)}, table.options().pinned_memory(pin_memory));
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(out.staged.mutable_data_ptr());
  for (int64_t u = 0; u < count; ++u) {
    std::memcpy(dst + static_cast<size_t>(u) * row_bytes,
                src + static_cast<size_t>((*gathered)[u]) * row_bytes, row_bytes);
  }
  return out;
}

inline void check_cache_args(const at::Tensor& table, const Cache& cache) {
  if (!cache.defined()) return;
  TORCH_CHECK_VALUE(cache.rows.device().is_cpu() && cache.rows.scalar_type() == at::kLong &&
                        cache.rows.dim() == 1 && cache.rows.is_contiguous(),
                    "engram.Prefetcher: cache_rows must be a contiguous 1-D int64 CPU tensor, got ",
                    cache.rows.scalar_type(), " of shape ", cache.rows.sizes(), " on ", cache.rows.device());
  if (cache.data.defined()) {
    TORCH_CHECK_VALUE(cache.data.device().is_cpu() && cache.data.is_contiguous() &&
                          cache.data.scalar_type() == table.scalar_type() && cache.data.dim() == 2 &&
                          cache.data.size(0) == cache.rows.numel() && cache.data.size(1) == table.size(1),
                      "engram.Prefetcher: cache_data must be a contiguous CPU [", cache.rows.numel(), ", ",
                      table.size(1), "] ", table.scalar_type(), " tensor (one row per cache row), got ",
                      cache.data.scalar_type(), " of shape ", cache.data.sizes(), " on ", cache.data.device());
  }
}

inline void check_offsets(const at::Tensor& offsets, int64_t heads) {
  TORCH_CHECK_VALUE(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                        offsets.is_contiguous() && offsets.numel() == heads,
                    "engram.Prefetcher: offsets must be contiguous int64 on the CPU with one entry per head (", heads,
                    "), got ", offsets.scalar_type(), " of shape ", offsets.sizes(), " on ", offsets.device());
}

inline void check_table(const at::Tensor& table) {
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.dim() == 2 && table.is_contiguous(),
                    "engram.Prefetcher: table must be a contiguous 2-D CPU tensor, got a ", table.dim(),
                    "-D tensor on ", table.device(), table.is_contiguous() ? "" : " (not contiguous)");
}

inline void check_gather_args(const at::Tensor& table, const at::Tensor& ids) {
  check_table(table);
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
                    "engram.Prefetcher: ids must be contiguous int64 on the CPU, got ", ids.scalar_type(), " on ",
                    ids.device());
}

// Reads the rows listed in `changed` again from `table` into a finished
// gather's staged rows: those an update wrote after the gather read them.
// Deduplicated (rows) or expanded (ids) gathers without a hot-row cache.
inline void patch_staged(const at::Tensor& table, const Staged& staged, const at::Tensor& changed) {
  TORCH_CHECK(!staged.slots.defined(), "engram.Prefetcher: a gather that used the hot-row cache cannot be patched");
  const at::Tensor& ids = staged.rows.defined() ? staged.rows : staged.ids;
  TORCH_CHECK(ids.defined() && staged.staged.defined() && staged.staged.size(-1) == table.size(1),
              "engram.Prefetcher: this gather's rows are unknown, it cannot be patched");
  std::vector<int64_t> rows(changed.const_data_ptr<int64_t>(), changed.const_data_ptr<int64_t>() + changed.numel());
  std::sort(rows.begin(), rows.end());
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(staged.staged.mutable_data_ptr());
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t n = ids.numel();
  for (int64_t i = 0; i < n; ++i) {
    // The ids were checked against the table when gathered.
    if (std::binary_search(rows.begin(), rows.end(), id[i])) {
      std::memcpy(dst + static_cast<size_t>(i) * row_bytes, src + static_cast<size_t>(id[i]) * row_bytes, row_bytes);
    }
  }
}

// One submission's future: wait() returns the result or rethrows the worker's
// exception (with its message) in the caller.
class Ticket {
 public:
  // A gather hashed from token ids (GatherPool::submit_layers): those ids, and
  // when it was queued the table's version counter and the caller's update
  // count of the table and those updates' version bumps (see LayerSpec).
  // The ids are set before the task is queued and never change (read without
  // the lock); a patch (begin_patch) moves the stamps on.
  void set_source(at::Tensor input_ids, int64_t table_version, int64_t epoch, int64_t own_bumps) {
    source_ids_ = std::move(input_ids);
    table_version_ = table_version;
    epoch_ = epoch;
    own_bumps_ = own_bumps;
  }
  int64_t table_version() {
    std::lock_guard<std::mutex> lock(mutex_);
    return table_version_;
  }
  int64_t epoch() {
    std::lock_guard<std::mutex> lock(mutex_);
    return epoch_;
  }
  int64_t own_bumps() {
    std::lock_guard<std::mutex> lock(mutex_);
    return own_bumps_;
  }
  // A patch of a finished gather (GatherPool::submit_patch): the staged rows
  // are brought up to the table's state given by the new stamps; wait() and
  // ready() also wait for it. False (nothing to patch) if the gather failed
  // or has not finished.
  bool begin_patch(int64_t table_version, int64_t epoch, int64_t own_bumps) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!done_ || error_) return false;
    ++patches_;
    table_version_ = table_version;
    epoch_ = epoch;
    own_bumps_ = own_bumps;
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
  // Whether `ids` are the token ids this gather was hashed from (same shape
  // and values): the lookup's match, a few KB compared here rather than in
  // Python on the model's critical path.
  bool matches(const at::Tensor& ids) const {
    if (!source_ids_.defined() || !ids.device().is_cpu() || ids.scalar_type() != at::kLong ||
        ids.sizes() != source_ids_.sizes()) {
      return false;
    }
    if (ids.numel() == 0) return true;
    const at::Tensor dense = ids.contiguous();
    return std::memcmp(dense.const_data_ptr<int64_t>(), source_ids_.const_data_ptr<int64_t>(),
                       sizeof(int64_t) * static_cast<size_t>(dense.numel())) == 0;
  }
  bool ready() {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_ && patches_ == 0;
  }
  Staged wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return done_ && patches_ == 0; });
    if (error_) std::rethrow_exception(error_);
    return result_;
  }
  // Whether a (finished) gather used the cache, its slots and its hits: wait() first.
  at::Tensor slots() {
    std::lock_guard<std::mutex> lock(mutex_);
    return result_.slots;
  }
  int64_t cache_hits() {
    std::lock_guard<std::mutex> lock(mutex_);
    return result_.cache_hits;
  }
  at::Tensor hashed() {
    std::lock_guard<std::mutex> lock(mutex_);
    return result_.hashed;
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
  int patches_ = 0;
  std::exception_ptr error_;
  Staged result_;
  at::Tensor source_ids_;
  int64_t table_version_ = -1, epoch_ = 0, own_bumps_ = 0;
};

// One Engram layer's part of a prefetch from token ids (submit_layers): its
// table, how its ids are hashed (HashSpec, input_ids left undefined), its
// head offsets and the kind of gather. Checked once when built, so that a
// prefetch does no per-layer checking on the caller's critical path.
//
// watched: the layer's own tensors that the spec's hash parameters and
// offsets are copies of, with their version counters then: an in-place change
// of one makes the spec stale (current() false). counters (optional): int64
// [2] that the caller keeps up to date, its count of recorded updates of the
// table and their version bumps, stamped on each ticket at submission.
//
// table is the layer's parameter itself (not an alias): should its data be
// replaced (`param.data = ...`, a move to another device) the spec sees the
// new pointer and is stale. skipped: a layer whose table is not in CPU memory
// (looked up directly; no gather is queued for it).
struct LayerSpec {
  at::Tensor table, offsets;
  HashSpec hash;
  bool dedup = false, pin_memory = false, skipped = false;
  std::vector<at::Tensor> watched;
  std::vector<int64_t> watched_versions;
  std::vector<const void*> watched_data;
  at::Tensor counters;
  const void* table_data = nullptr;

  bool current() const { return table_current() && params_current(); }
  // The table's data is where it was: the queued gathers read this data.
  bool table_current() const { return table.defined() && table.const_data_ptr() == table_data; }
  bool params_current() const {
    for (size_t i = 0; i < watched.size(); ++i) {
      if (watched[i]._version() != watched_versions[i] || watched[i].const_data_ptr() != watched_data[i]) {
        return false;
      }
    }
    return true;
  }
  int64_t counter(int64_t which) const {
    return counters.defined() ? counters.const_data_ptr<int64_t>()[which] : 0;
  }
};

inline LayerSpec make_layer_spec(const at::Tensor& table, const at::Tensor& lookup, const at::Tensor& keys,
                                 const at::Tensor& head_sizes, int64_t pad_id, const std::string& family,
                                 const at::Tensor& offsets, bool dedup, bool pin_memory,
                                 const std::vector<at::Tensor>& watched = {}, const at::Tensor& counters = {}) {
  check_table(table);
  TORCH_CHECK_VALUE(head_sizes.device().is_cpu() && head_sizes.dim() == 2 && head_sizes.size(0) == 1,
                    "engram.Prefetcher: head_sizes must be one layer's CPU [1, K] tensor, got shape ",
                    head_sizes.sizes(), " on ", head_sizes.device());
  TORCH_CHECK_VALUE(lookup.device().is_cpu() && keys.device().is_cpu(),
                    "engram.Prefetcher: lookup and keys must be on the CPU, got ", lookup.device(), " and ",
                    keys.device());
  check_offsets(offsets, head_sizes.size(1));
  TORCH_CHECK_VALUE(!counters.defined() || (counters.device().is_cpu() && counters.scalar_type() == at::kLong &&
                                            counters.dim() == 1 && counters.numel() == 2 && counters.is_contiguous()),
                    "engram.Prefetcher: counters must be a contiguous int64 CPU tensor [2], got ",
                    counters.defined() ? counters.sizes() : at::IntArrayRef{});
  LayerSpec spec;
  spec.table = table;
  spec.offsets = offsets;
  spec.hash = HashSpec{at::Tensor(), lookup, keys, head_sizes, pad_id, family};
  spec.dedup = dedup;
  spec.pin_memory = pin_memory;
  spec.counters = counters;
  spec.table_data = table.const_data_ptr();
  for (const at::Tensor& t : watched) {
    spec.watched.push_back(t);
    spec.watched_versions.push_back(t._version());
    spec.watched_data.push_back(t.const_data_ptr());
  }
  return spec;
}

// The spec of a layer whose table is not in CPU memory: nothing is queued for
// it, and it is stale once the table's data moves (e.g. to the CPU).
inline LayerSpec skipped_layer_spec(const at::Tensor& table) {
  LayerSpec spec;
  spec.table = table;
  spec.table_data = table.const_data_ptr();
  spec.skipped = true;
  return spec;
}

class GatherPool {
 public:
  // background_nice: the workers run as background threads (SCHED_BATCH,
  // nice raised by this much, see lower_worker_priority); -1 leaves them as
  // ordinary threads.
  explicit GatherPool(int num_threads, int background_nice = 5) {
    TORCH_CHECK_VALUE(num_threads >= 1 && num_threads <= 256, "engram.Prefetcher: num_threads=", num_threads,
                      ", expected 1..256");
    TORCH_CHECK_VALUE(background_nice >= -1 && background_nice <= 19, "engram.Prefetcher: background_nice=",
                      background_nice, ", expected -1 (ordinary threads) or 0..19");
    for (int i = 0; i < num_threads; ++i) {
      workers_.emplace_back([this, background_nice] {
        name_worker_thread();
        if (background_nice >= 0) lower_worker_priority(background_nice);
        // The op a worker may call (ngram_hash) runs on this thread alone:
        // after ATen's own per-thread init (which would set the intra-op
        // count), an OpenMP team of one, so it never adds threads to the
        // compute's.
        at::internal::lazy_init_num_threads();
#ifdef _OPENMP
        omp_set_num_threads(1);
#endif
        run();
      });
    }
  }
  GatherPool(const GatherPool&) = delete;
  GatherPool& operator=(const GatherPool&) = delete;
  virtual ~GatherPool() { close(); }

  int num_threads() const { return static_cast<int>(workers_.size()); }

  // offsets (optional, int64 [K]) are added to the ids of each head by the
  // worker; cache (optional) is the hot-row cache snapshot the gather uses.
  std::shared_ptr<Ticket> submit(const at::Tensor& table, const at::Tensor& ids, bool pin_memory, bool dedup,
                                 const at::Tensor& offsets = {}, const Cache& cache = {}) {
    check_gather_args(table, ids);
    check_cache_args(table, cache);
    TORCH_CHECK_VALUE(dedup || !cache.defined() || cache.data.defined(),
                      "engram.Prefetcher: an expanded gather with a cache needs cache_data (the rows it copies)");
    if (offsets.defined()) check_offsets(offsets, ids.dim() >= 1 ? ids.size(-1) : 0);
    auto ticket = std::make_shared<Ticket>();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(!closed_, "engram.Prefetcher: the prefetch engine is closed");
      tasks_.push_back(Task{ticket, table, ids, offsets, cache, HashSpec{}, pin_memory, dedup, false});
    }
    cv_.notify_one();
    return ticket;
  }

  // Queues the hashing and gather of every layer in `specs` for token ids
  // input_ids [B, T] (copied once, shared by the layers' tasks): one call,
  // one lock and one wake-up per batch. Returns one ticket per layer, in
  // order (null for a skipped spec); each knows its token ids
  // (Ticket::matches) and the table's version.
  std::vector<std::shared_ptr<Ticket>> submit_layers(const at::Tensor& input_ids,
                                                     const std::vector<LayerSpec>& specs) {
    TORCH_CHECK_VALUE(input_ids.device().is_cpu() && input_ids.scalar_type() == at::kLong && input_ids.dim() == 2,
                      "engram.Prefetcher: input_ids must be an int64 CPU tensor [B, T], got ",
                      input_ids.scalar_type(), " of shape ", input_ids.sizes(), " on ", input_ids.device());
    // A copy: the caller may reuse its buffer while the workers hash.
    const at::Tensor ids = input_ids.clone(at::MemoryFormat::Contiguous);
    std::vector<std::shared_ptr<Ticket>> tickets;
    std::vector<Task> tasks;
    tickets.reserve(specs.size());
    tasks.reserve(specs.size());
    for (const LayerSpec& spec : specs) {
      if (spec.skipped) {
        tickets.push_back(nullptr);
        continue;
      }
      auto ticket = std::make_shared<Ticket>();
      ticket->set_source(ids, spec.table._version(), spec.counter(0), spec.counter(1));
      HashSpec hash = spec.hash;
      hash.input_ids = ids;
      tasks.push_back(Task{ticket, spec.table, at::Tensor(), spec.offsets, Cache{}, std::move(hash),
                           spec.pin_memory, spec.dedup, false});
      tickets.push_back(std::move(ticket));
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(!closed_, "engram.Prefetcher: the prefetch engine is closed");
      for (auto& task : tasks) tasks_.push_back(std::move(task));
    }
    if (tasks.size() > 1) {
      cv_.notify_all();
    } else {
      cv_.notify_one();
    }
    return tickets;
  }

  // Queues the patch of a finished gather (patch_staged) with the rows an
  // update changed, and moves its stamps to the table's state after that
  // update; the ticket's wait() then also waits for the patch. Returns false,
  // queuing nothing, if the gather failed or has not finished.
  bool submit_patch(const std::shared_ptr<Ticket>& ticket, const at::Tensor& table, const at::Tensor& changed,
                    int64_t table_version, int64_t epoch, int64_t own_bumps) {
    check_table(table);
    TORCH_CHECK_VALUE(changed.device().is_cpu() && changed.scalar_type() == at::kLong && changed.dim() == 1 &&
                          changed.is_contiguous(),
                      "engram.Prefetcher: changed rows must be a contiguous 1-D int64 CPU tensor, got ",
                      changed.scalar_type(), " of shape ", changed.sizes(), " on ", changed.device());
    if (!ticket->begin_patch(table_version, epoch, own_bumps)) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!closed_) {
        tasks_.push_back(Task{ticket, table, changed, at::Tensor(), Cache{}, HashSpec{}, false, false, true});
        cv_.notify_one();
        return true;
      }
    }
    ticket->end_patch(std::make_exception_ptr(std::runtime_error("engram.Prefetcher: the prefetch engine is closed")));
    return false;
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
      auto error = std::make_exception_ptr(
          std::runtime_error("engram.Prefetcher: the prefetch engine was closed before this gather ran"));
      if (task.patch) {
        task.ticket->end_patch(error);
      } else {
        task.ticket->fail(error);
      }
    }
    for (auto& worker : workers_) {
      if (worker.joinable()) worker.join();
    }
  }

 private:
  struct Task {
    std::shared_ptr<Ticket> ticket;
    at::Tensor table, ids, offsets;
    Cache cache;
    HashSpec hash;
    bool pin_memory, dedup;
    bool patch = false;  // ids: the changed rows to read again into ticket's staged rows
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
      if (task.patch) {
        std::exception_ptr error;
        try {
          patch_staged(task.table, task.ticket->peek(), task.ids);
        } catch (...) {
          error = std::current_exception();
        }
        task.table.reset();
        task.ids.reset();
        task.ticket->end_patch(error);
        continue;
      }
      Staged result;
      std::exception_ptr error;
      try {
        at::Tensor hashed = task.hash.defined() ? hash_layer(task.hash).contiguous() : task.ids;
        const at::Tensor rows = add_offsets(hashed, task.offsets);
        result = task.dedup ? dedup_gather(task.table, rows, task.pin_memory, task.cache)
                            : expand_gather(task.table, rows, task.pin_memory, task.cache);
        if (task.hash.defined()) result.hashed = hashed;
        if (!task.dedup) result.ids = rows;
      } catch (...) {
        error = std::current_exception();
      }
      // Drop the inputs before the caller can go on: if the caller then drops
      // the last other reference, freeing a numpy-backed (mmap) table here
      // would need the GIL the caller may hold while it joins the workers.
      task.table.reset();
      task.ids.reset();
      task.offsets.reset();
      task.cache = Cache{};
      task.hash = HashSpec{};
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

// The prefetches from token ids of one engram.Prefetcher (its CPU path): one
// LayerSpec per layer and, per layer, its prefetched batches not used yet
// (oldest first, at most max_pending). prefetch() and take() are the calls
// on the model's critical path, so each is a single call into here with no
// Python per layer: on a small machine every object the interpreter touches
// after the model's compute is a cache (and TLB) miss.
class LayerQueues {
 public:
  // What take() found.
  enum class Take : int {
    kMiss = 0,     // no prefetched batch of these token ids
    kClean = 1,    // found, and the table has not changed since its gather was queued
    kChanged = 2,  // found, but the table changed since (or the gather is deduplicated): the caller checks
    kCompareHashIds = 3,  // token ids cannot decide (hash parameters changed, or ids not int64 on the CPU)
  };

  LayerQueues(GatherPool& pool, int64_t num_layers, int64_t max_pending)
      : pool_(pool), specs_(static_cast<size_t>(num_layers)), queues_(static_cast<size_t>(num_layers)),
        max_pending_(max_pending) {
    TORCH_CHECK_VALUE(num_layers >= 0 && max_pending >= 1, "engram.Prefetcher: num_layers=", num_layers,
                      ", max_pending=", max_pending, "; expected >= 0 and >= 1");
  }

  int64_t num_layers() const { return static_cast<int64_t>(specs_.size()); }

  // Sets layer `index`'s spec and drops its queued batches: they were hashed
  // and gathered with the old one, so their token ids no longer decide.
  void set_layer(int64_t index, LayerSpec spec) {
    std::lock_guard<std::mutex> lock(mutex_);
    specs_.at(check_index(index)) = std::move(spec);
    queues_[static_cast<size_t>(index)].clear();
  }

  // Queues every layer's hashing and gather for input_ids [B, T]; returns
  // the layers whose spec is missing or stale instead, queuing nothing (the
  // caller sets them again and calls once more).
  std::vector<int64_t> prefetch(const at::Tensor& input_ids) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int64_t> stale;
    for (size_t i = 0; i < specs_.size(); ++i) {
      if (!specs_[i].current()) stale.push_back(static_cast<int64_t>(i));
    }
    if (!stale.empty()) return stale;
    auto tickets = pool_.submit_layers(input_ids, specs_);
    for (size_t i = 0; i < tickets.size(); ++i) {
      if (!tickets[i]) continue;  // skipped layer
      auto& queue = queues_[i];
      queue.push_back(std::move(tickets[i]));
      while (static_cast<int64_t>(queue.size()) > max_pending_) queue.pop_front();
    }
    return stale;
  }

  // Finds, removes and waits for layer `index`'s prefetched batch of
  // input_ids (rethrowing its worker's error). kClean: `ticket` is done, its
  // staged rows are current and expanded (table[ids] itself).
  Take take(int64_t index, const at::Tensor& input_ids, std::shared_ptr<Ticket>& ticket) {
    at::Tensor table, counters;
    bool dedup = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const LayerSpec& spec = specs_.at(check_index(index));
      auto& queue = queues_[static_cast<size_t>(index)];
      if (queue.empty()) return Take::kMiss;
      if (!spec.table_current()) {  // gathered from data the table no longer holds
        queue.clear();
        return Take::kMiss;
      }
      if (!spec.params_current() || !input_ids.defined() || !input_ids.device().is_cpu() ||
          input_ids.scalar_type() != at::kLong) {
        return Take::kCompareHashIds;
      }
      auto it = std::find_if(queue.begin(), queue.end(), [&](const auto& t) { return t->matches(input_ids); });
      if (it == queue.end()) return Take::kMiss;
      ticket = std::move(*it);
      queue.erase(it);
      table = spec.table;
      counters = spec.counters;
      dedup = spec.dedup;
    }
    ticket->wait();  // rethrows the worker's error, the ticket already removed
    const int64_t epoch = counters.defined() ? counters.const_data_ptr<int64_t>()[0] : 0;
    const bool clean = !dedup && table._version() == ticket->table_version() && epoch == ticket->epoch();
    return clean ? Take::kClean : Take::kChanged;
  }

  // Layer `index`'s prefetched batches not used yet, oldest first.
  std::vector<std::shared_ptr<Ticket>> pending(int64_t index) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto& queue = queues_.at(check_index(index));
    return {queue.begin(), queue.end()};
  }

  // Drops layer `index`'s queued batches.
  void drop(int64_t index) {
    std::lock_guard<std::mutex> lock(mutex_);
    queues_.at(check_index(index)).clear();
  }

  // Removes one pending batch (found by the caller, e.g. by its hash ids).
  void remove(int64_t index, const std::shared_ptr<Ticket>& ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& queue = queues_.at(check_index(index));
    auto it = std::find(queue.begin(), queue.end(), ticket);
    if (it != queue.end()) queue.erase(it);
  }

  // Drops every pending batch and spec (running gathers finish on their own).
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& queue : queues_) queue.clear();
    for (auto& spec : specs_) spec = LayerSpec{};
  }

  size_t check_index(int64_t index) const {
    TORCH_CHECK_INDEX(index >= 0 && index < num_layers(), "engram.Prefetcher: layer index ", index,
                      " is outside 0..", num_layers() - 1);
    return static_cast<size_t>(index);
  }

 private:
  GatherPool& pool_;
  std::mutex mutex_;  // the specs and queues (the Prefetcher calls from one thread; this keeps others safe)
  std::vector<LayerSpec> specs_;
  std::vector<std::deque<std::shared_ptr<Ticket>>> queues_;
  int64_t max_pending_;
};

}  // namespace engram::prefetch
