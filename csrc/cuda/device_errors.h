// Host side of the deferred error reports of the CUDA kernels
// (kernels/cuda_kernels.cuh: DeviceErrorRecord). Default mode: a launcher
// checks for an earlier report when it is called and never synchronises, so
// training stays free of host syncs and CUDA graphs can capture the ops.
// Sync-check mode (ENGRAM_CUDA_SYNC_CHECKS=1, engram.set_cuda_sync_checks):
// every checked launch synchronises its stream and raises at the call itself.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "csrc/ops.h"
#include "kernels/cuda_kernels.cuh"

namespace engram {

using cuda::DeviceErrorRecord;
using cuda::DeviceErrorSlot;
using cuda::kHeadOffsetOverflow;
using cuda::kHeadSizeInvalid;
using cuda::kIdOffsetOverflow;
using cuda::kIdOutOfRange;

// The ops that report through a DeviceErrorSlot (their names: csrc/cuda/ops.cu).
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

}  // namespace engram
