// The argument checks of every engram op (declared in csrc/checks.h), shared
// by the CPU and CUDA kernels, and the Meta kernels, which are those checks
// and the output shapes: torch.compile and torch.export trace with them
// (fake tensors), and meta tensors run them. So a wrong argument reads the
// same on every device and in a trace.
//
// Sizes are read as SymInts: under torch.compile(dynamic=True) or
// torch.export they are symbolic, and each comparison becomes a guard, as in
// a Python fake kernel. On real tensors a SymInt is a plain int64.
#include "csrc/checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>

#include "kernels/hash.h"  // kMaxNgramSize

#define ENGRAM_CHECK_DTYPE(op, name, t, dtype)                                                    \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), op, ": ", name, " must be ", dtype, ", got ", \
                   (t).scalar_type())

#define ENGRAM_CHECK_DIM(op, name, t, ndim)                                                     \
  TORCH_CHECK_VALUE((t).dim() == (ndim), op, ": ", name, " must have ", ndim, " dims, got shape ", \
                    (t).sym_sizes())

#define ENGRAM_CHECK_NONEMPTY(op, name, t)                                                          \
  TORCH_CHECK_VALUE((t).sym_numel() > 0, op, ": ", name, " is empty (shape ", (t).sym_sizes(),    \
                    "); expected at least one element")

#define ENGRAM_CHECK_SAME_DEVICE(op, name_a, a, name_b, b)                                       \
  TORCH_CHECK((a).device() == (b).device(), op, ": ", name_b, " is on ", (b).device(), " but ", \
              name_a, " is on ", (a).device(), "; expected both on the same device")

