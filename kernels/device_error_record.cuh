// The deferred error record of the CUDA kernels, torch-free: its layout, the
// kinds of error and the device side of a report. The host side (setup,
// messages, raising) is csrc/cuda/device_errors.cu.
//
// A kernel that meets a bad id cannot throw, and reading a device flag after
// every launch would cost a host sync. Instead the first thread that meets
// one claims a device word and writes what it saw into page-locked host
// memory mapped into the device's address space; the host reads that record
// at the next engram call on the device without any CUDA call
// (csrc/cuda/device_errors.h).
#pragma once

#include <cstdint>

namespace engram {
namespace cuda {

enum DeviceErrorKind : int {
  kIdOutOfRange = 1,        // value outside [0, limit) (or >= limit where negatives pass)
  kIdOffsetOverflow = 2,    // value + extra (the head's offset) overflows int64
  kHeadSizeInvalid = 3,     // head_sizes holds value < 1
  kHeadOffsetOverflow = 4   // offsets holds value; with head size extra the ids overflow
};
// DeviceErrorKind values of the row-wise update ops (kernels/update_rows_cuda.cuh).
constexpr int kUpdateRowOutOfRange = 5;  // rows[index] = value outside [0, limit)
constexpr int kUpdateRowsUnordered = 6;  // rows[index - 1] = value, rows[index] = extra: not increasing
constexpr int kAdamStepInvalid = 7;      // the device step count holds value < limit (1)

struct DeviceErrorRecord {
  int ready;  // written last, after a system-wide fence
  int op;     // csrc/cuda/device_errors.h: DeviceErrorOp
  int kind;   // DeviceErrorKind
  int64_t index, value, extra, limit;
  int64_t head;  // the head whose offset was added, or -1 without offsets
};

struct DeviceErrorSlot {
  int* claimed;               // device memory, 0 until a kernel reports
  DeviceErrorRecord* record;  // mapped host memory
  int op;
};

__device__ __forceinline__ void report_device_error(const DeviceErrorSlot& slot, int kind, int64_t index,
                                                    int64_t value, int64_t extra, int64_t limit, int64_t head) {
  if (slot.claimed == nullptr) return;  // an unchecked launch
  if (atomicCAS(slot.claimed, 0, 1) != 0) return;  // one report per device until the host takes it
  volatile DeviceErrorRecord* r = slot.record;
  r->op = slot.op;
  r->kind = kind;
  r->head = head;
  r->index = index;
  r->value = value;
  r->extra = extra;
  r->limit = limit;
  __threadfence_system();
  r->ready = 1;
}

}  // namespace cuda
}  // namespace engram
