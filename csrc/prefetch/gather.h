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
  bool cached = false;  // a hot-row cache took part (such a gather is brought up to date at use, not patched)
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
  out.cached = cache.defined();
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
  out.cached = cache.defined();
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

// Whether patch_staged can bring a finished gather up to date: its rows are
// known, and no hot-row cache took part (those are brought up to date at use).
inline bool patchable(const Staged& staged) {
  return !staged.cached && staged.staged.defined() && (staged.rows.defined() || staged.ids.defined());
}

// Reads the rows listed in `changed` again from `table` into a finished
// gather's staged rows (patchable): those an update wrote after the gather read them.
inline void patch_staged(const at::Tensor& table, const Staged& staged, const at::Tensor& changed) {
  const at::Tensor& ids = staged.rows.defined() ? staged.rows : staged.ids;
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

}  // namespace engram::prefetch
