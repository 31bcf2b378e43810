// The range and order check of the rows of the row-wise update ops on CUDA,
// and Adam's step size from a step count on the device
// (csrc/cuda/optim.cu), reported through the deferred error record
// (kernels/device_error_record.cuh) instead of a flag the host reads: the
// update then needs no host sync and can be captured in a CUDA graph.
#pragma once

#include <cstdint>

#include "kernels/device_error_record.cuh"
#include "kernels/optim_math.h"

// Same text as in kernels/cuda_kernels.cuh, so both headers may be included.
#define ENGRAM_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

namespace engram {
namespace cuda {

// *skip = 1 (and one report) if a row is outside [0, num_rows) or the rows are
// not strictly increasing; the update kernels then write nothing, as the CPU
// ops, which raise before writing. A suffix of -1 rows (padding) is allowed.
static __global__ void check_update_rows_kernel(const int64_t* rows, int64_t n, int64_t num_rows, int* skip,
                                                DeviceErrorSlot err) {
  ENGRAM_GRID_STRIDE(u, n) {
    const int64_t r = rows[u];
    if (r == -1 && (u + 1 == n || rows[u + 1] == -1)) continue;  // padding
    if (r < 0 || r >= num_rows) {
      *skip = 1;
      report_device_error(err, kUpdateRowOutOfRange, u, r, 0, num_rows, -1);
    } else if (u > 0 && rows[u - 1] >= r) {
      *skip = 1;
      report_device_error(err, kUpdateRowsUnordered, u, rows[u - 1], r, num_rows, -1);
    }
  }
}

// One thread: out[0] = -step_size for the update number *step (read on the
// device, so a captured graph replays each replay's count); a count < 1
// sets the skip flag (nothing is written) and is reported.
template <typename T>
__global__ void adam_step_size_kernel(const int64_t* step, double lr, double beta1, double beta2, T* out, int* skip,
                                      DeviceErrorSlot err) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const int64_t t = *step;
  if (t < 1) {
    *skip = 1;
    report_device_error(err, kAdamStepInvalid, 0, t, 0, 1, -1);
    return;
  }
  out[0] = static_cast<T>(optim::adam_neg_step_size(lr, beta1, beta2, t));
}

}  // namespace cuda
}  // namespace engram
