// The gathers of engram.Prefetcher's engine (engram._engine, python/prefetch.cpp):
// for one table and the rows a batch will look up, copy them (deduplicated or
// as the lookup's output itself) into a staging buffer. Torch-only, no Python:
// the workers run these without the GIL.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "csrc/checks.h"

namespace engram::prefetch {

// What a gather produces. Deduplicated: rows [U] strictly increasing, staged
// [U, Dh] = table[rows], inverse shaped like the ids with rows[inverse] ==
// ids. Expanded: staged = table[ids], shaped ids.shape + [Dh], and ids the
// table row of each lookup (ids plus offsets). With a hot-row cache
// (deduplicated): slots [U] holds each row's cache slot or -1, and staged
// only the rows not cached, in order: the cached ones never cross the link.
// cache_hits counts the lookups whose row the cache held.
struct Staged {
  at::Tensor rows, staged, inverse, slots, ids;
  at::Tensor hashed;  // the hash ids [B, T, K] when the worker hashed them
  int64_t cache_hits = 0;
  bool cached = false;  // a cache took part: brought up to date at use, never patched
};

// One layer's hashing on a worker (the engram::ngram_hash op through the
// dispatcher: the engine does not link the op library), without offsets.
struct HashSpec {
  at::Tensor input_ids, lookup, keys, head_sizes;
  int64_t pad_id = 0;
  std::string family;
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

// A snapshot of the hot-row cache: rows [H] strictly increasing, data [H, Dh]
// = table[rows] on the CPU (expanded gathers copy from it) or undefined
// (deduplicated ones only skip those rows). Not written while a gather runs.
struct Cache {
  at::Tensor rows, data;
  int64_t slot(int64_t row) const {  // the slot of `row`, or -1
    const int64_t* begin = rows.const_data_ptr<int64_t>();
    const int64_t* end = begin + rows.numel();
    const int64_t* it = std::lower_bound(begin, end, row);
    return (it != end && *it == row) ? it - begin : -1;
  }
};

// The hash ids of a layer plus offsets[k] for head k (the last dim): table
// rows, made here on the worker rather than on the caller's critical path.
inline at::Tensor add_offsets(const at::Tensor& ids, const at::Tensor& offsets) {
  if (!offsets.defined()) return ids;
  const int64_t k = offsets.numel();
  at::Tensor out = at::empty_like(ids);
  const int64_t *in = ids.const_data_ptr<int64_t>(), *off = offsets.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) o[i] = in[i] + off[i % k];
  return out;
}

inline void check_rows(const at::Tensor& table, const at::Tensor& ids) {
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < table.size(0),
                      id_out_of_range_message({"engram.Prefetcher", "rows", "table.size(0)"}, id[i], i, table.size(0)));
  }
}

// Copies table rows `from` (64-bit byte offsets: a table may hold more than
// 2^31 elements), or the cache's copy of those it holds data for, into dst.
inline int64_t copy_rows(const at::Tensor& table, const int64_t* from, int64_t n, char* dst, const Cache& cache) {
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  const char* src = static_cast<const char*>(table.const_data_ptr());
  const char* hot = cache.data.defined() ? static_cast<const char*>(cache.data.const_data_ptr()) : nullptr;
  int64_t hits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = hot ? cache.slot(from[i]) : -1;
    hits += slot >= 0;
    std::memcpy(dst + static_cast<size_t>(i) * row_bytes,
                slot >= 0 ? hot + static_cast<size_t>(slot) * row_bytes : src + static_cast<size_t>(from[i]) * row_bytes,
                row_bytes);
  }
  return hits;
}

// staged = table[ids]: the lookup's output itself, for a consumer on the CPU
// (nothing crosses a link there, so deduplicating would only add the sort).
inline Staged expand_gather(const at::Tensor& table, const at::Tensor& ids, bool pin_memory, const Cache& cache = {}) {
  check_rows(table, ids);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(table.size(1));
  Staged out;
  out.ids = ids;
  out.cached = cache.rows.defined();
  out.staged = at::empty(shape, table.options().pinned_memory(pin_memory));
  out.cache_hits = copy_rows(table, ids.const_data_ptr<int64_t>(), ids.numel(),
                             static_cast<char*>(out.staged.mutable_data_ptr()), cache);
  return out;
}

