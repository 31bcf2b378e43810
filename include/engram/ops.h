// Typed C++ entry points to the engram:: operators (csrc/library.cpp), called
// through the PyTorch dispatcher, as torch.ops.engram.* are from Python: the
// same kernels, the same argument checks, the same error messages.
//
// Header-only; the program links engram::ops (libengram_ops.so), whose static
// initialisers register the operators. A call before that library is loaded
// raises c10::Error "Could not find schema for engram::...".
#ifndef ENGRAM_OPS_H_
#define ENGRAM_OPS_H_

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>

namespace engram {
namespace ops {

namespace detail {
// The typed handle of one schema, looked up once per process.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
}
}  // namespace detail

// Token ids -> canonical ids (spec §1); negative ids pass through unchanged.
inline at::Tensor compress_ids(const at::Tensor& input_ids, const at::Tensor& lookup) {
  static const auto op = detail::find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("engram::compress_ids");
  return op.call(input_ids, lookup);
}

// [B, T] token ids -> [L, B, T, K] hash ids of L layers in one pass. keys: [L, N]
// multipliers ("deepseek") or [L, N-1] per-order seeds ("xxh64"); head_sizes,
// offsets: [L, K].
inline at::Tensor ngram_hash(const at::Tensor& input_ids, const at::Tensor& lookup, const at::Tensor& keys,
                             const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets,
                             int64_t pad_id, std::string_view family) {
  static const auto op =
      detail::find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, int64_t, c10::string_view)>("engram::ngram_hash");
  return op.call(input_ids, lookup, keys, head_sizes, offsets, pad_id, c10::string_view(family.data(), family.size()));
}

// weight [R, Dh], ids [..., K] (+ offsets [K]) -> [..., K, Dh].
inline at::Tensor multihead_embedding(const at::Tensor& weight, const at::Tensor& ids,
                                      const std::optional<at::Tensor>& offsets, bool sparse = false) {
  static const auto op =
      detail::find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool)>(
          "engram::multihead_embedding");
  return op.call(weight, ids, offsets, sparse);
}

// key, hidden [B, T, G, D], norm weights [G, D] -> gate [B, T, G] (spec §5).
// eps = nullopt: the dtype's machine epsilon, like nn.RMSNorm(D).
inline at::Tensor context_gate(const at::Tensor& key, const at::Tensor& hidden, const at::Tensor& key_norm_weight,
                               const at::Tensor& hidden_norm_weight, std::optional<double> eps = std::nullopt) {
  static const auto op = detail::find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, std::optional<double>)>("engram::context_gate");
  return op.call(key, hidden, key_norm_weight, hidden_norm_weight, eps);
}

// value [B, T, D], gate [B, T, G] -> [B, T, G, D] (spec §5-6); norm_weight
// [G, D], conv_weight [G*D, kernel_size].
inline at::Tensor gated_short_conv(const at::Tensor& value, const at::Tensor& gate, const at::Tensor& norm_weight,
                                   const at::Tensor& conv_weight, int64_t dilation, double eps = 1e-5) {
  static const auto op = detail::find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, double)>("engram::gated_short_conv");
  return op.call(value, gate, norm_weight, conv_weight, dilation, eps);
}

}  // namespace ops
}  // namespace engram

#endif  // ENGRAM_OPS_H_
