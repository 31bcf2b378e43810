// Input checks shared by every op: each names the op, the argument, the value
// seen and what was expected.
#pragma once

#include <ATen/ATen.h>

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

// The floating dtypes every kernel dispatches on (not the float8 types).
inline bool engram_is_compute_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

#define ENGRAM_CHECK_FLOATING(op, name, t)                                                          \
  TORCH_CHECK_TYPE(engram_is_compute_dtype((t).scalar_type()), op, ": ", name,                    \
                   " must be a floating-point tensor, got ", (t).scalar_type(),                    \
                   "; expected Half, BFloat16, Float or Double")
