// Zero-copy row gather for host-resident Engram tables (torch-free): the
// kernel reads table rows straight from pinned host memory over UVA (PCIe /
// NVLink-C2C reads issued by the GPU itself) into a device buffer. Only the
// rows asked for cross the link, with no CPU thread and no staging copy.
#pragma once

#include <cstdint>

namespace engram::cuda_offload {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t work) {
  // Enough blocks to keep many reads in flight over the link; the grid-stride
  // loop covers the rest.
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

// out[i, :] = table[rows[i], :] for i < n, one `Vec` (16, 8, 4 or 2 bytes,
// whatever divides the row) per thread and step, so a warp reads contiguous
// bytes of a row. `table` is the device-side address of pinned host memory
// (or of device memory: the kernel does not care). A row outside
// [0, num_rows) is not read: its output is zero and *bad (if not null) is set
// to 1 -- the launcher decides whether to look (a host sync) or not.
template <typename Vec>
__global__ void gather_rows_kernel(const Vec* __restrict__ table, const int64_t* __restrict__ rows, int64_t n,
                                   int64_t num_rows, int64_t row_vecs, Vec* __restrict__ out, int* bad) {
  const int64_t total = n * row_vecs;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / row_vecs;
    const int64_t c = i - r * row_vecs;
    const int64_t row = rows[r];
    if (row < 0 || row >= num_rows) {
      out[i] = Vec{};
      if (bad != nullptr) *bad = 1;
      continue;
    }
    // 64-bit index: a table may hold more than 2^31 elements.
    out[i] = table[row * row_vecs + c];
  }
}

struct alignas(16) Vec16 {
  uint4 v;
};
struct alignas(8) Vec8 {
  uint2 v;
};

}  // namespace engram::cuda_offload
