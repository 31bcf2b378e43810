// The one queue of engram.Prefetcher: per layer, its LayerSpec and its batches not used yet (oldest first, at
// most max_pending) of every kind. prefetch() and take() are on the model's critical path: one call each.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "csrc/prefetch/pool.h"

namespace engram::prefetch {

// One layer as the workers hash and gather its batches: its table, copies of its hash parameters (input_ids
// left undefined) and head offsets, checked once when built. Stale once a `watched` tensor (the layer's own,
// copied) changed in place (version or data pointer) or the table's data was replaced (`param.data = ...`);
// reassigned tensors are the caller's to report (Prefetcher.refresh). skipped (no lookup): nothing is queued.
struct LayerSpec {
  at::Tensor table, offsets;
  HashSpec hash;
  bool dedup = false, skipped = true;
  std::vector<std::pair<at::Tensor, std::pair<int64_t, const void*>>> watched;  // tensor, (version, data) then
  const void* table_data = nullptr;

  LayerSpec() = default;
  LayerSpec(const at::Tensor& table, const std::optional<at::Tensor>& lookup, const at::Tensor& keys,
            const at::Tensor& head_sizes, int64_t pad_id, const std::string& family, const at::Tensor& offsets,
            bool dedup, const std::vector<at::Tensor>& watched_tensors)
      : table(table), offsets(offsets), dedup(dedup), skipped(!lookup.has_value()), table_data(table.const_data_ptr()) {
    if (skipped) return;
    check_layer_spec(table, *lookup, keys, head_sizes, offsets);
    hash = HashSpec{at::Tensor(), *lookup, keys, head_sizes, pad_id, family};
    for (const at::Tensor& t : watched_tensors) watched.push_back({t, {t._version(), t.const_data_ptr()}});
  }

  bool table_current() const { return table.defined() && table.const_data_ptr() == table_data; }
  bool params_current() const {
    return std::all_of(watched.begin(), watched.end(), [](const auto& w) {
      return w.first._version() == w.second.first && w.first.const_data_ptr() == w.second.second;
    });
  }
  bool current() const { return table_current() && params_current(); }
  // Hashes as `other` does (equal copies): its batches still match by token ids.
  bool same_hash(const LayerSpec& other) const {
    return equal(hash.lookup, other.hash.lookup) && equal(hash.keys, other.hash.keys) &&
           equal(hash.head_sizes, other.hash.head_sizes) && hash.pad_id == other.hash.pad_id &&
           hash.family == other.hash.family;
  }
  // Reads the same rows for the same hash ids as `other`: same table data, same offsets.
  bool same_rows(const LayerSpec& other) const {
    return skipped == other.skipped && table.defined() && other.table.defined() &&
           table.unsafeGetTensorImpl() == other.table.unsafeGetTensorImpl() && table_data == other.table_data &&
           equal(offsets, other.offsets);
  }
  static bool equal(const at::Tensor& a, const at::Tensor& b) {
    return a.defined() == b.defined() && (!a.defined() || (a.sizes() == b.sizes() && at::equal(a, b)));
  }
};

// What take() found: no batch of these ids; the batch (removed, waited for); a missing or stale spec (set_layer,
// take again).
enum class Take : int { kMiss, kFound, kStale };

class LayerQueues {
 public:
  LayerQueues(GatherPool& pool, int64_t num_layers, int64_t max_pending)
      : pool_(pool), layers_(static_cast<size_t>(std::max<int64_t>(num_layers, 0))), max_pending_(max_pending) {
    TORCH_CHECK_VALUE(num_layers >= 0 && max_pending >= 1, "engram.Prefetcher: num_layers=", num_layers,
                      ", max_pending=", max_pending, "; expected >= 0 and >= 1");
  }

  // Sets layer `index`'s spec. Its queued batches are kept if the new spec reads the same rows (table, offsets);
  // they still match by token ids if it also hashes the same, else only by their hash ids.
  void set_layer(int64_t index, LayerSpec spec) {
    std::lock_guard<std::mutex> lock(mutex_);
    Layer& layer = layers_.at(check_index(index));
    if (!spec.same_rows(layer.spec)) {
      layer.queue.clear();
    } else if (!spec.same_hash(layer.spec)) {
      ++layer.generation;
    }
    layer.spec = std::move(spec);
  }

  std::vector<int64_t> stale() {  // the layers whose spec is missing or stale
    std::lock_guard<std::mutex> lock(mutex_);
    return stale_locked();
  }
  // The caller's count of recorded updates of the layer's table and their bumps, stamped on batches queued now on.
  void set_counters(int64_t index, int64_t epoch, int64_t own_bumps) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::tie(layers_.at(check_index(index)).epoch, layers_[index].own_bumps) = std::tie(epoch, own_bumps);
  }

