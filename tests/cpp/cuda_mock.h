// Lets the torch-free CUDA kernels (kernels/*.cuh) run as plain host code on a
// machine without a GPU: a "launch" is a direct call as one block of one
// thread, so every grid-stride loop visits all its work in order, and the
// atomics are plain read-modify-writes. It checks what a kernel computes and
// reports (indexing, formulas, error records), not its parallel behaviour.
#pragma once

#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct MockDim3 {
  unsigned x, y, z;
};
static constexpr MockDim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

inline int atomicCAS(int* address, int compare, int value) {
  const int old = *address;
  if (old == compare) *address = value;
  return old;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence_system() {}

// One lane per warp: a shuffle returns the lane's own value.
template <typename T>
T __shfl_xor_sync(unsigned, T v, int) {
  return v;
}
