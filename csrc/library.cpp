// The engram operator library: every schema, in one TORCH_LIBRARY, and the
// argument checks shared by the CPU and CUDA kernels.
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>

#include <c10/util/safe_numerics.h>

#include "csrc/checks.h"
#include "csrc/ops.h"
#include "kernels/cpu_isa.h"
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
  // Rows of no values would make every id check vacuous (the kernels visit
  // entries * Dh elements).
  TORCH_CHECK_VALUE(rows_like.dim() >= 1 && rows_like.size(-1) >= 1, op, ": ", rows_name, " has shape ",
                    rows_like.sizes(), "; expected rows of Dh >= 1 values in its last dim");
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

int64_t check_embedding_backward_args(const at::Tensor& grad, const at::Tensor& ids,
                                      const std::optional<at::Tensor>& offsets, int64_t num_rows) {
  constexpr const char* op = "multihead_embedding_backward";
  const int64_t num_heads = check_embedding_args(op, grad, "grad", ids, offsets);
  TORCH_CHECK_VALUE(grad.dim() == ids.dim() + 1 && grad.sizes().slice(0, ids.dim()) == ids.sizes(), op,
                    ": grad has shape ", grad.sizes(), "; expected ids.shape + [Dh] with ids.shape ", ids.sizes());
  TORCH_CHECK_VALUE(num_rows >= 1, op, ": num_rows=", num_rows, "; expected >= 1");
  // The kernels size the [num_rows, Dh] gradient in bytes: a product that
  // wraps would allocate a small block and write far past it.
  int64_t bytes = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(num_rows, grad.size(-1), &bytes) &&
                        !c10::mul_overflows(bytes, static_cast<int64_t>(grad.element_size()), &bytes),
                    op, ": num_rows=", num_rows, " with rows of Dh=", grad.size(-1), " ", grad.scalar_type(),
                    " values needs more than 2^63 bytes");
  return num_heads;
}

void check_head_table(const char* op, const int64_t* sizes, const int64_t* offsets, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(sizes[i] >= 1, op, ": head_sizes holds ", sizes[i], " at flat index ", i,
                      "; expected table sizes >= 1");
    // The largest id of head i is offsets[i] + sizes[i] - 1.
    TORCH_CHECK_VALUE(offsets == nullptr || offsets[i] <= std::numeric_limits<int64_t>::max() - (sizes[i] - 1), op,
                      ": offsets holds ", offsets[i], " at flat index ", i, "; with head_sizes ", sizes[i],
                      " its ids would overflow int64");
  }
}

void report_id_out_of_range(const char* op, const char* name, const at::Tensor& ids,
                            const std::optional<at::Tensor>& offsets, int64_t limit, const char* limit_name,
                            bool negatives_allowed) {
  // Rows of K heads when offsets are added (ids may be 0-dim otherwise).
  const int64_t K = offsets.has_value() ? ids.size(-1) : 1;
  const at::Tensor cpu_ids = ids.to(at::kCPU).reshape({-1, K});
  at::Tensor rows = cpu_ids;
  at::Tensor overflow = at::zeros_like(cpu_ids, cpu_ids.options().dtype(at::kBool));
  at::Tensor cpu_offsets;
  if (offsets.has_value()) {
    cpu_offsets = offsets->to(at::kCPU).expand_as(cpu_ids);
    rows = cpu_ids + cpu_offsets;  // wraps, like the kernels' sums
    // A signed sum overflowed iff its sign differs from the signs of both operands.
    overflow = at::bitwise_xor(cpu_ids, rows).bitwise_and(at::bitwise_xor(cpu_offsets, rows)) < 0;
  }
  rows = rows.reshape({-1});
  at::Tensor bad = (overflow.reshape({-1}) | (negatives_allowed ? rows >= limit : (rows < 0) | (rows >= limit))).nonzero();
  TORCH_CHECK(bad.numel() > 0, op, ": internal error: a kernel reported an out-of-range id but none was found");
  const int64_t index = bad[0].item<int64_t>();
  if (overflow.reshape({-1})[index].item<bool>()) {
    TORCH_CHECK_INDEX(false, op, ": ", name, " holds ", cpu_ids.reshape({-1})[index].item<int64_t>(),
                      " at flat index ", index, "; adding offsets[", index % K, "]=",
                      cpu_offsets.reshape({-1})[index].item<int64_t>(), " overflows int64; expected rows in [0, ",
                      limit, ") for ", limit_name, "=", limit);
  }
  TORCH_CHECK_INDEX(false, op, ": ", name, " holds ", rows[index].item<int64_t>(), " at flat index ", index,
                    (offsets.has_value() ? " (after adding offsets)" : ""), "; expected values ", (negatives_allowed ? "< " : "in [0, "), limit,
                    (negatives_allowed ? "" : ")"), " for ", limit_name, "=", limit);
}

