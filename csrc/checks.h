// Every argument check of the engram ops (defined in csrc/checks.cpp): the
// CPU and CUDA kernels call them first, and the Meta kernels (checks.cpp,
// what torch.compile, torch.export and meta tensors run) are those checks and
// the output shapes. Each message names the op, the argument, the value seen
// and what was expected.
//
// The messages of errors found in the values (an id out of range, a bad head
// size, rows out of order) are worded once, by the formatters below: the CPU
// checks, the CUDA deferred reports (csrc/cuda/device_errors.cu) and the
// prefetch engine use them. The prefetch engine's own checks are at the end,
// inline: it is another library (engram._engine), not linked with checks.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace engram {

// --- errors found in the values: the one wording of each --------------------

// Who reports a bad id: `arg` of `op` indexes something of `limit_name` rows.
// negatives_allowed: negative ids pass through (compress_ids, ngram_hash).
struct IdRange {
  const char* op;
  const char* arg;
  const char* limit_name;
  bool negatives_allowed = false;
};

// "op: arg holds value at flat index i; expected values in [0, limit) for limit_name=limit"
inline std::string id_out_of_range_message(const IdRange& r, int64_t value, int64_t index, int64_t limit,
                                           bool after_offsets = false) {
  return c10::str(r.op, ": ", r.arg, " holds ", value, " at flat index ", index,
                  after_offsets ? " (after adding offsets)" : "", "; expected values ",
                  r.negatives_allowed ? "< " : "in [0, ", limit, r.negatives_allowed ? "" : ")", " for ",
                  r.limit_name, "=", limit);
}

// An id whose head offset (offsets[head]) does not fit int64 once added.
inline std::string id_offset_overflow_message(const IdRange& r, int64_t id, int64_t index, int64_t head,
                                              int64_t offset, int64_t limit) {
  return c10::str(r.op, ": ", r.arg, " holds ", id, " at flat index ", index, "; adding offsets[", head, "]=", offset,
                  " overflows int64; expected rows in [0, ", limit, ") for ", r.limit_name, "=", limit);
}

inline std::string head_size_message(const char* op, int64_t size, int64_t index) {
  return c10::str(op, ": head_sizes holds ", size, " at flat index ", index, "; expected table sizes >= 1");
}

inline std::string head_offset_overflow_message(const char* op, int64_t offset, int64_t index, int64_t size) {
  return c10::str(op, ": offsets holds ", offset, " at flat index ", index, "; with head_sizes ", size,
                  " its ids would overflow int64");
}

// Rows of a row-wise update that are not strictly increasing.
inline std::string rows_unordered_message(const char* op, int64_t previous, int64_t row, int64_t index) {
  return c10::str(op, ": rows holds ", previous, " then ", row, " at indices ", index - 1, " and ", index,
                  "; expected strictly increasing rows, each once (as dedup_row_grads returns them)");
}

// An Adam step count below 1: `what` is "step=" (the int) or "step_count holds " (the tensor).
inline std::string adam_step_message(const char* op, const char* what, int64_t step) {
  return c10::str(op, ": ", what, step, "; expected >= 1 (the number of this update, counting from 1)");
}

// The rows of the row-wise update ops index weight.
inline IdRange update_rows_range(const char* op) { return {op, "rows", "weight.size(0)"}; }

// --- hash and embedding ops --------------------------------------------------

enum class HashFamily { DeepSeek, XXH64 };

struct NgramHashShape {
  HashFamily family;
  int64_t num_layers;       // L
  int64_t max_ngram_size;   // N
  int64_t heads_per_order;  // H
  int64_t num_heads;        // K = (N-1) * H
};

HashFamily parse_hash_family(std::string_view family);

// Checks dtypes, ranks, devices and the hash table sizes; returns L, N, H, K.
NgramHashShape check_ngram_hash_args(const at::Tensor& ids, const at::Tensor& lookup, const at::Tensor& keys,
                                     const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets,
                                     int64_t pad_id, std::string_view family);

