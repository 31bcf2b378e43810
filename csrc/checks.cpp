// The argument checks of every engram op (declared in csrc/checks.h), shared
// by the CPU and CUDA kernels so that a wrong argument reads the same on
// every device.
#include "csrc/checks.h"

#include <c10/util/safe_numerics.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <utility>

#include <ATen/MemoryOverlap.h>

#include "kernels/hash.h"  // kMaxNgramSize

#define ENGRAM_CHECK_DTYPE(op, name, t, dtype)                                                    \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), op, ": ", name, " must be ", dtype, ", got ", \
                   (t).scalar_type())

#define ENGRAM_CHECK_DIM(op, name, t, ndim)                                                     \
  TORCH_CHECK_VALUE((t).dim() == (ndim), op, ": ", name, " must have ", ndim, " dims, got shape ", \
                    (t).sizes())

#define ENGRAM_CHECK_NONEMPTY(op, name, t)                                                        \
  TORCH_CHECK_VALUE((t).numel() > 0, op, ": ", name, " is empty (shape ", (t).sizes(),           \
                    "); expected at least one element")

#define ENGRAM_CHECK_SAME_DEVICE(op, name_a, a, name_b, b)                                       \
  TORCH_CHECK((a).device() == (b).device(), op, ": ", name_b, " is on ", (b).device(), " but ", \
              name_a, " is on ", (a).device(), "; expected both on the same device")

namespace engram {

namespace {

// The floating dtypes every kernel dispatches on (not the float8 types).
bool is_compute_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_compute_dtype(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                   t.scalar_type(), "; expected Half, BFloat16, Float or Double");
}

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

// Hyperparameters: finite and in range, named in the message.
void check_nonnegative(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, op, ": ", name, "=", value, "; expected a finite value >= 0");
}

void check_positive(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0, op, ": ", name, "=", value, "; expected a finite value > 0");
}

void check_beta(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(value >= 0 && value < 1, op, ": ", name, "=", value, "; expected a value in [0, 1)");
}

}  // namespace

// --- hash and embedding ops --------------------------------------------------

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

void check_head_table(const char* op, const int64_t* sizes, const int64_t* offsets, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(sizes[i] >= 1, head_size_message(op, sizes[i], i));
    // The largest id of head i is offsets[i] + sizes[i] - 1.
    TORCH_CHECK_VALUE(offsets == nullptr || offsets[i] <= std::numeric_limits<int64_t>::max() - (sizes[i] - 1),
                      head_offset_overflow_message(op, offsets == nullptr ? 0 : offsets[i], i, sizes[i]));
  }
}

int64_t check_embedding_args(const char* op, const at::Tensor& rows_like, const char* rows_name,
                             const at::Tensor& ids, const std::optional<at::Tensor>& offsets) {
  check_floating(op, rows_name, rows_like);
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

int64_t check_multihead_embedding_args(const at::Tensor& weight, const at::Tensor& ids,
                                       const std::optional<at::Tensor>& offsets) {
  constexpr const char* op = "multihead_embedding";
  const int64_t num_heads = check_embedding_args(op, weight, "weight", ids, offsets);
  ENGRAM_CHECK_DIM(op, "weight", weight, 2);
  return num_heads;
}

namespace {

// grad [..., K, Dh] of ids [..., K] for a table of num_rows >= 1 rows.
int64_t check_row_grads(const char* op, const at::Tensor& grad, const at::Tensor& ids,
                        const std::optional<at::Tensor>& offsets, int64_t num_rows) {
  const int64_t num_heads = check_embedding_args(op, grad, "grad", ids, offsets);
  TORCH_CHECK_VALUE(grad.dim() == ids.dim() + 1 && grad.sizes().slice(0, ids.dim()) == ids.sizes(), op,
                    ": grad has shape ", grad.sizes(), "; expected ids.shape + [Dh] with ids.shape ", ids.sizes());
  TORCH_CHECK_VALUE(num_rows >= 1, op, ": num_rows=", num_rows, "; expected >= 1");
  return num_heads;
}

}  // namespace

int64_t check_embedding_backward_args(const at::Tensor& grad, const at::Tensor& ids,
                                      const std::optional<at::Tensor>& offsets, int64_t num_rows) {
  constexpr const char* op = "multihead_embedding_backward";
  const int64_t num_heads = check_row_grads(op, grad, ids, offsets, num_rows);
  // The kernels size the [num_rows, Dh] gradient in bytes: a product that
  // wraps would allocate a small block and write far past it.
  int64_t bytes = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(num_rows, grad.size(-1), &bytes) &&
                        !c10::mul_overflows(bytes, static_cast<int64_t>(grad.element_size()), &bytes),
                    op, ": num_rows=", num_rows, " with rows of Dh=", grad.size(-1), " ", grad.scalar_type(),
                    " values needs more than 2^63 bytes");
  return num_heads;
}