  // Queues every layer's hashing and gather for input_ids [B, T] (copied once: the caller may reuse its buffer)
  // in one lock and one wake-up; or, queuing nothing, returns the layers whose spec is missing or stale.
  std::vector<int64_t> prefetch(const at::Tensor& input_ids) {
    check_long(input_ids, input_ids.dim() == 2, "input_ids must be an int64 CPU tensor [B, T]");
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int64_t> stale = stale_locked();
    if (!stale.empty()) return stale;
    const at::Tensor tokens = input_ids.clone(at::MemoryFormat::Contiguous);
    std::vector<Task> tasks;
    std::vector<std::pair<size_t, std::shared_ptr<Ticket>>> queued;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerSpec& spec = layers_[i].spec;
      if (spec.skipped) continue;
      Task task{.kind = TaskKind::kHashAndGather, .ticket = std::make_shared<Ticket>(TaskKind::kHashAndGather),
                .table = spec.table, .offsets = spec.offsets, .hash = spec.hash, .dedup = spec.dedup};
      task.ticket->set_source(input_ids, tokens, at::Tensor(), layers_[i].generation, stamps_locked(layers_[i]));
      task.hash.input_ids = tokens;
      queued.emplace_back(i, task.ticket);
      tasks.push_back(std::move(task));
    }
    pool_.enqueue(std::move(tasks));
    for (auto& [i, ticket] : queued) push_locked(layers_[i], std::move(ticket));
    return stale;
  }

  // Queues a batch the caller hashed (submitted, or gathered on a device): key its hash ids [B, T, K].
  void add(int64_t index, const std::shared_ptr<Ticket>& ticket, const at::Tensor& input_ids, const at::Tensor& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    Layer& layer = layers_.at(check_index(index));
    ticket->set_source(input_ids, at::Tensor(), key, layer.generation, stamps_locked(layer));
    push_locked(layer, ticket);
  }

  // Finds, removes and waits for layer `index`'s batch of these token ids (or, where they cannot decide, of
  // these hash ids), rethrowing its worker's error. With neither: only whether the spec is current. Third, the
  // staged rows when they are the lookup's output as the table holds it now (expanded, no cache, the table
  // unchanged and no update recorded since queued): the common CPU case needs nothing else.
  std::tuple<Take, std::shared_ptr<Ticket>, std::optional<at::Tensor>> take(
      int64_t index, const std::optional<at::Tensor>& input_ids, const std::optional<at::Tensor>& hash_ids) {
    const at::Tensor tokens = input_ids.value_or(at::Tensor()), hashes = hash_ids.value_or(at::Tensor());
    std::shared_ptr<Ticket> found;
    std::vector<std::shared_ptr<Ticket>> undecided;
    at::Tensor table;
    int64_t epoch = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Layer& layer = layers_.at(check_index(index));
      // set_layer drops what was gathered from data the table no longer holds, and keeps the rest.
      if (!layer.spec.current()) return {Take::kStale, nullptr, std::nullopt};
      std::tie(table, epoch) = std::tie(layer.spec.table, layer.epoch);
      for (auto it = layer.queue.begin(); it != layer.queue.end(); ++it) {
        const Match match = (*it)->generation() == layer.generation ? (*it)->matches(tokens) : Match::kUnknown;
        if (match == Match::kYes) {
          found = std::move(*it);
          layer.queue.erase(it);
          break;
        }
        if (match == Match::kUnknown) undecided.push_back(*it);
      }
    }
    // Compared by hash ids outside the lock: an engine-hashed key is known once its gather ran.
    for (size_t i = 0; !found && hashes.defined() && i < undecided.size(); ++i) {
      try {
        undecided[i]->wait();
      } catch (...) {  // raised at use, if these are the ids; dropped either way
        remove(index, undecided[i]);
        throw;
      }
      const at::Tensor key = undecided[i]->key();
      if (key.defined() && key.sizes() == hashes.sizes() && at::equal(key, hashes.to(key.device())) &&
          remove(index, undecided[i])) {
        found = undecided[i];
      }
    }
    if (!found) return {Take::kMiss, nullptr, std::nullopt};
    const Staged staged = found->wait();  // rethrows the worker's error, the ticket already removed
    const Stamps stamps = found->stamps();
    if (staged.ids.defined() && !staged.cached && stamps.table_version == table._version() && stamps.epoch == epoch) {
      return {Take::kFound, found, staged.staged};
    }
    return {Take::kFound, found, std::nullopt};
  }

  std::vector<std::shared_ptr<Ticket>> pending(int64_t index) {  // not used yet, oldest first
    std::lock_guard<std::mutex> lock(mutex_);
    const auto& queue = layers_.at(check_index(index)).queue;
    return {queue.begin(), queue.end()};
  }

  void clear() {  // every pending batch and spec (running gathers finish on their own)
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& layer : layers_) layer = Layer{};
  }

 private:
  struct Layer {
    LayerSpec spec;
    std::deque<std::shared_ptr<Ticket>> queue;
    int64_t generation = 0;  // bumped when the spec hashes differently: older batches match by hash ids
    int64_t epoch = 0, own_bumps = 0;
  };

  size_t check_index(int64_t index) const {
    const auto n = static_cast<int64_t>(layers_.size());
    TORCH_CHECK_INDEX(index >= 0 && index < n, "engram.Prefetcher: layer index ", index, " is outside 0..", n - 1);
    return static_cast<size_t>(index);
  }
  std::vector<int64_t> stale_locked() const {
    std::vector<int64_t> stale;
    for (size_t i = 0; i < layers_.size(); ++i) {
      if (!layers_[i].spec.current()) stale.push_back(static_cast<int64_t>(i));
    }
    return stale;
  }
  static Stamps stamps_locked(const Layer& layer) {
    return Stamps{layer.spec.table.defined() ? layer.spec.table._version() : -1, layer.epoch, layer.own_bumps};
  }
  void push_locked(Layer& layer, std::shared_ptr<Ticket> ticket) {
    layer.queue.push_back(std::move(ticket));
    while (static_cast<int64_t>(layer.queue.size()) > max_pending_) layer.queue.pop_front();
  }
  bool remove(int64_t index, const std::shared_ptr<Ticket>& ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& queue = layers_[static_cast<size_t>(index)].queue;
    auto it = std::find(queue.begin(), queue.end(), ticket);
    if (it == queue.end()) return false;
    queue.erase(it);
    return true;
  }

  GatherPool& pool_;
  std::mutex mutex_;  // the layers (the Prefetcher calls from one thread; this keeps others safe)
  std::vector<Layer> layers_;
  int64_t max_pending_;
};

}  // namespace engram::prefetch
