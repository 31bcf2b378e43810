// engram's runtime controls, as a C API of libengram_ops.so.
//
// The ops themselves are reached through the PyTorch dispatcher
// (torch.ops.engram.* in Python, c10::Dispatcher in C++): loading or linking
// libengram_ops.so registers them. These functions are the few controls that
// are not ops. A C API so that Python reaches them with ctypes and the op
// library links no libpython; no function here throws.
#ifndef ENGRAM_RUNTIME_H_
#define ENGRAM_RUNTIME_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define ENGRAM_API __declspec(dllexport)
#else
#define ENGRAM_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever an op's schema, its Meta kernel or these functions change
// (2: the checks and fakes moved into the library's Meta kernels; 3:
// rowwise_adam_update takes a step count tensor); a package or a program built
// against another version refuses to run with this library.
#define ENGRAM_OPS_ABI_VERSION 3
ENGRAM_API int engram_ops_abi_version(void);
// 1 if this build holds the CUDA kernels.
ENGRAM_API int engram_built_with_cuda(void);

// The kinds of error a CUDA kernel reports after the fact (error kinds are
// named on both sides: engram/_loader.py mirrors them).
typedef enum EngramErrorKind {
  ENGRAM_ERROR_NONE = 0,
  ENGRAM_ERROR_INDEX = 1,     // an id or row outside its table: IndexError
  ENGRAM_ERROR_VALUE = 2,     // a bad value (e.g. a hash table size): ValueError
  ENGRAM_ERROR_INTERNAL = 3,  // reading the reports failed: RuntimeError
} EngramErrorKind;
// Takes the pending report of any CUDA device, clearing it. Writes the
// message, truncated and NUL-terminated, into message[capacity].
ENGRAM_API EngramErrorKind engram_take_cuda_error(char* message, size_t capacity);
// 1: CUDA launches that check ids synchronise and raise at the call.
ENGRAM_API void engram_set_cuda_sync_checks(int enabled);
ENGRAM_API int engram_cuda_sync_checks(void);

// CPU instruction-set levels: 0 scalar, 1 avx2, 2 avx512.
ENGRAM_API int engram_cpu_isa(void);
ENGRAM_API int engram_best_cpu_isa(void);
// 1 on success; 0 when `level` is above what this CPU and build have.
ENGRAM_API int engram_set_cpu_isa(int level);
// How many kernel calls ran at `level` (0 for a level outside 0..2).
ENGRAM_API int64_t engram_cpu_isa_calls(int level);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // ENGRAM_RUNTIME_H_
