// Argument checks of the row-wise optimizer ops (engram.optim), shared by the
// CPU kernels (defined in cpu_optim.cpp) and the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace engram {

// dedup_row_grads: ids [..., K] (+ offsets [K]), grad = ids.shape + [Dh],
// num_rows >= 1; returns K.
int64_t check_dedup_args(const at::Tensor& grad, const at::Tensor& ids, const std::optional<at::Tensor>& offsets,
                         int64_t num_rows);

// A state tensor of an update op and the shape it must have.
struct StateArg {
  const char* name;
  const at::Tensor& tensor;
  bool per_row;  // [R] (row-wise Adagrad) instead of [R, Dh]
};

// Update ops: weight [R, Dh] float32/float64, contiguous (updated in place);
// each state on weight's device and dtype, contiguous, shaped [R, Dh] or [R];
// rows int64 [U], row_grads [U, Dh] in weight's dtype; nothing written
// overlaps anything else. Returns U. Row values are checked by the kernels.
int64_t check_update_args(const char* op, const at::Tensor& weight, std::initializer_list<StateArg> states,
                          const at::Tensor& rows, const at::Tensor& row_grads);

// Hyperparameter checks: finite and in range, named in the message.
void check_nonnegative(const char* op, const char* name, double value);
void check_positive(const char* op, const char* name, double value);
void check_beta(const char* op, const char* name, double value);
void check_step(const char* op, int64_t step);

// After a kernel saw a row outside [0, num_rows) or rows not strictly
// increasing: reports the first such position.
[[noreturn]] void report_bad_update_rows(const char* op, const at::Tensor& rows, int64_t num_rows);

}  // namespace engram
