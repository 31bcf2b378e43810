// Device-independent argument checks of the engram ops (defined in
// library.cpp); the CPU and CUDA implementations call them first.
#pragma once

#include <ATen/ATen.h>

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

// Reports the first id outside [0, vocab) (or row outside [0, num_rows) once
// offsets are added); call after a kernel saw one.
[[noreturn]] void report_id_out_of_range(const char* op, const char* name, const at::Tensor& ids,
                                         const std::optional<at::Tensor>& offsets, int64_t limit,
                                         const char* limit_name, bool negatives_allowed = false);

}  // namespace engram