namespace engram {

using c10::SymInt;
using c10::SymIntArrayRef;

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

void check_shape(const char* op, const char* name, const at::Tensor& t, SymIntArrayRef expected,
                 const char* expected_text) {
  TORCH_CHECK_VALUE(t.sym_sizes() == expected, op, ": ", name, " has shape ", t.sym_sizes(), "; expected ",
                    expected_text, " = ", expected);
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

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps=", eps, "; expected a finite value >= 0");
}

// The sizes the kernels need, from tensors that passed the checks (real
// tensors: plain ints).
template <size_t N>
std::array<int64_t, N> as_ints(const std::array<SymInt, N>& sizes) {
  std::array<int64_t, N> out{};
  for (size_t i = 0; i < N; ++i) out[i] = sizes[i].expect_int();
  return out;
}

// --- hash and embedding ops --------------------------------------------------

struct NgramHashSizes {
  HashFamily family;
  SymInt num_layers, max_ngram_size, num_heads;  // L, N, K
};

NgramHashSizes ngram_hash_sizes(const at::Tensor& ids, const at::Tensor& lookup, const at::Tensor& keys,
                                const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets,
                                int64_t pad_id, std::string_view family) {
  constexpr const char* op = "ngram_hash";
  const HashFamily hash_family = parse_hash_family(family);
  ENGRAM_CHECK_DTYPE(op, "input_ids", ids, at::kLong);
  ENGRAM_CHECK_DIM(op, "input_ids", ids, 2);
  TORCH_CHECK_VALUE(ids.sym_size(0) > 0 && ids.sym_size(1) > 0, op, ": input_ids has shape ", ids.sym_sizes(),
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
  const SymInt L = keys.sym_size(0);
  TORCH_CHECK_VALUE(L >= 1, op, ": keys has shape ", keys.sym_sizes(), "; expected at least one layer");
  // deepseek keys are the N multipliers, xxh64 keys the N-1 per-order seeds.
  const SymInt N = hash_family == HashFamily::DeepSeek ? keys.sym_size(1) : keys.sym_size(1) + 1;
  TORCH_CHECK_VALUE(N >= 2 && N <= kMaxNgramSize, op, ": keys has shape ", keys.sym_sizes(),
                    ", i.e. max n-gram order ", N, " for family '", std::string(family),
                    "'; expected an order in [2, ", kMaxNgramSize, "]");
  TORCH_CHECK_VALUE(head_sizes.sym_size(0) == L, op, ": head_sizes has shape ", head_sizes.sym_sizes(),
                    "; expected ", L, " rows, one per layer of keys");
  const SymInt K = head_sizes.sym_size(1);
  TORCH_CHECK_VALUE(K > 0 && K % (N - 1) == 0, op, ": head_sizes has shape ", head_sizes.sym_sizes(),
                    "; expected K = (N-1)*H columns with N-1 = ", N - 1);
  if (offsets.has_value()) {
    ENGRAM_CHECK_DTYPE(op, "offsets", *offsets, at::kLong);
    ENGRAM_CHECK_SAME_DEVICE(op, "input_ids", ids, "offsets", *offsets);
    TORCH_CHECK_VALUE(offsets->sym_sizes() == head_sizes.sym_sizes(), op, ": offsets has shape ",
                      offsets->sym_sizes(), "; expected the shape of head_sizes ", head_sizes.sym_sizes());
  }
  TORCH_CHECK_INDEX(pad_id >= 0 && pad_id < lookup.sym_size(0), op, ": pad_id=", pad_id,
                    " is outside the tokenizer vocabulary [0, ", lookup.sym_size(0), ")");
  return {hash_family, L, N, K};
}

// Returns K.
SymInt embedding_sizes(const char* op, const at::Tensor& rows_like, const char* rows_name, const at::Tensor& ids,
                       const std::optional<at::Tensor>& offsets) {
  check_floating(op, rows_name, rows_like);
  // Rows of no values would make every id check vacuous (the kernels visit
  // entries * Dh elements).
  TORCH_CHECK_VALUE(rows_like.dim() >= 1 && rows_like.sym_size(-1) >= 1, op, ": ", rows_name, " has shape ",
                    rows_like.sym_sizes(), "; expected rows of Dh >= 1 values in its last dim");
  ENGRAM_CHECK_DTYPE(op, "ids", ids, at::kLong);
  TORCH_CHECK_VALUE(ids.dim() >= 1, op, ": ids must be [..., K], got a 0-dim tensor");
  ENGRAM_CHECK_NONEMPTY(op, "ids", ids);
  ENGRAM_CHECK_SAME_DEVICE(op, rows_name, rows_like, "ids", ids);
  const SymInt num_heads = ids.sym_size(-1);
  if (offsets.has_value()) {
    ENGRAM_CHECK_DTYPE(op, "offsets", *offsets, at::kLong);
    ENGRAM_CHECK_DIM(op, "offsets", *offsets, 1);
    ENGRAM_CHECK_SAME_DEVICE(op, "ids", ids, "offsets", *offsets);
    TORCH_CHECK_VALUE(offsets->sym_size(0) == num_heads, op, ": offsets has ", offsets->sym_size(0),
                      " entries but ids has K=", num_heads, " heads in its last dim ", ids.sym_sizes());
  }
  return num_heads;
}

// grad [..., K, Dh] of ids [..., K] for a table of num_rows >= 1 rows.
SymInt row_grads_sizes(const char* op, const at::Tensor& grad, const at::Tensor& ids,
                       const std::optional<at::Tensor>& offsets, const SymInt& num_rows) {
  const SymInt num_heads = embedding_sizes(op, grad, "grad", ids, offsets);
  TORCH_CHECK_VALUE(grad.dim() == ids.dim() + 1 && grad.sym_sizes().slice(0, ids.dim()) == ids.sym_sizes(), op,
                    ": grad has shape ", grad.sym_sizes(), "; expected ids.shape + [Dh] with ids.shape ",
                    ids.sym_sizes());
  TORCH_CHECK_VALUE(num_rows >= 1, op, ": num_rows=", num_rows, "; expected >= 1");
  return num_heads;
}

SymInt embedding_backward_sizes(const at::Tensor& grad, const at::Tensor& ids, const std::optional<at::Tensor>& offsets,
                                const SymInt& num_rows) {
  constexpr const char* op = "multihead_embedding_backward";
  const SymInt num_heads = row_grads_sizes(op, grad, ids, offsets, num_rows);
  // The kernels size the [num_rows, Dh] gradient in bytes: a product that
  // wraps would allocate a small block and write far past it. (Symbolic
  // sizes, in a trace, are checked when the kernel runs.)
  const std::optional<int64_t> rows = num_rows.maybe_as_int(), dh = grad.sym_size(-1).maybe_as_int();
  int64_t bytes = 0;
  TORCH_CHECK_VALUE(!rows || !dh ||
                        (!c10::mul_overflows(*rows, *dh, &bytes) &&
                         !c10::mul_overflows(bytes, static_cast<int64_t>(grad.element_size()), &bytes)),
                    op, ": num_rows=", num_rows, " with rows of Dh=", grad.sym_size(-1), " ", grad.scalar_type(),
                    " values needs more than 2^63 bytes");
  return num_heads;
}

// --- layer ops (spec §5-6) -----------------------------------------------------

std::array<SymInt, 4> context_gate_sizes(const char* op, const at::Tensor& key, const at::Tensor& hidden,
                                         const at::Tensor& key_norm_weight, const at::Tensor& hidden_norm_weight,
                                         std::optional<double> eps) {
  check_floating(op, "key", key);
  ENGRAM_CHECK_DIM(op, "key", key, 4);
  ENGRAM_CHECK_NONEMPTY(op, "key", key);
  const SymInt B = key.sym_size(0), T = key.sym_size(1), G = key.sym_size(2), D = key.sym_size(3);
  check_same_floating_dtype(op, "key", key, "hidden", hidden);
  check_shape(op, "hidden", hidden, key.sym_sizes(), "the shape of key [B, T, G, D]");
  check_same_floating_dtype(op, "key", key, "key_norm_weight", key_norm_weight);
  check_shape(op, "key_norm_weight", key_norm_weight, {G, D}, "[G, D]");
  check_same_floating_dtype(op, "key", key, "hidden_norm_weight", hidden_norm_weight);
  check_shape(op, "hidden_norm_weight", hidden_norm_weight, {G, D}, "[G, D]");
  if (eps.has_value()) check_eps(op, *eps);
  return {B, T, G, D};
}

std::array<SymInt, 5> gated_short_conv_sizes(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                             const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                             int64_t dilation, double eps) {
  check_floating(op, "value", value);
  ENGRAM_CHECK_DIM(op, "value", value, 3);
  ENGRAM_CHECK_NONEMPTY(op, "value", value);
  const SymInt B = value.sym_size(0), T = value.sym_size(1), D = value.sym_size(2);
  check_same_floating_dtype(op, "value", value, "gate", gate);
  ENGRAM_CHECK_DIM(op, "gate", gate, 3);
  TORCH_CHECK_VALUE(gate.sym_size(0) == B && gate.sym_size(1) == T && gate.sym_size(2) >= 1, op,
                    ": gate has shape ", gate.sym_sizes(), "; expected [B, T, G] with [B, T] = [", B, ", ", T,
                    "] from value and G >= 1");
  const SymInt G = gate.sym_size(2);
  check_same_floating_dtype(op, "value", value, "norm_weight", norm_weight);
  check_shape(op, "norm_weight", norm_weight, {G, D}, "[G, D]");
  check_same_floating_dtype(op, "value", value, "conv_weight", conv_weight);
  ENGRAM_CHECK_DIM(op, "conv_weight", conv_weight, 2);
  TORCH_CHECK_VALUE(conv_weight.sym_size(0) == G * D && conv_weight.sym_size(1) >= 1, op,
                    ": conv_weight has shape ", conv_weight.sym_sizes(), "; expected [G*D, kernel_size] = [",
                    G * D, ", kernel_size >= 1]");
  TORCH_CHECK_VALUE(dilation >= 1, op, ": dilation=", dilation, "; expected >= 1");
  check_eps(op, eps);
  return {B, T, G, D, conv_weight.sym_size(1)};
}

void check_grad_like_sizes(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& like,
                           SymIntArrayRef expected) {
  check_same_floating_dtype(op, "the input", like, name, grad);
  check_shape(op, name, grad, expected, "the shape of the forward output");
}

// --- row-wise update ops (engram.optim) ------------------------------------------

// A state tensor of an update op and the shape it must have.
struct StateArg {
  const char* name;
  const at::Tensor& tensor;
  bool per_row;  // [R] (row-wise Adagrad) instead of [R, Dh]
};

// Meta tensors hold no memory to overlap (and fake ones may have symbolic
// sizes): only real tensors are compared.
void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b) {
  if (a.is_meta() || b.is_meta()) return;
  TORCH_CHECK_VALUE(at::get_overlap_status(a, b) == at::MemOverlapStatus::No, op, ": ", name_a, " and ", name_b,
                    " share memory; expected separate tensors (", name_a, " is written in place)");
}

SymInt check_update_args(const char* op, const at::Tensor& weight, std::initializer_list<StateArg> states,
                         const at::Tensor& rows, const at::Tensor& row_grads, double lr) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
                   ": weight must be Float or Double, got ", weight.scalar_type());
  ENGRAM_CHECK_DIM(op, "weight", weight, 2);
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight (shape ", weight.sym_sizes(), ", strides ",
                    weight.sym_strides(), ") must be contiguous: it is updated in place");
  const SymInt R = weight.sym_size(0), Dh = weight.sym_size(1);
  for (const StateArg& s : states) {
    ENGRAM_CHECK_SAME_DEVICE(op, "weight", weight, s.name, s.tensor);
    TORCH_CHECK_TYPE(s.tensor.scalar_type() == weight.scalar_type(), op, ": ", s.name, " is ",
                     s.tensor.scalar_type(), " but weight is ", weight.scalar_type(), "; expected one dtype");
    if (s.per_row) {
      TORCH_CHECK_VALUE(s.tensor.dim() == 1 && s.tensor.sym_size(0) == R, op, ": ", s.name, " has shape ",
                        s.tensor.sym_sizes(), "; expected [R] = [", R, "], one value per row of weight");
    } else {
      TORCH_CHECK_VALUE(s.tensor.sym_sizes() == weight.sym_sizes(), op, ": ", s.name, " has shape ",
                        s.tensor.sym_sizes(), "; expected the shape of weight ", weight.sym_sizes());
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
  const SymInt U = rows.sym_size(0);
  ENGRAM_CHECK_SAME_DEVICE(op, "weight", weight, "row_grads", row_grads);
  TORCH_CHECK_TYPE(row_grads.scalar_type() == weight.scalar_type(), op, ": row_grads is ", row_grads.scalar_type(),
                   " but weight is ", weight.scalar_type(), "; expected one dtype");
  TORCH_CHECK_VALUE(row_grads.dim() == 2 && row_grads.sym_size(0) == U && row_grads.sym_size(1) == Dh, op,
                    ": row_grads has shape ", row_grads.sym_sizes(), "; expected [U, Dh] = [", U, ", ", Dh,
                    "] (U = rows.numel(), Dh = weight.size(1))");
  check_no_overlap(op, "weight", weight, "row_grads", row_grads);
  for (const StateArg& s : states) check_no_overlap(op, s.name, s.tensor, "row_grads", row_grads);
  check_nonnegative(op, "lr", lr);  // every rule has one
  return U;
}

SymInt sgd_update_sizes(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& row_grads, double lr,
                        double weight_decay) {
  constexpr const char* op = "rowwise_sgd_update";
  SymInt U = check_update_args(op, weight, {}, rows, row_grads, lr);
  check_nonnegative(op, "weight_decay", weight_decay);
  return U;
}

SymInt adagrad_update_sizes(const at::Tensor& weight, const at::Tensor& sum_sq, const at::Tensor& rows,
                            const at::Tensor& row_grads, double lr, double eps, double weight_decay) {
  constexpr const char* op = "rowwise_adagrad_update";
  SymInt U = check_update_args(op, weight, {{"sum_sq", sum_sq, true}}, rows, row_grads, lr);
  check_positive(op, "eps", eps);
  check_nonnegative(op, "weight_decay", weight_decay);
  return U;
}

SymInt adam_update_sizes(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& rows, const at::Tensor& row_grads, double lr, double beta1, double beta2,
                         double eps, double weight_decay, int64_t step,
                         const std::optional<at::Tensor>& step_count) {
  constexpr const char* op = "rowwise_adam_update";
  SymInt U = check_update_args(op, weight, {{"exp_avg", exp_avg, false}, {"exp_avg_sq", exp_avg_sq, false}}, rows,
                               row_grads, lr);
  check_beta(op, "beta1", beta1);
  check_beta(op, "beta2", beta2);
  check_positive(op, "eps", eps);
  check_nonnegative(op, "weight_decay", weight_decay);
  if (step_count.has_value()) {
    // Its value is read by the kernel (on CUDA, on the device: no host sync).
    const at::Tensor& t = *step_count;
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 0, op, ": step_count is a ", t.scalar_type(),
                      " tensor of shape ", t.sizes(), "; expected a 0-dim int64 tensor (the number of this update)");
    TORCH_CHECK_VALUE(t.device() == weight.device(), op, ": step_count is on ", t.device(), " but weight is on ",
                      weight.device(), "; expected the same device");
    TORCH_CHECK_VALUE(step == 0, op, ": step=", step, " with step_count given; expected step=0 (the count is read "
                      "from step_count)");
  } else {
    TORCH_CHECK_VALUE(step >= 1, adam_step_message(op, "step=", step));
  }
  return U;
}

}  // namespace