int64_t check_dedup_args(const at::Tensor& grad, const at::Tensor& ids, const std::optional<at::Tensor>& offsets,
                         int64_t num_rows) {
  return check_row_grads("dedup_row_grads", grad, ids, offsets, num_rows);
}

void report_id_out_of_range(const IdRange& range, const at::Tensor& ids, const std::optional<at::Tensor>& offsets,
                            int64_t limit) {
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
  const at::Tensor outside = range.negatives_allowed ? rows >= limit : (rows < 0) | (rows >= limit);
  const at::Tensor bad = (overflow.reshape({-1}) | outside).nonzero();
  TORCH_CHECK(bad.numel() > 0, range.op, ": internal error: a kernel reported an out-of-range id but none was found");
  const int64_t index = bad[0].item<int64_t>();
  if (overflow.reshape({-1})[index].item<bool>()) {
    TORCH_CHECK_INDEX(false, id_offset_overflow_message(range, cpu_ids.reshape({-1})[index].item<int64_t>(), index,
                                                        index % K, cpu_offsets.reshape({-1})[index].item<int64_t>(),
                                                        limit));
  }
  TORCH_CHECK_INDEX(false, id_out_of_range_message(range, rows[index].item<int64_t>(), index, limit,
                                                   offsets.has_value()));
}

std::vector<int64_t> check_gather_rows_args(const at::Tensor& table, const at::Tensor& rows) {
  constexpr const char* op = "gather_rows";
  ENGRAM_CHECK_DIM(op, "table", table, 2);
  TORCH_CHECK_VALUE(table.is_contiguous(), op, ": table must be contiguous (row-major [R, Dh]), got strides ",
                    table.strides());
  ENGRAM_CHECK_DTYPE(op, "rows", rows, at::kLong);
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.push_back(table.size(1));
  return shape;
}

// --- layer ops (spec §5-6) -----------------------------------------------------

namespace {

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps=", eps, "; expected a finite value >= 0");
}

}  // namespace

