// The deferred error reports of the CUDA kernels (csrc/cuda/device_errors.h):
// the record of each device, its messages (worded by csrc/checks.h), and
// raising them at the next call or, in sync-check mode, at the call itself.
#include "csrc/cuda/device_errors.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>

#include "csrc/checks.h"

namespace engram {

namespace {

// What each op's ids index, for the messages (csrc/checks.h words them).
constexpr IdRange kOpRanges[kNumDeviceErrorOps] = {
    {"compress_ids", "input_ids", "vocab_size", true},
    {"ngram_hash", "input_ids", "vocab_size", true},
    {"multihead_embedding", "ids", "weight.size(0)"},
    {"multihead_embedding_backward", "ids", "num_rows"},
    {"gather_rows", "rows", "table.size(0)"},
    {"rowwise_sgd_update", "rows", "weight.size(0)"},
    {"rowwise_adagrad_update", "rows", "weight.size(0)"},
    {"rowwise_adam_update", "rows", "weight.size(0)"},
    {"dedup_row_grads_padded", "ids", "num_rows"},
};

struct DeviceErrorState {
  int* claimed = nullptr;
  DeviceErrorRecord* record = nullptr;  // page-locked, mapped
};

constexpr int kMaxDevices = 64;
std::mutex device_error_mutex;
DeviceErrorState device_errors[kMaxDevices];

// Whether the current stream of `device` is being captured into a CUDA graph:
// then nothing may allocate, synchronise or re-arm the record (a memset would
// be recorded into the graph and run at each replay instead of now).
bool capturing(int device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)),
                                       &status));
  return status != cudaStreamCaptureStatusNone;
}

// Allocated on a device's first checked launch and kept for the process. That
// launch must not be under capture: allocating page-locked memory and the
// synchronous memset are not allowed there.
DeviceErrorState& device_error_state(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "engram: CUDA device index ", device, " is beyond the ",
              kMaxDevices, " devices engram supports");
  const std::lock_guard<std::mutex> lock(device_error_mutex);
  DeviceErrorState& state = device_errors[device];
  if (state.record == nullptr) {
    TORCH_CHECK(!capturing(device), "engram: the first engram CUDA op on cuda:", device,
                " is being captured into a CUDA graph, but its error record must be set up outside capture; "
                "run the captured code once before capturing (the warm-up PyTorch asks for anyway)");
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* host = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(DeviceErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host, 0, sizeof(DeviceErrorRecord));
    void* claimed = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&claimed, sizeof(int)));
    C10_CUDA_CHECK(cudaMemset(claimed, 0, sizeof(int)));
    state.claimed = static_cast<int*>(claimed);
    state.record = static_cast<DeviceErrorRecord*>(host);
  }
  return state;
}

std::string format_device_error(const DeviceErrorRecord& r) {
  const IdRange& range = kOpRanges[r.op >= 0 && r.op < kNumDeviceErrorOps ? r.op : 0];
  switch (r.kind) {
    case cuda::kHeadSizeInvalid:
      return head_size_message(range.op, r.value, r.index);
    case cuda::kHeadOffsetOverflow:
      return head_offset_overflow_message(range.op, r.value, r.index, r.extra);
    case cuda::kIdOffsetOverflow:
      return id_offset_overflow_message(range, r.value, r.index, r.head, r.extra, r.limit);
    case cuda::kUpdateRowsUnordered:
      return rows_unordered_message(range.op, r.value, r.extra, r.index);
    case cuda::kAdamStepInvalid:
      return adam_step_message(range.op, "step_count holds ", r.value);
    default:  // cuda::kIdOutOfRange, cuda::kUpdateRowOutOfRange
      return id_out_of_range_message(range, r.value, r.index, r.limit, r.head >= 0);
  }
}

EngramErrorKind error_kind(int kind) {
  const bool value_error = kind == cuda::kHeadSizeInvalid || kind == cuda::kHeadOffsetOverflow ||
                           kind == cuda::kUpdateRowsUnordered || kind == cuda::kAdamStepInvalid;
  return value_error ? ENGRAM_ERROR_VALUE : ENGRAM_ERROR_INDEX;
}

// The pending report of `device`, cleared for the next one; kind NONE if none.
// Under capture a report stays pending (re-arming would have to be recorded
// into the graph): the first call after the capture raises it.
CudaError take_device_error(int device, bool deferred) {
  if (capturing(device)) return {};
  DeviceErrorState& state = device_error_state(device);
  volatile DeviceErrorRecord* live = state.record;
  if (live->ready == 0) return {};
  DeviceErrorRecord r;
  r.op = live->op;
  r.kind = live->kind;
  r.index = live->index;
  r.value = live->value;
  r.extra = live->extra;
  r.limit = live->limit;
  r.head = live->head;
  live->ready = 0;
  // Re-arm the device word behind any work already queued; no host sync.
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  C10_CUDA_CHECK(cudaMemsetAsync(state.claimed, 0, sizeof(int), at::cuda::getCurrentCUDAStream(device)));
  std::string message = format_device_error(r);
  if (deferred) {
    message += " (found by a CUDA kernel of an earlier engram call on cuda:" + std::to_string(device) +
               ", which read that entry as zeros; set ENGRAM_CUDA_SYNC_CHECKS=1 to raise at that call instead)";
  }
  return {error_kind(r.kind), message};
}

[[noreturn]] void raise_device_error(const CudaError& error) {
  if (error.kind == ENGRAM_ERROR_VALUE) TORCH_CHECK_VALUE(false, error.message);
  TORCH_CHECK_INDEX(false, error.message);
}

}  // namespace

DeviceErrorSlot device_error_slot(const at::Device& device, DeviceErrorOp op) {
  const auto pending = take_device_error(device.index(), /*deferred=*/true);
  if (pending.kind != ENGRAM_ERROR_NONE) raise_device_error(pending);
  const DeviceErrorState& state = device_error_state(device.index());
  return DeviceErrorSlot{state.claimed, state.record, static_cast<int>(op)};
}

void finish_checked_launch(const at::Device& device, cudaStream_t stream) {
  if (!cuda_sync_checks()) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;  // a sync would break the capture
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  const auto error = take_device_error(device.index(), /*deferred=*/false);
  if (error.kind != ENGRAM_ERROR_NONE) raise_device_error(error);
}

CudaError take_cuda_error() {
  const int devices = std::min(static_cast<int>(at::cuda::device_count()), kMaxDevices);
  for (int device = 0; device < devices; ++device) {
    bool allocated;
    {
      const std::lock_guard<std::mutex> lock(device_error_mutex);
      allocated = device_errors[device].record != nullptr;
    }
    if (!allocated) continue;  // no checked launch ran there
    auto error = take_device_error(device, /*deferred=*/true);
    if (error.kind != ENGRAM_ERROR_NONE) return error;
  }
  return {};
}

}  // namespace engram