// --- the checks the kernels call ---------------------------------------------------

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
  const NgramHashSizes s = ngram_hash_sizes(ids, lookup, keys, head_sizes, offsets, pad_id, family);
  const int64_t N = s.max_ngram_size.expect_int(), K = s.num_heads.expect_int();
  return {s.family, s.num_layers.expect_int(), N, K / (N - 1), K};
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
  return embedding_sizes(op, rows_like, rows_name, ids, offsets).expect_int();
}

namespace {
SymInt multihead_embedding_sizes(const at::Tensor& weight, const at::Tensor& ids,
                                 const std::optional<at::Tensor>& offsets) {
  constexpr const char* op = "multihead_embedding";
  SymInt num_heads = embedding_sizes(op, weight, "weight", ids, offsets);
  ENGRAM_CHECK_DIM(op, "weight", weight, 2);
  return num_heads;
}
}  // namespace

int64_t check_multihead_embedding_args(const at::Tensor& weight, const at::Tensor& ids,
                                       const std::optional<at::Tensor>& offsets) {
  return multihead_embedding_sizes(weight, ids, offsets).expect_int();
}

int64_t check_embedding_backward_args(const at::Tensor& grad, const at::Tensor& ids,
                                      const std::optional<at::Tensor>& offsets, int64_t num_rows) {
  return embedding_backward_sizes(grad, ids, offsets, num_rows).expect_int();
}

