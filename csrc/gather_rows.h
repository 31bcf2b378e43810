// engram::gather_rows: the rows of a (host-resident) table, delivered on the
// device of the row ids. Argument checks shared by its CPU kernel
// (csrc/cpu_gather_rows.cpp) and its CUDA zero-copy kernel (csrc/cuda/ops.cu).
#pragma once

#include <ATen/ATen.h>

#include "csrc/checks.h"

namespace engram {

inline void check_gather_rows_args(const at::Tensor& table, const at::Tensor& rows) {
  constexpr const char* op = "gather_rows";
  ENGRAM_CHECK_DIM(op, "table", table, 2);
  TORCH_CHECK_VALUE(table.is_contiguous(), op, ": table must be contiguous (row-major [R, Dh]), got strides ",
                    table.strides());
  ENGRAM_CHECK_DTYPE(op, "rows", rows, at::kLong);
}

// out [*rows.shape, Dh] on `device`, with the table's dtype.
inline at::Tensor new_gather_rows_output(const at::Tensor& table, const at::Tensor& rows, at::Device device) {
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.push_back(table.size(1));
  return at::empty(shape, table.options().device(device));
}

}  // namespace engram
