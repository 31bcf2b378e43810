// Device-independent argument checks of the engram ops (defined in
// library.cpp); the CPU and CUDA implementations call them first.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <utility>
#include <optional>
#include <string_view>

namespace engram {

enum class HashFamily { DeepSeek, XXH64 };

struct NgramHashShape {
  HashFamily family;
  int64_t num_layers;  // L
  int64_t max_ngram_size;  // N
  int64_t heads_per_order;  // H
  int64_t num_heads;  // K = (N-1) * H
};

HashFamily parse_hash_family(std::string_view family);

// Checks dtypes, ranks, devices and the hash table sizes; returns L, N, H, K.
NgramHashShape check_ngram_hash_args(const at::Tensor& ids, const at::Tensor& lookup, const at::Tensor& keys,
                                     const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets,
                                     int64_t pad_id, std::string_view family);

void check_compress_args(const at::Tensor& ids, const at::Tensor& lookup);

// Returns K (the ids' last dim).
int64_t check_embedding_args(const char* op, const at::Tensor& rows_like, const char* rows_name,
                             const at::Tensor& ids, const std::optional<at::Tensor>& offsets);

// check_embedding_args for the backward, plus grad = ids.shape + [Dh] and
// num_rows >= 1; returns K.
int64_t check_embedding_backward_args(const at::Tensor& grad, const at::Tensor& ids,
                                      const std::optional<at::Tensor>& offsets, int64_t num_rows);

// Reports the first id outside [0, vocab) (or row outside [0, num_rows) once
// offsets are added); call after a kernel saw one.
[[noreturn]] void report_id_out_of_range(const char* op, const char* name, const at::Tensor& ids,
                                         const std::optional<at::Tensor>& offsets, int64_t limit,
                                         const char* limit_name, bool negatives_allowed = false);

// Deferred error reports of the CUDA kernels (csrc/cuda/device_errors.h).
// The sync-check switch lives in library.cpp so that CPU builds have it too.
void set_cuda_sync_checks(bool enabled);
bool cuda_sync_checks();
// Takes the pending report of any CUDA device, clearing it: {0, ""} when
// there is none, else {1, message} for an IndexError, {2, message} for a ValueError.
std::pair<int, std::string> take_cuda_error();

// Layer ops (spec §5-6): shape checks shared by the CPU and CUDA kernels.
std::array<int64_t, 4> check_context_gate_args(const char* op, const at::Tensor& key, const at::Tensor& hidden,
                                               const at::Tensor& key_norm_weight,
                                               const at::Tensor& hidden_norm_weight, std::optional<double> eps);
std::array<int64_t, 5> check_gated_short_conv_args(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                                   const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                                   int64_t dilation, double eps);
void check_grad_like(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& like,
                     at::IntArrayRef expected);

// head_sizes >= 1 and, with offsets, offsets + head_sizes - 1 <= INT64_MAX
// for `count` heads (host pointers; offsets may be null).
void check_head_table(const char* op, const int64_t* sizes, const int64_t* offsets, int64_t count);

// Frees the blocks the CPU kernels keep for reuse (hash outputs, table
// gradients); returns how many bytes that was (cpu_ops.cpp).
size_t release_cached_cpu_blocks();

// Keeping freed blocks for reuse is on by default (engram/ops.py turns it
// off at import under ENGRAM_CPU_CACHE=0). Turning it off frees what is kept
// (returns its bytes) and keeps nothing more; thread-safe.
size_t set_cpu_cache_enabled(bool enabled);
bool cpu_cache_enabled();

}  // namespace engram