int64_t check_dedup_args(const at::Tensor& grad, const at::Tensor& ids, const std::optional<at::Tensor>& offsets,
                         int64_t num_rows) {
  return row_grads_sizes("dedup_row_grads", grad, ids, offsets, num_rows).expect_int();
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

std::array<int64_t, 4> check_context_gate_args(const char* op, const at::Tensor& key, const at::Tensor& hidden,
                                               const at::Tensor& key_norm_weight,
                                               const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  return as_ints(context_gate_sizes(op, key, hidden, key_norm_weight, hidden_norm_weight, eps));
}

std::array<int64_t, 5> check_gated_short_conv_args(const char* op, const at::Tensor& value, const at::Tensor& gate,
                                                   const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                                   int64_t dilation, double eps) {
  return as_ints(gated_short_conv_sizes(op, value, gate, norm_weight, conv_weight, dilation, eps));
}

void check_grad_like(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& like,
                     at::IntArrayRef expected) {
  check_grad_like_sizes(op, name, grad, like, c10::fromIntArrayRefSlow(expected));
}

int64_t check_sgd_update_args(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& row_grads,
                              double lr, double weight_decay) {
  return sgd_update_sizes(weight, rows, row_grads, lr, weight_decay).expect_int();
}

int64_t check_adagrad_update_args(const at::Tensor& weight, const at::Tensor& sum_sq, const at::Tensor& rows,
                                  const at::Tensor& row_grads, double lr, double eps, double weight_decay) {
  return adagrad_update_sizes(weight, sum_sq, rows, row_grads, lr, eps, weight_decay).expect_int();
}

int64_t check_adam_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                               const at::Tensor& rows, const at::Tensor& row_grads, double lr, double beta1,
                               double beta2, double eps, double weight_decay, int64_t step,
                               const std::optional<at::Tensor>& step_count) {
  return adam_update_sizes(weight, exp_avg, exp_avg_sq, rows, row_grads, lr, beta1, beta2, eps, weight_decay, step,
                           step_count)
      .expect_int();
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

// --- Meta kernels: the checks, then outputs of the kernels' shapes and dtypes --------
// (gather_rows and dedup_row_grads have Python fakes instead, in engram/ops.py
// and engram/optim.py: one returns a tensor on another device than its
// table's, the other a size only the ids' values give.)

namespace {

using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor compress_ids_meta(const at::Tensor& input_ids, const at::Tensor& lookup) {
  check_compress_args(input_ids, lookup);
  return at::empty_symint(input_ids.sym_sizes(), input_ids.options());
}

at::Tensor ngram_hash_meta(const at::Tensor& input_ids, const at::Tensor& lookup, const at::Tensor& keys,
                           const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets, int64_t pad_id,
                           c10::string_view family) {
  const NgramHashSizes s = ngram_hash_sizes(input_ids, lookup, keys, head_sizes, offsets, pad_id,
                                            std::string_view(family.data(), family.size()));
  return at::empty_symint({s.num_layers, input_ids.sym_size(0), input_ids.sym_size(1), s.num_heads},
                          input_ids.options());
}

// [..., K] ids -> [..., K, Dh]
std::vector<SymInt> rows_shape(const at::Tensor& ids, const SymInt& dh) {
  std::vector<SymInt> shape(ids.sym_sizes().begin(), ids.sym_sizes().end());
  shape.push_back(dh);
  return shape;
}

at::Tensor multihead_embedding_meta(const at::Tensor& weight, const at::Tensor& ids,
                                    const std::optional<at::Tensor>& offsets, bool /*sparse*/) {
  multihead_embedding_sizes(weight, ids, offsets);
  return at::empty_symint(rows_shape(ids, weight.sym_size(1)), weight.options());
}

at::Tensor multihead_embedding_backward_meta(const at::Tensor& grad, const at::Tensor& ids,
                                             const std::optional<at::Tensor>& offsets, c10::SymInt num_rows) {
  embedding_backward_sizes(grad, ids, offsets, num_rows);
  return at::empty_symint({num_rows, grad.sym_size(-1)}, grad.options());
}

at::Tensor context_gate_meta(const at::Tensor& key, const at::Tensor& hidden, const at::Tensor& key_norm_weight,
                             const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  const auto s = context_gate_sizes("context_gate", key, hidden, key_norm_weight, hidden_norm_weight, eps);
  return at::empty_symint({s[0], s[1], s[2]}, key.options());
}

Tensors4 context_gate_backward_meta(const at::Tensor& grad_gate, const at::Tensor& key, const at::Tensor& hidden,
                                    const at::Tensor& key_norm_weight, const at::Tensor& hidden_norm_weight,
                                    std::optional<double> eps) {
  constexpr const char* op = "context_gate_backward";
  const auto s = context_gate_sizes(op, key, hidden, key_norm_weight, hidden_norm_weight, eps);
  check_grad_like_sizes(op, "grad_gate", grad_gate, key, {s[0], s[1], s[2]});
  return {at::empty_symint(key.sym_sizes(), key.options()), at::empty_symint(key.sym_sizes(), key.options()),
          at::empty_symint(key_norm_weight.sym_sizes(), key.options()),
          at::empty_symint(key_norm_weight.sym_sizes(), key.options())};
}

at::Tensor gated_short_conv_meta(const at::Tensor& value, const at::Tensor& gate, const at::Tensor& norm_weight,
                                 const at::Tensor& conv_weight, int64_t dilation, double eps) {
  const auto s = gated_short_conv_sizes("gated_short_conv", value, gate, norm_weight, conv_weight, dilation, eps);
  return at::empty_symint({s[0], s[1], s[2], s[3]}, value.options());
}

Tensors4 gated_short_conv_backward_meta(const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& gate,
                                        const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                        int64_t dilation, double eps) {
  constexpr const char* op = "gated_short_conv_backward";
  const auto s = gated_short_conv_sizes(op, value, gate, norm_weight, conv_weight, dilation, eps);
  check_grad_like_sizes(op, "grad_out", grad_out, value, {s[0], s[1], s[2], s[3]});
  return {at::empty_symint(value.sym_sizes(), value.options()), at::empty_symint(gate.sym_sizes(), value.options()),
          at::empty_symint(norm_weight.sym_sizes(), value.options()),
          at::empty_symint(conv_weight.sym_sizes(), value.options())};
}

// Sized by the entries E, known without the ids' values (the point of the op).
std::tuple<at::Tensor, at::Tensor> dedup_row_grads_padded_meta(const at::Tensor& grad, const at::Tensor& ids,
                                                               const std::optional<at::Tensor>& offsets,
                                                               c10::SymInt num_rows) {
  row_grads_sizes("dedup_row_grads", grad, ids, offsets, num_rows);
  const SymInt entries = ids.sym_numel();
  return {at::empty_symint({entries}, ids.options()), at::empty_symint({entries, grad.sym_size(-1)}, grad.options())};
}

void rowwise_sgd_update_meta(at::Tensor& weight, const at::Tensor& rows, const at::Tensor& row_grads, double lr,
                             double weight_decay) {
  sgd_update_sizes(weight, rows, row_grads, lr, weight_decay);
}

void rowwise_adagrad_update_meta(at::Tensor& weight, at::Tensor& sum_sq, const at::Tensor& rows,
                                 const at::Tensor& row_grads, double lr, double eps, double weight_decay) {
  adagrad_update_sizes(weight, sum_sq, rows, row_grads, lr, eps, weight_decay);
}

void rowwise_adam_update_meta(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& rows,
                              const at::Tensor& row_grads, double lr, double beta1, double beta2, double eps,
                              double weight_decay, bool /*decoupled_weight_decay*/, int64_t step,
                              const std::optional<at::Tensor>& step_count) {
  adam_update_sizes(weight, exp_avg, exp_avg_sq, rows, row_grads, lr, beta1, beta2, eps, weight_decay, step,
                    step_count);
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, Meta, m) {
  m.impl("compress_ids", &compress_ids_meta);
  m.impl("ngram_hash", &ngram_hash_meta);
  m.impl("multihead_embedding", &multihead_embedding_meta);
  m.impl("multihead_embedding_backward", &multihead_embedding_backward_meta);
  m.impl("context_gate", &context_gate_meta);
  m.impl("context_gate_backward", &context_gate_backward_meta);
  m.impl("gated_short_conv", &gated_short_conv_meta);
  m.impl("gated_short_conv_backward", &gated_short_conv_backward_meta);
  m.impl("dedup_row_grads_padded", &dedup_row_grads_padded_meta);
  m.impl("rowwise_sgd_update", &rowwise_sgd_update_meta);
  m.impl("rowwise_adagrad_update", &rowwise_adagrad_update_meta);
  m.impl("rowwise_adam_update", &rowwise_adam_update_meta);
}

}  // namespace engram
