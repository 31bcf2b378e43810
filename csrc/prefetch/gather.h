// The gathers of engram.Prefetcher's engine: the rows a batch will look up, deduplicated or as the lookup's
// output, copied into a staging buffer. Torch-only, no Python: the workers run these without the GIL.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "csrc/checks.h"

namespace engram::prefetch {

// What a gather produces. Deduplicated: rows [U] strictly increasing, staged [U, Dh] = table[rows], inverse
// shaped like the ids with rows[inverse] == ids; with a hot-row cache, slots [U] holds each row's cache slot or
// -1 and staged only the rows not cached, in order (those never cross the link). Expanded: staged = table[ids],
// shaped ids.shape + [Dh], ids the table row of each lookup. cache_hits: the lookups whose row the cache held.
struct Staged {
  at::Tensor rows, staged, inverse, slots, ids;
  at::Tensor hashed;  // the hash ids [B, T, K] (no offsets) on the CPU: the caller's or the worker's
  int64_t cache_hits = 0;
  bool cached = false;  // a cache took part: brought up to date at use, never patched
};

// One layer's hashing on a worker, without offsets: engram::ngram_hash through the dispatcher (not linked).
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

// A snapshot of the hot-row cache: rows [H] strictly increasing, data [H, Dh] = table[rows] on the CPU (expanded
// gathers copy from it) or undefined (deduplicated ones only skip those rows). Not written while a gather runs.
struct Cache {
  at::Tensor rows, data;
  int64_t slot(int64_t row) const {  // the slot of `row`, or -1
    const int64_t* begin = rows.const_data_ptr<int64_t>();
    const int64_t* end = begin + rows.numel();
    const int64_t* it = std::lower_bound(begin, end, row);
    return (it != end && *it == row) ? it - begin : -1;
  }
};

// Copies table rows `from` (64-bit byte offsets: a table may hold more than 2^31 elements), or the cache's
// copy of those it holds data for, into dst.
inline int64_t copy_rows(const at::Tensor& table, const int64_t* from, int64_t n, char* dst, const Cache& cache) {
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  const char* src = static_cast<const char*>(table.const_data_ptr());
  const char* hot = cache.data.defined() ? static_cast<const char*>(cache.data.const_data_ptr()) : nullptr;
  int64_t hits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = hot ? cache.slot(from[i]) : -1;
    hits += slot >= 0;
    const char* row = slot >= 0 ? hot + slot * row_bytes : src + from[i] * row_bytes;  // size_t offsets
    std::memcpy(dst + i * row_bytes, row, row_bytes);
  }
  return hits;
}

// Deduplicated: rows = unique(ids), inverse, staged = table[rows] but for the rows the cache holds (the consumer
// takes those from its own copy, on the device). Else staged = table[ids], the lookup's output itself, for a
// consumer on the CPU (nothing crosses a link there: deduplicating would only add the sort).
inline Staged gather(const at::Tensor& table, const at::Tensor& ids, bool dedup, bool pin_memory,
                     const Cache& cache = {}) {
  check_rows(table, ids);
  Staged out;
  out.cached = cache.rows.defined();
  const auto options = table.options().pinned_memory(pin_memory);
  if (!dedup) {
    std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
    shape.push_back(table.size(1));
    out.ids = ids;
    out.staged = at::empty(shape, options);
    out.cache_hits = copy_rows(table, ids.const_data_ptr<int64_t>(), ids.numel(),
                               static_cast<char*>(out.staged.mutable_data_ptr()), cache);
    return out;
  }
  std::tie(out.rows, out.inverse, std::ignore) = at::_unique2(ids, /*sorted=*/true, /*return_inverse=*/true);
  const int64_t* row = out.rows.const_data_ptr<int64_t>();
  std::vector<int64_t> fetch;
  if (out.cached) {
    out.slots = at::empty_like(out.rows);
    int64_t* slot = out.slots.mutable_data_ptr<int64_t>();
    for (int64_t u = 0; u < out.rows.numel(); ++u) {
      slot[u] = cache.slot(row[u]);
      if (slot[u] < 0) fetch.push_back(row[u]);
    }
    out.cache_hits = out.slots.index_select(0, out.inverse.reshape(-1)).ge(0).sum().item<int64_t>();
  }
  const int64_t n = out.cached ? static_cast<int64_t>(fetch.size()) : out.rows.numel();
  out.staged = at::empty({n, table.size(1)}, options);
  copy_rows(table, out.cached ? fetch.data() : row, n, static_cast<char*>(out.staged.mutable_data_ptr()), Cache{});
  return out;
}

// Reads the rows `changed` (an update wrote them after the gather read them) again into its staged rows.
inline void patch_staged(const at::Tensor& table, const Staged& staged, const at::Tensor& changed) {
  const at::Tensor ids = (staged.rows.defined() ? staged.rows : staged.ids).reshape(-1);
  const at::Tensor pos = at::isin(ids, changed).nonzero().squeeze(1);  // ids checked against the table when gathered
  staged.staged.view({-1, table.size(1)}).index_copy_(0, pos, table.index_select(0, ids.index_select(0, pos)));
}

}  // namespace engram::prefetch