std::array<int64_t, 4> check_context_gate_args(const char* op, const at::Tensor& key, const at::Tensor& hidden,
                                               const at::Tensor& key_norm_weight,
                                               const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  check_floating(op, "key", key);
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
  check_floating(op, "value", value);
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

// --- row-wise update ops (engram.optim) ------------------------------------------

namespace {

// A state tensor of an update op and the shape it must have.
struct StateArg {
  const char* name;
  const at::Tensor& tensor;
  bool per_row;  // [R] (row-wise Adagrad) instead of [R, Dh]
};

void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b) {
  TORCH_CHECK_VALUE(at::get_overlap_status(a, b) == at::MemOverlapStatus::No, op, ": ", name_a, " and ", name_b,
                    " share memory; expected separate tensors (", name_a, " is written in place)");
}

int64_t check_update_args(const char* op, const at::Tensor& weight, std::initializer_list<StateArg> states,
                          const at::Tensor& rows, const at::Tensor& row_grads, double lr) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
                   ": weight must be Float or Double, got ", weight.scalar_type());
  ENGRAM_CHECK_DIM(op, "weight", weight, 2);
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight (shape ", weight.sizes(), ", strides ", weight.strides(),
                    ") must be contiguous: it is updated in place");
  const int64_t R = weight.size(0), Dh = weight.size(1);
  for (const StateArg& s : states) {
    ENGRAM_CHECK_SAME_DEVICE(op, "weight", weight, s.name, s.tensor);
    TORCH_CHECK_TYPE(s.tensor.scalar_type() == weight.scalar_type(), op, ": ", s.name, " is ",
                     s.tensor.scalar_type(), " but weight is ", weight.scalar_type(), "; expected one dtype");
    if (s.per_row) {
      TORCH_CHECK_VALUE(s.tensor.dim() == 1 && s.tensor.size(0) == R, op, ": ", s.name, " has shape ",
                        s.tensor.sizes(), "; expected [R] = [", R, "], one value per row of weight");
    } else {
      TORCH_CHECK_VALUE(s.tensor.sizes() == weight.sizes(), op, ": ", s.name, " has shape ", s.tensor.sizes(),
                        "; expected the shape of weight ", weight.sizes());
    }
    TORCH_CHECK_VALUE(s.tensor.is_contiguous(), op, ": ", s.name, " must be contiguous: it is updated in place");
    check_no_overlap(op, "weight", weight, s.name, s.tensor);
  }
  for (auto a = states.begin(); a != states.end(); ++a) {
    for (auto b = a + 1; b != states.end(); ++b) check_no_overlap(op, a->name, a->tensor, b->name, b->tensor);
  }
  ENGRAM_CHECK_SAME_DEVICE(op, "weight", weight, "rows", rows);
  ENGRAM_CHECK_DTYPE(op, "rows", rows, at::kLong);
  ENGRAM_CHECK_DIM(op, "rows", rows, 1);
  const int64_t U = rows.size(0);
  ENGRAM_CHECK_SAME_DEVICE(op, "weight", weight, "row_grads", row_grads);
  TORCH_CHECK_TYPE(row_grads.scalar_type() == weight.scalar_type(), op, ": row_grads is ", row_grads.scalar_type(),
                   " but weight is ", weight.scalar_type(), "; expected one dtype");
  TORCH_CHECK_VALUE(row_grads.dim() == 2 && row_grads.size(0) == U && row_grads.size(1) == Dh, op,
                    ": row_grads has shape ", row_grads.sizes(), "; expected [U, Dh] = [", U, ", ", Dh,
                    "] (U = rows.numel(), Dh = weight.size(1))");
  check_no_overlap(op, "weight", weight, "row_grads", row_grads);
  for (const StateArg& s : states) check_no_overlap(op, s.name, s.tensor, "row_grads", row_grads);
  check_nonnegative(op, "lr", lr);  // every rule has one
  return U;
}

}  // namespace

int64_t check_sgd_update_args(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& row_grads,
                              double lr, double weight_decay) {
  constexpr const char* op = "rowwise_sgd_update";
  const int64_t U = check_update_args(op, weight, {}, rows, row_grads, lr);
  check_nonnegative(op, "weight_decay", weight_decay);
  return U;
}

int64_t check_adagrad_update_args(const at::Tensor& weight, const at::Tensor& sum_sq, const at::Tensor& rows,
                                  const at::Tensor& row_grads, double lr, double eps, double weight_decay) {
  constexpr const char* op = "rowwise_adagrad_update";
  const int64_t U = check_update_args(op, weight, {{"sum_sq", sum_sq, true}}, rows, row_grads, lr);
  check_positive(op, "eps", eps);
  check_nonnegative(op, "weight_decay", weight_decay);
  return U;
}

int64_t check_adam_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                               const at::Tensor& rows, const at::Tensor& row_grads, double lr, double beta1,
                               double beta2, double eps, double weight_decay, int64_t step) {
  constexpr const char* op = "rowwise_adam_update";
  const int64_t U = check_update_args(op, weight, {{"exp_avg", exp_avg, false}, {"exp_avg_sq", exp_avg_sq, false}},
                                      rows, row_grads, lr);
  check_beta(op, "beta1", beta1);
  check_beta(op, "beta2", beta2);
  check_positive(op, "eps", eps);
  check_nonnegative(op, "weight_decay", weight_decay);
  TORCH_CHECK_VALUE(step >= 1, op, ": step=", step, "; expected >= 1 (the number of this update, counting from 1)");
  return U;
}

void report_bad_update_rows(const char* op, const at::Tensor& rows_in, int64_t num_rows) {
  const at::Tensor rows = rows_in.to(at::kCPU).contiguous();
  const int64_t* r = rows.const_data_ptr<int64_t>();
  for (int64_t u = 0; u < rows.numel(); ++u) {
    TORCH_CHECK_INDEX(r[u] >= 0 && r[u] < num_rows, id_out_of_range_message(update_rows_range(op), r[u], u, num_rows));
    TORCH_CHECK_VALUE(u == 0 || r[u - 1] < r[u], rows_unordered_message(op, u == 0 ? 0 : r[u - 1], r[u], u));
  }
  TORCH_CHECK(false, op, ": internal error: a kernel reported a bad row but none was found");
}

}  // namespace engram
