// The device-side row check of the row-wise update ops (defined in
// csrc/cuda/ops.cu, which owns the deferred error record). csrc/cuda/optim.cu
// includes this instead of device_errors.h: that one pulls in
// kernels/cuda_kernels.cuh, whose kernels ops.cu alone may define.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

namespace engram {

enum class RowwiseRule : int { kSgd, kAdagrad, kAdam };

// rows [n] int64 on the weight's device, checked without a host sync: a row
// outside [0, num_rows) or rows not strictly increasing set *skip (device
// memory, zeroed by the caller; the update kernel then writes nothing) and
// leave a report, raised like every deferred CUDA error.
void check_update_rows_on_device(RowwiseRule rule, const at::Tensor& rows, int64_t num_rows, int* skip,
                                 cudaStream_t stream);

// ids [E] int64 (+ offsets [K], a device pointer or null): a row outside
// [0, num_rows) is reported as dedup_row_grads_padded's deferred error, with
// no host sync.
void check_entry_rows_on_device(const at::Tensor& ids, const int64_t* offsets, int64_t K, int64_t num_rows,
                                cudaStream_t stream);

// As in device_errors.h: in sync-check mode (outside capture), waits for the
// stream and raises what the kernels reported.
void finish_checked_launch(const at::Device& device, cudaStream_t stream);

}  // namespace engram