// --- Engram layer ops (spec §5-6) -------------------------------------------

namespace {

void check_same_floating_dtype(const char* op, const char* ref_name, const at::Tensor& ref, const char* name,
                               const at::Tensor& t) {
  ENGRAM_CHECK_SAME_DEVICE(op, ref_name, ref, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but ", ref_name,
                   " is ", ref.scalar_type(), "; expected one floating dtype for all of them");
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                 const char* expected_text) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " has shape ", t.sizes(), "; expected ", expected_text,
                    " = ", expected);
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps=", eps, "; expected a finite value >= 0");
}

}  // namespace

std::array<int64_t, 4> check_context_gate_args(const char* op, const at::Tensor& key, const at::Tensor& hidden,
                                               const at::Tensor& key_norm_weight,
                                               const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  ENGRAM_CHECK_FLOATING(op, "key", key);
  ENGRAM_CHECK_DIM(op, "key", key, 4);
  ENGRAM_CHECK_NONEMPTY(op, "key", key);
  const int64_t B = key.size(0), T = key.size(1), G = key.size(2), D = key.size(3);
  check_same_floating_dtype(op, "key", key, "hidden", hidden);
  check_shape(op, "hidden", hidden, key.sizes(), "the shape of key [B, T, G, D]");
  check_same_floating_dtype(op, "key", key, "key_norm_weight", key_norm_weight);
  check_shape(op, "key_norm_weight", key_norm_weight, {G, D}, "[G, D]");
  check_same_floating_dtype(op, "key", key, "hidden_norm_weight", hidden_norm_weight);
  check_shape(op, "hidden_norm_weight", hidden_norm_weight, {G, D}, "[G, D]");
  if (eps.has_value()) check_eps(op, *eps);
  return {B, T, G, D};
}

std::array<int64_t, 5> check_gated_short_conv_args(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                                   const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                                   int64_t dilation, double eps) {
  ENGRAM_CHECK_FLOATING(op, "value", value);
  ENGRAM_CHECK_DIM(op, "value", value, 3);
  ENGRAM_CHECK_NONEMPTY(op, "value", value);
  const int64_t B = value.size(0), T = value.size(1), D = value.size(2);
  check_same_floating_dtype(op, "value", value, "gate", gate);
  ENGRAM_CHECK_DIM(op, "gate", gate, 3);
  TORCH_CHECK_VALUE(gate.size(0) == B && gate.size(1) == T && gate.size(2) >= 1, op, ": gate has shape ",
                    gate.sizes(), "; expected [B, T, G] with [B, T] = [", B, ", ", T, "] from value and G >= 1");
  const int64_t G = gate.size(2);
  check_same_floating_dtype(op, "value", value, "norm_weight", norm_weight);
  check_shape(op, "norm_weight", norm_weight, {G, D}, "[G, D]");
  check_same_floating_dtype(op, "value", value, "conv_weight", conv_weight);
  ENGRAM_CHECK_DIM(op, "conv_weight", conv_weight, 2);
  TORCH_CHECK_VALUE(conv_weight.size(0) == G * D && conv_weight.size(1) >= 1, op, ": conv_weight has shape ",
                    conv_weight.sizes(), "; expected [G*D, kernel_size] = [", G * D, ", kernel_size >= 1]");
  TORCH_CHECK_VALUE(dilation >= 1, op, ": dilation=", dilation, "; expected >= 1");
  check_eps(op, eps);
  return {B, T, G, D, conv_weight.size(1)};
}

void check_grad_like(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& like,
                     at::IntArrayRef expected) {
  check_same_floating_dtype(op, "the input", like, name, grad);
  check_shape(op, name, grad, expected, "the shape of the forward output");
}

namespace {
std::atomic<bool> cuda_sync_checks_enabled{false};
}  // namespace

void set_cuda_sync_checks(bool enabled) { cuda_sync_checks_enabled.store(enabled); }

bool cuda_sync_checks() { return cuda_sync_checks_enabled.load(); }

