// Tensor-side helpers of the layer ops (spec §5-6) shared by their CPU
// kernels (csrc/cpu_layer_ops.cpp) and CUDA launchers (csrc/cuda/layer_ops.cu).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>
#include <optional>

#include "kernels/layer_math.h"  // Rows4

namespace engram {

// The layer feeds views of one fused projection (last dim contiguous, rows
// strided); reading them in place saves a copy. Anything else is copied.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// The dtype of the accumulators (float for half, bfloat16 and float).
template <typename scalar_t>
at::ScalarType acc_dtype() {
  return c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
}

template <typename scalar_t>
at::opmath_type<scalar_t> resolve_eps(std::optional<double> eps) {
  // nn.RMSNorm(eps=None) uses torch.finfo(input.dtype).eps.
  return static_cast<at::opmath_type<scalar_t>>(
      eps.has_value() ? *eps : static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
}

// The [B, T, G, D] rows of t (rows_contiguous: a contiguous last dim).
template <typename scalar_t>
Rows4<scalar_t> rows4(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.size(1), t.size(2)};
}

}  // namespace engram