// rows = unique(ids), inverse, staged = table[rows]; rows the cache holds are
// not gathered: the consumer takes them from its own copy (on the device).
inline Staged dedup_gather(const at::Tensor& table, const at::Tensor& ids, bool pin_memory, const Cache& cache = {}) {
  check_rows(table, ids);
  const int64_t n = ids.numel();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> sorted(id, id + n);
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  const int64_t unique = static_cast<int64_t>(sorted.size());
  Staged out;
  out.cached = cache.rows.defined();
  out.rows = at::empty({unique}, ids.options());
  std::copy(sorted.begin(), sorted.end(), out.rows.mutable_data_ptr<int64_t>());
  out.inverse = at::empty(ids.sizes(), ids.options());
  int64_t* inv = out.inverse.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) inv[i] = std::lower_bound(sorted.begin(), sorted.end(), id[i]) - sorted.begin();
  std::vector<int64_t> fetch;
  if (out.cached) {
    out.slots = at::empty({unique}, ids.options());
    int64_t* slot = out.slots.mutable_data_ptr<int64_t>();
    for (int64_t u = 0; u < unique; ++u) {
      slot[u] = cache.slot(sorted[u]);
      if (slot[u] < 0) fetch.push_back(sorted[u]);
    }
    for (int64_t i = 0; i < n; ++i) out.cache_hits += slot[inv[i]] >= 0;
  }
  const std::vector<int64_t>& gathered = out.cached ? fetch : sorted;
  out.staged = at::empty({static_cast<int64_t>(gathered.size()), table.size(1)},
                         table.options().pinned_memory(pin_memory));
  copy_rows(table, gathered.data(), static_cast<int64_t>(gathered.size()),
            static_cast<char*>(out.staged.mutable_data_ptr()), Cache{});
  return out;
}

inline void check_table(const at::Tensor& table) {
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.dim() == 2 && table.is_contiguous(),
                    "engram.Prefetcher: table must be a contiguous 2-D CPU tensor, got a ", table.dim(),
                    "-D tensor on ", table.device(), table.is_contiguous() ? "" : " (not contiguous)");
}

inline void check_offsets(const at::Tensor& offsets, int64_t heads) {
  TORCH_CHECK_VALUE(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                        offsets.is_contiguous() && offsets.numel() == heads,
                    "engram.Prefetcher: offsets must be contiguous int64 on the CPU with one entry per head (", heads,
                    "), got ", offsets.scalar_type(), " of shape ", offsets.sizes(), " on ", offsets.device());
}

inline void check_gather_args(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& offsets = {},
                              const Cache& cache = {}, bool dedup = true) {
  check_table(table);
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
                    "engram.Prefetcher: ids must be contiguous int64 on the CPU, got ", ids.scalar_type(), " on ",
                    ids.device());
  if (offsets.defined()) check_offsets(offsets, ids.dim() >= 1 ? ids.size(-1) : 0);
  if (!cache.rows.defined()) return;
  const at::Tensor &rows = cache.rows, &data = cache.data;
  TORCH_CHECK_VALUE(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 &&
                        rows.is_contiguous(),
                    "engram.Prefetcher: cache_rows must be a contiguous 1-D int64 CPU tensor, got ",
                    rows.scalar_type(), " of shape ", rows.sizes(), " on ", rows.device());
  TORCH_CHECK_VALUE(dedup || data.defined(),
                    "engram.Prefetcher: an expanded gather with a cache needs cache_data (the rows it copies)");
  TORCH_CHECK_VALUE(!data.defined() || (data.device().is_cpu() && data.is_contiguous() &&
                                        data.scalar_type() == table.scalar_type() && data.dim() == 2 &&
                                        data.size(0) == rows.numel() && data.size(1) == table.size(1)),
                    "engram.Prefetcher: cache_data must be a contiguous CPU [", rows.numel(), ", ", table.size(1),
                    "] ", table.scalar_type(), " tensor (one row per cache row), got ", data.scalar_type(),
                    " of shape ", data.sizes(), " on ", data.device());
}

// Whether patch_staged can bring a finished gather up to date: its rows are
// known, and no hot-row cache took part (those are brought up to date at use).
inline bool patchable(const Staged& staged) {
  return !staged.cached && staged.staged.defined() && (staged.rows.defined() || staged.ids.defined());
}

// Reads the rows listed in `changed` again from `table` into a finished,
// patchable gather's staged rows: those an update wrote after it read them.
inline void patch_staged(const at::Tensor& table, const Staged& staged, const at::Tensor& changed) {
  const at::Tensor& ids = staged.rows.defined() ? staged.rows : staged.ids;
  std::vector<int64_t> rows(changed.const_data_ptr<int64_t>(), changed.const_data_ptr<int64_t>() + changed.numel());
  std::sort(rows.begin(), rows.end());
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(staged.staged.mutable_data_ptr());
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {  // the ids were checked against the table when gathered
    if (std::binary_search(rows.begin(), rows.end(), id[i])) {
      std::memcpy(dst + static_cast<size_t>(i) * row_bytes, src + static_cast<size_t>(id[i]) * row_bytes, row_bytes);
    }
  }
}

}  // namespace engram::prefetch
