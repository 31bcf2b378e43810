// The range and order check of the rows of the row-wise update ops on CUDA
// (csrc/cuda/optim.cu), reported through the deferred error record
// (kernels/cuda_kernels.cuh) instead of a flag the host reads: the update then
// needs no host sync and can be captured in a CUDA graph. Included by
// csrc/cuda/ops.cu only (it owns the record).
#pragma once

#include <cstdint>

#include "kernels/cuda_kernels.cuh"

namespace engram {
namespace cuda {

// DeviceErrorKind values of the update ops (after cuda_kernels.cuh's).
constexpr int kUpdateRowOutOfRange = 5;  // rows[index] = value outside [0, limit)
constexpr int kUpdateRowsUnordered = 6;  // rows[index - 1] = value, rows[index] = extra: not increasing

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

}  // namespace cuda
}  // namespace engram
