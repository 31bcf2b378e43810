// The C API of include/engram/runtime.h: thin wrappers that never let a C++
// exception cross into C (ctypes, or a C caller, could not catch it).
#include "include/engram/runtime.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>

#include "csrc/runtime.h"
#include "kernels/cpu_isa.h"

namespace {
void copy_message(const std::string& text, char* message, size_t capacity) {
  if (message == nullptr || capacity == 0) return;
  const size_t n = std::min(text.size(), capacity - 1);
  std::memcpy(message, text.data(), n);
  message[n] = '\0';
}
}  // namespace

extern "C" {

int engram_ops_abi_version(void) { return ENGRAM_OPS_ABI_VERSION; }

int engram_built_with_cuda(void) {
#if defined(ENGRAM_WITH_CUDA)
  return 1;
#else
  return 0;
#endif
}

EngramErrorKind engram_take_cuda_error(char* message, size_t capacity) {
  try {
    const engram::CudaError error = engram::take_cuda_error();
    copy_message(error.message, message, capacity);
    return error.kind;
  } catch (const std::exception& e) {
    copy_message(std::string("engram: reading the CUDA error reports failed: ") + e.what(), message, capacity);
  }
  return ENGRAM_ERROR_INTERNAL;
}

void engram_set_cuda_sync_checks(int enabled) { engram::set_cuda_sync_checks(enabled != 0); }
int engram_cuda_sync_checks(void) { return engram::cuda_sync_checks() ? 1 : 0; }

int engram_cpu_isa(void) { return static_cast<int>(engram::cpu::current_cpu_isa()); }
int engram_best_cpu_isa(void) { return static_cast<int>(engram::cpu::best_cpu_isa()); }
int engram_set_cpu_isa(int level) {
  using engram::cpu::CpuIsa;
  if (level < 0 || level >= engram::cpu::kNumCpuIsas) return 0;
  return engram::cpu::set_cpu_isa(static_cast<CpuIsa>(level)) ? 1 : 0;
}
int64_t engram_cpu_isa_calls(int level) {
  if (level < 0 || level >= engram::cpu::kNumCpuIsas) return 0;
  return engram::cpu::cpu_isa_calls[level].load();
}

}  // extern "C"
