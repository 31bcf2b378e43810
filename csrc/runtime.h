// Process-wide switches of the op library and the deferred CUDA error
// reports, behind the C API of include/engram/runtime.h (csrc/runtime_api.cpp).
#pragma once

#include <cstddef>
#include <string>

#include "include/engram/runtime.h"  // EngramErrorKind

namespace engram {

// Deferred error reports of the CUDA kernels (csrc/cuda/device_errors.h).
// The sync-check switch lives in library.cpp so that CPU builds have it too.
void set_cuda_sync_checks(bool enabled);
bool cuda_sync_checks();
// A CUDA kernel's deferred report: its kind (ENGRAM_ERROR_NONE when there is
// none, INDEX for an IndexError, VALUE for a ValueError) and its message.
struct CudaError {
  EngramErrorKind kind = ENGRAM_ERROR_NONE;
  std::string message;
};
// Takes the pending report of any CUDA device, clearing it.
CudaError take_cuda_error();

}  // namespace engram
