// The engram operator library: every schema, in one TORCH_LIBRARY, and the
// argument checks shared by the CPU and CUDA kernels.
#include <Python.h>
#include <torch/library.h>

#include "csrc/checks.h"
#include "csrc/ops.h"
#include "kernels/hash.h"

namespace engram {

HashFamily parse_hash_family(std::string_view family) {
  if (family == "deepseek") return HashFamily::DeepSeek;
  if (family == "xxh64") return HashFamily::XXH64;
  TORCH_CHECK_VALUE(false, "ngram_hash: family must be 'deepseek' or 'xxh64', got '", std::string(family), "'");
}

void check_compress_args(const at::Tensor& ids, const at::Tensor& lookup) {
  constexpr const char* op = "compress_ids";
  ENGRAM_CHECK_DTYPE(op, "input_ids", ids, at::kLong);
  ENGRAM_CHECK_NONEMPTY(op, "input_ids", ids);
  ENGRAM_CHECK_DTYPE(op, "lookup", lookup, at::kLong);
  ENGRAM_CHECK_DIM(op, "lookup", lookup, 1);
  ENGRAM_CHECK_NONEMPTY(op, "lookup", lookup);
  ENGRAM_CHECK_SAME_DEVICE(op, "input_ids", ids, "lookup", lookup);
}

NgramHashShape check_ngram_hash_args(const at::Tensor& ids, const at::Tensor& lookup, const at::Tensor& keys,
                                     const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets,
                                     int64_t pad_id, std::string_view family) {
  constexpr const char* op = "ngram_hash";
  NgramHashShape shape{};
  shape.family = parse_hash_family(family);
  ENGRAM_CHECK_DTYPE(op, "input_ids", ids, at::kLong);
  ENGRAM_CHECK_DIM(op, "input_ids", ids, 2);
  TORCH_CHECK_VALUE(ids.size(0) > 0 && ids.size(1) > 0, op, ": input_ids has shape ", ids.sizes(),
                    "; expected [B, T] with B >= 1 sequences of T >= 1 tokens");
  ENGRAM_CHECK_DTYPE(op, "lookup", lookup, at::kLong);
  ENGRAM_CHECK_DIM(op, "lookup", lookup, 1);
  ENGRAM_CHECK_NONEMPTY(op, "lookup", lookup);
  ENGRAM_CHECK_DTYPE(op, "keys", keys, at::kLong);
  ENGRAM_CHECK_DIM(op, "keys", keys, 2);
  ENGRAM_CHECK_DTYPE(op, "head_sizes", head_sizes, at::kLong);
  ENGRAM_CHECK_DIM(op, "head_sizes", head_sizes, 2);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"lookup", lookup},
                                {"keys", keys}, {"head_sizes", head_sizes}}) {
    ENGRAM_CHECK_SAME_DEVICE(op, "input_ids", ids, name, t);
  }
  shape.num_layers = keys.size(0);
  TORCH_CHECK_VALUE(shape.num_layers >= 1, op, ": keys has shape ", keys.sizes(), "; expected at least one layer");
  // deepseek keys are the N multipliers, xxh64 keys the N-1 per-order seeds.
  shape.max_ngram_size = shape.family == HashFamily::DeepSeek ? keys.size(1) : keys.size(1) + 1;
  TORCH_CHECK_VALUE(shape.max_ngram_size >= 2 && shape.max_ngram_size <= kMaxNgramSize, op,
                    ": keys has shape ", keys.sizes(), ", i.e. max n-gram order ", shape.max_ngram_size,
                    " for family '", std::string(family), "'; expected an order in [2, ", kMaxNgramSize, "]");
  TORCH_CHECK_VALUE(head_sizes.size(0) == shape.num_layers, op, ": head_sizes has shape ", head_sizes.sizes(),
                    "; expected ", shape.num_layers, " rows, one per layer of keys");
  shape.num_heads = head_sizes.size(1);
  TORCH_CHECK_VALUE(shape.num_heads > 0 && shape.num_heads % (shape.max_ngram_size - 1) == 0, op,
                    ": head_sizes has shape ", head_sizes.sizes(), "; expected K = (N-1)*H columns with N-1 = ",
                    shape.max_ngram_size - 1);
  shape.heads_per_order = shape.num_heads / (shape.max_ngram_size - 1);
  if (offsets.has_value()) {
    ENGRAM_CHECK_DTYPE(op, "offsets", *offsets, at::kLong);
    ENGRAM_CHECK_SAME_DEVICE(op, "input_ids", ids, "offsets", *offsets);
    TORCH_CHECK_VALUE(offsets->sizes() == head_sizes.sizes(), op, ": offsets has shape ", offsets->sizes(),
                      "; expected the shape of head_sizes ", head_sizes.sizes());
  }
  TORCH_CHECK_INDEX(pad_id >= 0 && pad_id < lookup.size(0), op, ": pad_id=", pad_id,
                    " is outside the tokenizer vocabulary [0, ", lookup.size(0), ")");
  return shape;
}