void check_compress_args(const at::Tensor& ids, const at::Tensor& lookup);

// head_sizes >= 1 and, with offsets, offsets + head_sizes - 1 <= INT64_MAX
// for `count` heads (host pointers; offsets may be null).
void check_head_table(const char* op, const int64_t* sizes, const int64_t* offsets, int64_t count);

// rows_like [..., Dh] floating, ids [..., K] int64 (+ offsets [K]) on one
// device; returns K.
int64_t check_embedding_args(const char* op, const at::Tensor& rows_like, const char* rows_name,
                             const at::Tensor& ids, const std::optional<at::Tensor>& offsets);

// check_embedding_args with weight [R, Dh]; returns K.
int64_t check_multihead_embedding_args(const at::Tensor& weight, const at::Tensor& ids,
                                       const std::optional<at::Tensor>& offsets);

// check_embedding_args for a gradient, plus grad = ids.shape + [Dh] and
// num_rows >= 1 (and, for the dense backward, a [num_rows, Dh] gradient
// whose bytes fit int64); returns K.
int64_t check_embedding_backward_args(const at::Tensor& grad, const at::Tensor& ids,
                                      const std::optional<at::Tensor>& offsets, int64_t num_rows);
int64_t check_dedup_args(const at::Tensor& grad, const at::Tensor& ids, const std::optional<at::Tensor>& offsets,
                         int64_t num_rows);

// Reports the first id outside [0, vocab) (or row outside [0, num_rows) once
// offsets are added); call after a kernel saw one.
[[noreturn]] void report_id_out_of_range(const IdRange& range, const at::Tensor& ids,
                                         const std::optional<at::Tensor>& offsets, int64_t limit);

// gather_rows: table [R, Dh] contiguous, rows int64; returns the output
// shape rows.shape + [Dh].
std::vector<int64_t> check_gather_rows_args(const at::Tensor& table, const at::Tensor& rows);

// --- layer ops (spec §5-6) -----------------------------------------------------

// Returns B, T, G, D.
std::array<int64_t, 4> check_context_gate_args(const char* op, const at::Tensor& key, const at::Tensor& hidden,
                                               const at::Tensor& key_norm_weight,
                                               const at::Tensor& hidden_norm_weight, std::optional<double> eps);
// Returns B, T, G, D, kernel_size.
std::array<int64_t, 5> check_gated_short_conv_args(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                                   const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                                   int64_t dilation, double eps);
void check_grad_like(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& like,
                     at::IntArrayRef expected);

// --- row-wise update ops (engram.optim) ------------------------------------------

// weight [R, Dh] float32/float64, contiguous (updated in place); each state
// on weight's device and dtype, contiguous, shaped [R, Dh] (sum_sq: [R]);
// rows int64 [U], row_grads [U, Dh] in weight's dtype; nothing written
// overlaps anything else; hyperparameters finite and in range. Returns U.
// Row values are checked by the kernels.
int64_t check_sgd_update_args(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& row_grads,
                              double lr, double weight_decay);
int64_t check_adagrad_update_args(const at::Tensor& weight, const at::Tensor& sum_sq, const at::Tensor& rows,
                                  const at::Tensor& row_grads, double lr, double eps, double weight_decay);
int64_t check_adam_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                               const at::Tensor& rows, const at::Tensor& row_grads, double lr, double beta1,
                               double beta2, double eps, double weight_decay, int64_t step,
                               const std::optional<at::Tensor>& step_count);

// After a kernel saw a row outside [0, num_rows) or rows not strictly
// increasing: reports the first such position.
[[noreturn]] void report_bad_update_rows(const char* op, const at::Tensor& rows, int64_t num_rows);

// --- the prefetch engine (csrc/prefetch/, engram._engine: inline) --------------

namespace prefetch {

inline void check_table(const at::Tensor& table) {
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.dim() == 2 && table.is_contiguous(),
                    "engram.Prefetcher: table must be a contiguous 2-D CPU tensor, got a ", table.dim(),
                    "-D tensor on ", table.device(), table.is_contiguous() ? "" : " (not contiguous)");
}

