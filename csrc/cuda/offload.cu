// CUDA launcher of engram::gather_rows (schema in csrc/library.cpp): the rows
// of a table in pinned host memory read by the GPU itself over UVA (zero
// copy: no CPU thread, no staging buffer, only the asked rows cross the
// link) into a new tensor on the rows' device. The kernel is in
// kernels/offload_cuda.cuh. Launched on the current stream: the prefetcher
// makes that a side stream and records one event per layer.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "csrc/offload.h"
#include "kernels/offload_cuda.cuh"

namespace engram {
namespace {

namespace k = cuda_offload;

// The address the device reads the table through: a device table as is; a
// pinned host table through its mapped device pointer (equal to the host
// pointer under UVA, asked for all the same so a non-UVA mapping would work).
const void* device_address(const at::Tensor& table, at::Device device) {
  if (table.device() == device) return table.const_data_ptr();
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.is_pinned(), "gather_rows: table is ",
                    table.device().is_cpu() ? "in pageable host memory" : "on another device (",
                    table.device().is_cpu() ? "" : table.device().str(), table.device().is_cpu() ? "" : ")",
                    "; expected pinned host memory (table_placement='host' pins it when CUDA is available) or a "
                    "table on ", device);
  void* mapped = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, const_cast<void*>(table.const_data_ptr()), 0));
  return mapped;
}

template <typename Vec>
void launch(const void* table, const at::Tensor& rows, int64_t num_rows, int64_t row_bytes, at::Tensor& out,
            int* bad, cudaStream_t stream) {
  const int64_t n = rows.numel();
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  k::gather_rows_kernel<Vec><<<k::blocks_for(n * row_vecs), k::kThreads, 0, stream>>>(
      static_cast<const Vec*>(table), rows.const_data_ptr<int64_t>(), n, num_rows, row_vecs,
      static_cast<Vec*>(out.mutable_data_ptr()), bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// check=false: no host sync (the prefetcher's rows come from ngram_hash, in
// range by construction); a row out of range is then not read and gives a
// zero row. check=true: a flag is read back and an IndexError raised.
at::Tensor gather_rows_cuda(const at::Tensor& table, const at::Tensor& rows_in, bool check) {
  check_gather_rows_args(table, rows_in);
  TORCH_CHECK(rows_in.is_cuda(), "gather_rows: rows is on ", rows_in.device(), "; expected a CUDA tensor here");
  const c10::cuda::OptionalCUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous();
  at::Tensor out = new_gather_rows_output(table, rows, rows.device());
  if (rows.numel() == 0 || table.size(1) == 0) return out;
  const void* src = device_address(table, rows.device());
  const int64_t row_bytes = table.size(1) * static_cast<int64_t>(table.element_size());
  at::Tensor bad = check ? at::zeros({1}, rows.options().dtype(at::kInt)) : at::Tensor();
  int* bad_ptr = check ? bad.mutable_data_ptr<int>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  // The widest access that divides the row and the table's alignment.
  const auto addr = reinterpret_cast<uintptr_t>(src);
  const auto fits = [&](int64_t width) { return row_bytes % width == 0 && addr % width == 0; };
  if (fits(16)) {
    launch<k::Vec16>(src, rows, table.size(0), row_bytes, out, bad_ptr, stream);
  } else if (fits(8)) {
    launch<k::Vec8>(src, rows, table.size(0), row_bytes, out, bad_ptr, stream);
  } else if (fits(4)) {
    launch<uint32_t>(src, rows, table.size(0), row_bytes, out, bad_ptr, stream);
  } else if (fits(2)) {
    launch<uint16_t>(src, rows, table.size(0), row_bytes, out, bad_ptr, stream);
  } else {
    launch<uint8_t>(src, rows, table.size(0), row_bytes, out, bad_ptr, stream);
  }
  if (check && bad.item<int>() != 0) {
    const at::Tensor host = rows.cpu();
    const int64_t* r = host.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < host.numel(); ++i) {
      TORCH_CHECK_INDEX(r[i] >= 0 && r[i] < table.size(0), "gather_rows: rows holds ", r[i], " at flat index ", i,
                        "; expected a row in [0, ", table.size(0), ")");
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) { m.impl("gather_rows", &gather_rows_cuda); }

}  // namespace engram