int64_t check_embedding_args(const char* op, const at::Tensor& rows_like, const char* rows_name,
                             const at::Tensor& ids, const std::optional<at::Tensor>& offsets) {
  ENGRAM_CHECK_FLOATING(op, rows_name, rows_like);
  ENGRAM_CHECK_DTYPE(op, "ids", ids, at::kLong);
  TORCH_CHECK_VALUE(ids.dim() >= 1, op, ": ids must be [..., K], got a 0-dim tensor");
  ENGRAM_CHECK_NONEMPTY(op, "ids", ids);
  ENGRAM_CHECK_SAME_DEVICE(op, rows_name, rows_like, "ids", ids);
  const int64_t num_heads = ids.size(-1);
  if (offsets.has_value()) {
    ENGRAM_CHECK_DTYPE(op, "offsets", *offsets, at::kLong);
    ENGRAM_CHECK_DIM(op, "offsets", *offsets, 1);
    ENGRAM_CHECK_SAME_DEVICE(op, "ids", ids, "offsets", *offsets);
    TORCH_CHECK_VALUE(offsets->size(0) == num_heads, op, ": offsets has ", offsets->size(0),
                      " entries but ids has K=", num_heads, " heads in its last dim ", ids.sizes());
  }
  return num_heads;
}

void report_id_out_of_range(const char* op, const char* name, const at::Tensor& ids,
                            const std::optional<at::Tensor>& offsets, int64_t limit, const char* limit_name,
                            bool negatives_allowed) {
  at::Tensor rows = ids.to(at::kCPU);
  if (offsets.has_value()) rows = rows.reshape({-1, ids.size(-1)}) + offsets->to(at::kCPU);
  rows = rows.reshape({-1});
  at::Tensor bad = (negatives_allowed ? rows >= limit : (rows < 0) | (rows >= limit)).nonzero();
  TORCH_CHECK(bad.numel() > 0, op, ": internal error: a kernel reported an out-of-range id but none was found");
  const int64_t index = bad[0].item<int64_t>();
  TORCH_CHECK_INDEX(false, op, ": ", name, " holds ", rows[index].item<int64_t>(), " at flat index ", index,
                    (offsets.has_value() ? " (after adding offsets)" : ""), "; expected values ", (negatives_allowed ? "< " : "in [0, "), limit,
                    (negatives_allowed ? "" : ")"), " for ", limit_name, "=", limit);
}

}  // namespace engram

TORCH_LIBRARY(engram, m) {
  // Token ids -> canonical ids (spec §1); negative ids pass through.
  m.def("compress_ids(Tensor input_ids, Tensor lookup) -> Tensor");
  // Compress + shift + mix + mod (+ offsets) for L layers in one pass:
  // input_ids [B, T] -> [L, B, T, K]. keys: [L, N] multipliers ("deepseek")
  // or [L, N-1] per-order seeds ("xxh64"); head_sizes, offsets: [L, K].
  m.def(
      "ngram_hash(Tensor input_ids, Tensor lookup, Tensor keys, Tensor head_sizes, Tensor? offsets, "
      "int pad_id, str family) -> Tensor");
  // weight [R, Dh], ids [..., K] (+ offsets [K]) -> [..., K, Dh]. `sparse`
  // only selects the gradient layout, as in aten::embedding.
  m.def("multihead_embedding(Tensor weight, Tensor ids, Tensor? offsets, bool sparse=False) -> Tensor");
  // Dense gradient of the table: scatter-add of grad [..., K, Dh] into [R, Dh].
  m.def("multihead_embedding_backward(Tensor grad, Tensor ids, Tensor? offsets, SymInt num_rows) -> Tensor");
}

// engram._C is imported for its side effect of registering the library.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "engram operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