// Every id of a gather is a row of the table.
inline void check_rows(const at::Tensor& table, const at::Tensor& ids) {
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < table.size(0),
                      id_out_of_range_message({"engram.Prefetcher", "rows", "table.size(0)"}, id[i], i, table.size(0)));
  }
}

// That `t` is an int64 CPU tensor meeting `ok` (its other requirements), all of them worded by `expected`.
template <typename... Expected>
inline void check_long(const at::Tensor& t, bool ok, const Expected&... expected) {
  TORCH_CHECK_VALUE(ok && t.device().is_cpu() && t.scalar_type() == at::kLong, "engram.Prefetcher: ", expected...,
                    ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

inline void check_offsets(const at::Tensor& offsets, int64_t heads) {
  check_long(offsets, offsets.dim() == 1 && offsets.is_contiguous() && offsets.numel() == heads,
             "offsets must be contiguous int64 on the CPU with one entry per head (", heads, ")");
}

// A gather of table[ids (+ offsets)], skipping the hot-row cache's rows (expanded: copied from cache_data).
inline void check_gather_args(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& offsets = {},
                              const at::Tensor& cache_rows = {}, const at::Tensor& cache_data = {},
                              bool dedup = true) {
  check_table(table);
  check_long(ids, ids.is_contiguous(), "ids must be contiguous int64 on the CPU");
  if (offsets.defined()) check_offsets(offsets, ids.dim() >= 1 ? ids.size(-1) : 0);
  TORCH_CHECK_VALUE(cache_rows.defined() || !cache_data.defined(),
                    "engram.Prefetcher: cache_data given without cache_rows");
  if (!cache_rows.defined()) return;
  const at::Tensor &rows = cache_rows, &data = cache_data;
  check_long(rows, rows.dim() == 1 && rows.is_contiguous(), "cache_rows must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK_VALUE(dedup || data.defined(),
                    "engram.Prefetcher: an expanded gather with a cache needs cache_data (the rows it copies)");
  TORCH_CHECK_VALUE(!data.defined() || (data.device().is_cpu() && data.is_contiguous() &&
                                        data.scalar_type() == table.scalar_type() && data.dim() == 2 &&
                                        data.size(0) == rows.numel() && data.size(1) == table.size(1)),
                    "engram.Prefetcher: cache_data must be a contiguous CPU [", rows.numel(), ", ", table.size(1),
                    "] ", table.scalar_type(), " tensor (one row per cache row), got ", data.scalar_type(),
                    " of shape ", data.sizes(), " on ", data.device());
}

// One layer's spec: its table, and its hash parameters as CPU copies (head_sizes [1, K]) with offsets [K].
inline void check_layer_spec(const at::Tensor& table, const at::Tensor& lookup, const at::Tensor& keys,
                             const at::Tensor& head_sizes, const at::Tensor& offsets) {
  check_table(table);
  TORCH_CHECK_VALUE(head_sizes.device().is_cpu() && head_sizes.dim() == 2 && head_sizes.size(0) == 1 &&
                        lookup.device().is_cpu() && keys.device().is_cpu(),
                    "engram.Prefetcher: lookup, keys and head_sizes must be one layer's CPU tensors (head_sizes "
                    "[1, K]), got head_sizes of shape ", head_sizes.sizes(), " on ", head_sizes.device());
  check_offsets(offsets, head_sizes.size(1));
}

inline void check_pool_args(int num_threads, int background_nice) {
  TORCH_CHECK_VALUE(num_threads >= 1 && num_threads <= 256, "engram.Prefetcher: num_threads=", num_threads,
                    ", expected 1..256");
  TORCH_CHECK_VALUE(background_nice >= -1 && background_nice <= 19, "engram.Prefetcher: background_nice=",
                    background_nice, ", expected -1 (ordinary threads) or 0..19");
}

}  // namespace prefetch

}  // namespace engram