#if !defined(ENGRAM_WITH_CUDA)
std::pair<int, std::string> take_cuda_error() { return {0, std::string()}; }
#endif

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
  // Context gate of spec §5 for G branches: key, hidden [B, T, G, D] (last dim
  // contiguous, other strides free), norm weights [G, D] -> gate [B, T, G].
  // eps=None: the dtype's machine epsilon, as nn.RMSNorm(D).
  m.def(
      "context_gate(Tensor key, Tensor hidden, Tensor key_norm_weight, Tensor hidden_norm_weight, "
      "float? eps=None) -> Tensor");
  // -> (grad_key, grad_hidden, grad_key_norm_weight, grad_hidden_norm_weight)
  m.def(
      "context_gate_backward(Tensor grad_gate, Tensor key, Tensor hidden, Tensor key_norm_weight, "
      "Tensor hidden_norm_weight, float? eps=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gated short-convolution block of spec §5-6: value [B, T, D] (shared by the
  // branches), gate [B, T, G] -> out [B, T, G, D] with x = gate * value,
  // out = x + SiLU(causal depthwise conv over T of RMSNorm_g(x)), channel
  // g*D + c; conv_weight [G*D, kernel_size], tap i reads t - (kernel_size-1-i)*dilation.
  m.def(
      "gated_short_conv(Tensor value, Tensor gate, Tensor norm_weight, Tensor conv_weight, int dilation, "
      "float eps) -> Tensor");
  // -> (grad_value, grad_gate, grad_norm_weight, grad_conv_weight)
  m.def(
      "gated_short_conv_backward(Tensor grad_out, Tensor value, Tensor gate, Tensor norm_weight, "
      "Tensor conv_weight, int dilation, float eps) -> (Tensor, Tensor, Tensor, Tensor)");

  // --- engram.optim: row-wise sparse table optimizers (csrc/cpu_optim.cpp,
  // csrc/cuda/optim.cu, kernels/optim_math.h) ---------------------------------
  // Touched rows of a table and their summed gradients: grad [..., K, Dh],
  // ids [..., K] (+ offsets [K]) -> (rows [U] int64, strictly increasing;
  // row_grads [U, Dh], each row's entries summed in entry order in opmath).
  m.def("dedup_row_grads(Tensor grad, Tensor ids, Tensor? offsets, SymInt num_rows) -> (Tensor, Tensor)");
  // The same, sized by the entries instead of the distinct rows, so that CUDA
  // needs no host sync (a training step can then be captured in a CUDA graph):
  // rows [E] (E = ids.numel()), the U distinct rows then E - U padding rows of
  // -1; row_grads [E, Dh], zero in the padding. The first U rows equal
  // dedup_row_grads' output (bit for bit on the CPU). On CUDA a row outside
  // the table is reported like every deferred CUDA error and all rows are -1.
  // The rowwise_*_update ops skip a -1 suffix on the CPU.
  m.def("dedup_row_grads_padded(Tensor grad, Tensor ids, Tensor? offsets, SymInt num_rows) -> (Tensor, Tensor)");
  // In-place updates of the rows `rows` (strictly increasing, as
  // dedup_row_grads returns them) of weight [R, Dh] and its state, given their
  // summed gradients row_grads [U, Dh]; rules in kernels/optim_math.h.
  m.def(
      "rowwise_sgd_update(Tensor(a!) weight, Tensor rows, Tensor row_grads, float lr, float weight_decay=0.0) "
      "-> ()");
  // sum_sq [R]: one accumulator per row (FBGEMM's row-wise Adagrad).
  m.def(
      "rowwise_adagrad_update(Tensor(a!) weight, Tensor(b!) sum_sq, Tensor rows, Tensor row_grads, float lr, "
      "float eps, float weight_decay=0.0) -> ()");
  // exp_avg, exp_avg_sq [R, Dh]; step = this update's number (1, 2, ...) for
  // the bias corrections; decoupled_weight_decay: AdamW.
  m.def(
      "rowwise_adam_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, "
      "Tensor row_grads, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, int step) -> ()");
  // --- end engram.optim ---------------------------------------------------------

  // --- engram.Prefetcher (csrc/cpu_gather_rows.cpp, csrc/cuda/ops.cu) ---------------
  // table [R, Dh] (on the CPU: pinned for the CUDA kernel, which reads it over
  // UVA) and rows [...] int64 -> table[rows] [..., Dh] on the rows' device.
  // check=False: the CUDA kernel neither reports nor reads an out-of-range
  // row (zeros); check=True reports it like every CUDA id error.
  m.def("gather_rows(Tensor table, Tensor rows, bool check=True) -> Tensor");
}
