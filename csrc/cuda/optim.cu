// CUDA launchers of the row-wise optimizer ops (engram.optim): checks, guard,
// stream, allocation, the sort and scans (ATen ops); the kernels are in
// kernels/optim_cuda.cuh, the math in kernels/optim_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "csrc/checks.h"
#include "csrc/cuda/device_errors.h"
#include "kernels/optim_cuda.cuh"
#include "kernels/update_rows_cuda.cuh"

namespace engram {
namespace {

using cuda_optim::blocks_for;
using cuda_optim::kThreads;
using cuda_optim::kWarp;

std::tuple<at::Tensor, at::Tensor> dedup_row_grads_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                                        const std::optional<at::Tensor>& offsets,
                                                        int64_t num_rows) {
  constexpr const char* op = "dedup_row_grads";
  const int64_t K = check_dedup_args(grad_in, ids_in, offsets, num_rows);
  const c10::cuda::OptionalCUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t E = ids.numel(), Dh = grad.size(-1);
  const optim::KeyLayout layout = optim::KeyLayout::make(static_cast<uint64_t>(E), static_cast<uint64_t>(num_rows));
  // Keys are sorted as int64: they must stay below 2^63.
  TORCH_CHECK_VALUE(layout.entry_bits + layout.row_bits <= 63, op, ": ", E, " entries of a ", num_rows,
                    "-row table need more than 63 key bits; split the batch");
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto long_options = ids.options().dtype(at::kLong);

  at::Tensor keys = at::empty({E}, long_options);
  at::Tensor bad = at::zeros({1}, ids.options().dtype(at::kInt));
  cuda_optim::dedup_keys_kernel<<<blocks_for(E), kThreads, 0, stream>>>(
      ids.const_data_ptr<int64_t>(), offsets.has_value() ? offset_table.const_data_ptr<int64_t>() : nullptr, K, E,
      num_rows, layout, keys.data_ptr<int64_t>(), bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Keys are unique (the entry is in the low bits), so any sort is the stable
  // sort by row: each row's entries end up contiguous and in entry order.
  const at::Tensor sorted = std::get<0>(at::sort(keys));

  at::Tensor head_pos = at::empty({E}, long_options);
  cuda_optim::run_heads_kernel<<<blocks_for(E), kThreads, 0, stream>>>(sorted.const_data_ptr<int64_t>(), E, layout,
                                                                         head_pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor run_start = std::get<0>(at::cummax(head_pos, 0));
  at::Tensor flags = at::empty({2, E}, long_options);
  cuda_optim::run_flags_kernel<<<blocks_for(E), kThreads, 0, stream>>>(run_start.const_data_ptr<int64_t>(), E,
                                                                         flags.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor scans = at::cumsum(flags, 1);
  // One synchronisation: the number of rows and pieces, and the range flag.
  const at::Tensor totals = at::cat({scans.select(1, E - 1), bad.to(at::kLong)}).to(at::kCPU);
  const int64_t* total_ptr = totals.const_data_ptr<int64_t>();
  if (total_ptr[2] != 0) report_id_out_of_range({op, "ids", "num_rows"}, ids, offsets, num_rows);
  const int64_t U = total_ptr[0], pieces = total_ptr[1];

  at::Tensor unique_rows = at::empty({U}, long_options);
  at::Tensor row_first_piece = at::empty({U + 1}, long_options);
  at::Tensor piece_start = at::empty({pieces + 1}, long_options);
  cuda_optim::segments_kernel<<<blocks_for(E), kThreads, 0, stream>>>(
      sorted.const_data_ptr<int64_t>(), scans.const_data_ptr<int64_t>(), E, U, pieces, layout,
      unique_rows.data_ptr<int64_t>(), row_first_piece.data_ptr<int64_t>(), piece_start.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor row_grads = at::empty({U, Dh}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({pieces, Dh}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    cuda_optim::piece_sums_kernel<scalar_t, acc_t><<<blocks_for(pieces * kWarp), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), Dh, sorted.const_data_ptr<int64_t>(), layout,
        piece_start.const_data_ptr<int64_t>(), pieces, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda_optim::row_sums_kernel<scalar_t, acc_t><<<blocks_for(U * kWarp), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), Dh, row_first_piece.const_data_ptr<int64_t>(), U,
        row_grads.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {unique_rows, row_grads};
}

// dedup_row_grads with every size bounded by the entries E instead of read
// back (no host sync, so it can be captured): the same kernels, run over E
// rows and E pieces. The arrays are pre-filled so that the padding is
// harmless: pieces past the last start at E (an empty piece reads the extra
// sorted key, entry 0, and its sum is never used), rows past the last start at
// the real piece count, and their rows are -1 and their sums zeroed after.
std::tuple<at::Tensor, at::Tensor> dedup_row_grads_padded_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                                               const std::optional<at::Tensor>& offsets,
                                                               int64_t num_rows) {
  constexpr const char* op = "dedup_row_grads_padded";
  const int64_t K = check_dedup_args(grad_in, ids_in, offsets, num_rows);
  const c10::cuda::OptionalCUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t* offset_ptr = offsets.has_value() ? offset_table.const_data_ptr<int64_t>() : nullptr;
  const int64_t E = ids.numel(), Dh = grad.size(-1);
  const auto long_options = ids.options().dtype(at::kLong);
  at::Tensor unique_rows = at::full({E}, -1, long_options);
  at::Tensor row_grads = at::empty({E, Dh}, grad.options());
  if (E == 0) return {unique_rows, row_grads};
  const optim::KeyLayout layout = optim::KeyLayout::make(static_cast<uint64_t>(E), static_cast<uint64_t>(num_rows));
  TORCH_CHECK_VALUE(layout.entry_bits + layout.row_bits <= 63, op, ": ", E, " entries of a ", num_rows,
                    "-row table need more than 63 key bits; split the batch");
  auto stream = at::cuda::getCurrentCUDAStream();
  check_entry_rows_on_device(ids, offset_ptr, K, num_rows, stream);

  at::Tensor keys = at::empty({E}, long_options);
  at::Tensor bad = at::zeros({1}, ids.options().dtype(at::kInt));
  cuda_optim::dedup_keys_kernel<<<blocks_for(E), kThreads, 0, stream>>>(
      ids.const_data_ptr<int64_t>(), offset_ptr, K, E, num_rows, layout, keys.data_ptr<int64_t>(),
      bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // One extra key (0: entry 0) for the empty padding pieces to read.
  const at::Tensor sorted = at::cat({std::get<0>(at::sort(keys)), at::zeros({1}, long_options)});

  at::Tensor head_pos = at::empty({E}, long_options);
  cuda_optim::run_heads_kernel<<<blocks_for(E), kThreads, 0, stream>>>(sorted.const_data_ptr<int64_t>(), E, layout,
                                                                         head_pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor run_start = std::get<0>(at::cummax(head_pos, 0));
  at::Tensor flags = at::empty({2, E}, long_options);
  cuda_optim::run_flags_kernel<<<blocks_for(E), kThreads, 0, stream>>>(run_start.const_data_ptr<int64_t>(), E,
                                                                         flags.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor scans = at::cumsum(flags, 1);

  // Rows u >= U start (and end) at the piece count P, read on the device; the
  // kernel writes row_first_piece[E] = E, read only by the padding row E - 1
  // (P < E whenever U < E: P == E means every run has one entry). Pieces
  // p >= P start at E.
  at::Tensor row_first_piece = scans.select(0, 1).narrow(0, E - 1, 1).expand({E + 1}).contiguous();
  at::Tensor piece_start = at::full({E + 1}, E, long_options);
  cuda_optim::segments_kernel<<<blocks_for(E), kThreads, 0, stream>>>(
      sorted.const_data_ptr<int64_t>(), scans.const_data_ptr<int64_t>(), E, /*num_unique=*/E, /*num_pieces=*/E,
      layout, unique_rows.data_ptr<int64_t>(), row_first_piece.data_ptr<int64_t>(), piece_start.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({E, Dh}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    cuda_optim::piece_sums_kernel<scalar_t, acc_t><<<blocks_for(E * kWarp), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), Dh, sorted.const_data_ptr<int64_t>(), layout,
        piece_start.const_data_ptr<int64_t>(), E, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda_optim::row_sums_kernel<scalar_t, acc_t><<<blocks_for(E * kWarp), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), Dh, row_first_piece.const_data_ptr<int64_t>(), E,
        row_grads.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // A bad id (reported above) updates nothing: every row becomes padding.
  unique_rows.masked_fill_(bad.to(at::kBool), -1);
  row_grads.masked_fill_(unique_rows.lt(0).unsqueeze(1), 0);
  finish_checked_launch(grad.device(), stream);
  return {unique_rows, row_grads};
}

// Rows in [0, num_rows), strictly increasing: checked on the device with no
// host sync (so a training step can be captured); on a bad row the update
// writes nothing and the error is raised like every deferred CUDA error
// (device_errors.h). Returns the skip flag for the update kernel.
at::Tensor check_update_rows_cuda(DeviceErrorOp op, const at::Tensor& rows, int64_t num_rows) {
  at::Tensor skip = at::zeros({1}, rows.options().dtype(at::kInt));
  const DeviceErrorSlot err = device_error_slot(rows.device(), op);
  const int64_t n = rows.numel();
  cuda::check_update_rows_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      rows.const_data_ptr<int64_t>(), n, num_rows, skip.data_ptr<int>(), err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return skip;
}

void rowwise_sgd_update_cuda(at::Tensor& weight, const at::Tensor& rows_in, const at::Tensor& row_grads_in,
                             double lr, double weight_decay) {
  constexpr const char* op = "rowwise_sgd_update";
  const int64_t U = check_sgd_update_args(weight, rows_in, row_grads_in, lr, weight_decay);
  if (U == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  const at::Tensor rows = rows_in.contiguous(), row_grads = row_grads_in.contiguous();
  const at::Tensor skip = check_update_rows_cuda(kOpSgdUpdate, rows, weight.size(0));
  const int64_t Dh = weight.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    cuda_optim::sgd_rows_kernel<scalar_t><<<blocks_for(U * kWarp), kThreads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), rows.const_data_ptr<int64_t>(), row_grads.const_data_ptr<scalar_t>(), U, Dh,
        optim::sgd_coeffs<scalar_t>(lr, weight_decay), skip.const_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_checked_launch(weight.device(), stream);
}

void rowwise_adam_update_cuda(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                              const at::Tensor& rows_in, const at::Tensor& row_grads_in, double lr, double beta1,
                              double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                              int64_t step, const std::optional<at::Tensor>& step_count) {
  constexpr const char* op = "rowwise_adam_update";
  const int64_t U = check_adam_update_args(weight, exp_avg, exp_avg_sq, rows_in, row_grads_in, lr, beta1, beta2, eps,
                                           weight_decay, step, step_count);
  if (U == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  const at::Tensor rows = rows_in.contiguous(), row_grads = row_grads_in.contiguous();
  const at::Tensor skip = check_update_rows_cuda(kOpAdamUpdate, rows, weight.size(0));
  const int64_t Dh = weight.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    // A step count on the device: the step size is computed there too (no
    // host read), into a one-element buffer the update kernel reads.
    at::Tensor device_step_size;
    if (step_count.has_value()) {
      device_step_size = at::empty({1}, weight.options());
      cuda::adam_step_size_kernel<scalar_t><<<1, 1, 0, stream>>>(
          step_count->const_data_ptr<int64_t>(), lr, beta1, beta2, device_step_size.data_ptr<scalar_t>(),
          skip.data_ptr<int>(), device_error_slot(weight.device(), kOpAdamUpdate));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cuda_optim::adam_rows_kernel<scalar_t><<<blocks_for(U * kWarp), kThreads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(), exp_avg_sq.data_ptr<scalar_t>(),
        rows.const_data_ptr<int64_t>(), row_grads.const_data_ptr<scalar_t>(), U, Dh,
        optim::adam_coeffs<scalar_t>(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                                     step_count.has_value() ? 1 : step),
        skip.const_data_ptr<int>(), step_count.has_value() ? device_step_size.const_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_checked_launch(weight.device(), stream);
}

void rowwise_adagrad_update_cuda(at::Tensor& weight, at::Tensor& sum_sq, const at::Tensor& rows_in,
                                 const at::Tensor& row_grads_in, double lr, double eps, double weight_decay) {
  constexpr const char* op = "rowwise_adagrad_update";
  const int64_t U = check_adagrad_update_args(weight, sum_sq, rows_in, row_grads_in, lr, eps, weight_decay);
  if (U == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  const at::Tensor rows = rows_in.contiguous(), row_grads = row_grads_in.contiguous();
  const at::Tensor skip = check_update_rows_cuda(kOpAdagradUpdate, rows, weight.size(0));
  const int64_t Dh = weight.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    cuda_optim::adagrad_rows_kernel<scalar_t><<<blocks_for(U * kWarp), kThreads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), sum_sq.data_ptr<scalar_t>(), rows.const_data_ptr<int64_t>(),
        row_grads.const_data_ptr<scalar_t>(), U, Dh, optim::adagrad_coeffs<scalar_t>(lr, eps, weight_decay),
        skip.const_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_checked_launch(weight.device(), stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("dedup_row_grads", &dedup_row_grads_cuda);
  m.impl("dedup_row_grads_padded", &dedup_row_grads_padded_cuda);
  m.impl("rowwise_sgd_update", &rowwise_sgd_update_cuda);
  m.impl("rowwise_adagrad_update", &rowwise_adagrad_update_cuda);
  m.impl("rowwise_adam_update", &rowwise_adam_update_cuda);
}

}  // namespace engram
