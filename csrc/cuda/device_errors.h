// Host side of the deferred error reports of the CUDA kernels
// (kernels/device_error_record.cuh), defined in csrc/cuda/device_errors.cu.
// Default mode: a launcher checks for an earlier report when it is called and
// never synchronises, so training stays free of host syncs and CUDA graphs
// can capture the ops. Sync-check mode (ENGRAM_CUDA_SYNC_CHECKS=1,
// engram.set_cuda_sync_checks): every checked launch synchronises its stream
// and raises at the call itself.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "csrc/runtime.h"
#include "kernels/device_error_record.cuh"

namespace engram {

using cuda::DeviceErrorRecord;
using cuda::DeviceErrorSlot;

// The ops that report through a DeviceErrorSlot (what their ids index:
// kOpRanges in csrc/cuda/device_errors.cu).
enum DeviceErrorOp : int {
  kOpCompressIds = 0,
  kOpNgramHash,
  kOpEmbedding,
  kOpEmbeddingBackward,
  kOpGatherRows,
  kOpSgdUpdate,
  kOpAdagradUpdate,
  kOpAdamUpdate,
  kOpDedupRowGradsPadded,
  kNumDeviceErrorOps
};

// Raises an earlier kernel's report on `device`, if there is one, then hands
// out the device's slot for a launch of `op`.
DeviceErrorSlot device_error_slot(const at::Device& device, DeviceErrorOp op);

// After a launch that was given a slot: in sync-check mode (and outside
// stream capture) waits for the stream and raises what the kernel reported.
void finish_checked_launch(const at::Device& device, cudaStream_t stream);

// ids [E] int64 (+ offsets [K], a device pointer or null): a row outside
// [0, num_rows) is reported as dedup_row_grads_padded's deferred error, with
// no host sync. Defined in csrc/cuda/hash_embedding_ops.cu, with the kernel it
// launches (kernels/cuda_kernels.cuh, whose kernels one file defines).
void check_entry_rows_on_device(const at::Tensor& ids, const int64_t* offsets, int64_t K, int64_t num_rows,
                                cudaStream_t stream);

}  // namespace engram
