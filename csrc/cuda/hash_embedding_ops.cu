// CUDA launchers of the hash and embedding ops (compress_ids, ngram_hash,
// multihead_embedding and its backward) and of gather_rows: checks, guard,
// stream, allocation; the kernels are in kernels/cuda_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "csrc/checks.h"
#include "csrc/cuda/device_errors.h"
#include "kernels/cuda_kernels.cuh"

namespace engram {

void check_entry_rows_on_device(const at::Tensor& ids, const int64_t* offsets, int64_t K, int64_t num_rows,
                                cudaStream_t stream) {
  const DeviceErrorSlot err = device_error_slot(ids.device(), kOpDedupRowGradsPadded);
  const int64_t n = ids.numel();
  at::Tensor rows = at::empty({n}, ids.options().dtype(at::kLong));  // scratch: only the reports matter
  cuda::entry_rows_kernel<<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(
      ids.const_data_ptr<int64_t>(), offsets, K, n, num_rows, rows.data_ptr<int64_t>(), err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// out[e] = table[row(e)] for rows of row_bytes bytes (the copy is of bytes,
// whatever the dtype), in the widest chunk that divides the rows and both
// addresses: 16 bytes (one load and store) where it can.
void launch_row_gather(const void* table, int64_t num_rows, int64_t row_bytes, const int64_t* ids,
                       const int64_t* offsets, int64_t K, int64_t entries, void* out, DeviceErrorSlot err,
                       cudaStream_t stream) {
  // gather_rows_kernel indexes entries in 32 bits.
  TORCH_CHECK(entries <= INT32_MAX, "gather: at most 2^31 - 1 ids on CUDA, got ", entries);
  auto gather = [&](auto chunk) {
    using chunk_t = decltype(chunk);
    const int64_t chunks_per_row = row_bytes / static_cast<int64_t>(sizeof(chunk_t));
    cuda::gather_rows_kernel<chunk_t>
        <<<dim3(1, cuda::gather_group_blocks(entries)), dim3(cuda::kGatherLanes, cuda::kGatherEntries), 0, stream>>>(
        static_cast<const chunk_t*>(table), num_rows, chunks_per_row, ids, offsets, K, entries,
        static_cast<chunk_t*>(out), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const uintptr_t addresses = reinterpret_cast<uintptr_t>(table) | reinterpret_cast<uintptr_t>(out);
  const auto fits = [&](int64_t width) { return row_bytes % width == 0 && addresses % width == 0; };
  if (fits(16)) {
    gather(uint4{});
  } else if (fits(8)) {
    gather(uint64_t{});
  } else if (fits(4)) {
    gather(uint32_t{});
  } else if (fits(2)) {
    gather(uint16_t{});
  } else {
    gather(uint8_t{});
  }
}

at::Tensor compress_into(const at::Tensor& ids, const at::Tensor& lookup, DeviceErrorSlot err) {
  at::Tensor out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  const int64_t n = ids.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::compress_kernel<<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(
      ids.data_ptr<int64_t>(), n, lookup.data_ptr<int64_t>(), lookup.numel(), out.data_ptr<int64_t>(), err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor compress_ids_cuda(const at::Tensor& input_ids, const at::Tensor& lookup) {
  check_compress_args(input_ids, lookup);
  const c10::cuda::OptionalCUDAGuard guard(input_ids.device());
  const DeviceErrorSlot err = device_error_slot(input_ids.device(), kOpCompressIds);
  at::Tensor out = compress_into(input_ids.contiguous(), lookup.contiguous(), err);
  finish_checked_launch(input_ids.device(), at::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor ngram_hash_cuda(const at::Tensor& input_ids, const at::Tensor& lookup, const at::Tensor& keys,
                           const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets, int64_t pad_id,
                           c10::string_view family) {
  const NgramHashShape shape = check_ngram_hash_args(input_ids, lookup, keys, head_sizes, offsets, pad_id,
                                                     std::string_view(family.data(), family.size()));
  const c10::cuda::OptionalCUDAGuard guard(input_ids.device());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const int64_t L = shape.num_layers, K = shape.num_heads;
  at::Tensor table = lookup.contiguous();
  const DeviceErrorSlot err = device_error_slot(input_ids.device(), kOpNgramHash);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor canonical = compress_into(input_ids.contiguous(), table, err);

  // Reduction constants of the L*K heads, built on the device: reading
  // head_sizes back to the host would synchronise.
  static_assert(sizeof(FastMod) % sizeof(int64_t) == 0, "FastMod is stored as int64 words");
  const int64_t words = L * K * static_cast<int64_t>(sizeof(FastMod) / sizeof(int64_t));
  at::Tensor mods = at::empty({words}, input_ids.options());
  at::Tensor size_table = head_sizes.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  cuda::hash_mods_kernel<<<cuda::hash_mods_blocks(L * K), cuda::kThreads, 0, stream>>>(
      size_table.const_data_ptr<int64_t>(), offsets.has_value() ? offset_table.const_data_ptr<int64_t>() : nullptr,
      L * K, reinterpret_cast<FastMod*>(mods.data_ptr<int64_t>()), err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor key_table = keys.contiguous();
  at::Tensor out = at::empty({L, B, T, K}, input_ids.options());

  cuda::HashArgs args;
  args.canonical = canonical.data_ptr<int64_t>();
  args.lookup = table.const_data_ptr<int64_t>();
  args.batch = B;
  args.seq_len = T;
  args.pad_id = pad_id;
  args.num_layers = static_cast<int>(L);
  args.max_ngram_size = static_cast<int>(shape.max_ngram_size);
  args.heads_per_order = static_cast<int>(shape.heads_per_order);
  args.num_heads = static_cast<int>(K);
  args.xxh64 = shape.family == HashFamily::XXH64;
  args.keys = key_table.data_ptr<int64_t>();
  args.mods = reinterpret_cast<const FastMod*>(mods.const_data_ptr<int64_t>());
  args.offsets = offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr;
  args.out = out.data_ptr<int64_t>();
  const int64_t ids_out = L * B * T * K;
  if (ids_out <= static_cast<int64_t>(UINT32_MAX)) {
    cuda::ngram_hash_kernel<uint32_t><<<cuda::blocks_for(ids_out), cuda::kThreads, 0, stream>>>(args);
  } else {
    cuda::ngram_hash_kernel<uint64_t><<<cuda::blocks_for(ids_out), cuda::kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_checked_launch(input_ids.device(), stream);
  return out;
}

at::Tensor multihead_embedding_cuda(const at::Tensor& weight, const at::Tensor& ids_in,
                                    const std::optional<at::Tensor>& offsets, bool /*sparse*/) {
  const int64_t K = check_multihead_embedding_args(weight, ids_in, offsets);
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  at::Tensor table = weight.contiguous();
  at::Tensor ids = ids_in.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t R = table.size(0), Dh = table.size(1), entries = ids.numel();
  std::vector<int64_t> out_shape(ids.sizes().begin(), ids.sizes().end());
  out_shape.push_back(Dh);
  at::Tensor out = at::empty(out_shape, table.options());
  const DeviceErrorSlot err = device_error_slot(weight.device(), kOpEmbedding);
  auto stream = at::cuda::getCurrentCUDAStream();
  launch_row_gather(table.const_data_ptr(), R, Dh * table.element_size(), ids.const_data_ptr<int64_t>(),
                    offsets.has_value() ? offset_table.const_data_ptr<int64_t>() : nullptr, K, entries, out.data_ptr(),
                    err, stream);
  finish_checked_launch(weight.device(), stream);
  return out;
}

at::Tensor multihead_embedding_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                             const std::optional<at::Tensor>& offsets, int64_t num_rows) {
  const int64_t K = check_embedding_backward_args(grad_in, ids_in, offsets, num_rows);
  const c10::cuda::OptionalCUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous();
  at::Tensor ids = ids_in.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t Dh = grad.size(-1), entries = ids.numel();
  // The kernels index entries in 32 bits.
  TORCH_CHECK(entries <= INT32_MAX, "multihead_embedding_backward: at most 2^31 - 1 ids on CUDA, got ", entries);
  const DeviceErrorSlot err = device_error_slot(grad_in.device(), kOpEmbeddingBackward);
  at::Tensor result;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* offset_ptr = offsets.has_value() ? offset_table.const_data_ptr<int64_t>() : nullptr;
  if (grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16) {
    // 16-bit tables: sort the entries by row and sum each row's run once,
    // instead of atomics into a float32 table that is then converted.
    at::Tensor rows = at::empty({entries}, ids.options());
    cuda::entry_rows_kernel<<<cuda::blocks_for(entries), cuda::kThreads, 0, stream>>>(
        ids.const_data_ptr<int64_t>(), offset_ptr, K, entries, num_rows, rows.data_ptr<int64_t>(), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto [sorted_rows, order] = rows.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    result = at::zeros({num_rows, Dh}, grad.options());
    // Long runs (the pad row's) are summed in pieces of 32 positions, then
    // per row in a fixed order (kernels/cuda_kernels.cuh): no host sync.
    const int64_t pieces = cuda::run_pieces(entries);
    const dim3 grid(1, cuda::gather_blocks(pieces)), block(cuda::kGatherLanes, cuda::kGatherEntries);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(grad.scalar_type(), "multihead_embedding_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::Tensor partial = at::empty({pieces, Dh}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      cuda::sorted_run_pieces_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), Dh, sorted_rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
          entries, result.data_ptr<scalar_t>(), partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda::sorted_run_totals_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), Dh, sorted_rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
          entries, partial.const_data_ptr<acc_t>(), result.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    result = at::zeros({num_rows, Dh}, grad.options());
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "multihead_embedding_backward_cuda", [&] {
      cuda::scatter_add_rows_kernel<scalar_t, scalar_t>
          <<<dim3(1, cuda::gather_blocks(entries)), dim3(cuda::kGatherLanes, cuda::kGatherEntries), 0, stream>>>(
              grad.const_data_ptr<scalar_t>(), num_rows, Dh, ids.const_data_ptr<int64_t>(), offset_ptr, K, entries,
              result.data_ptr<scalar_t>(), err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish_checked_launch(grad_in.device(), stream);
  return result;
}

// The address the device reads a table through: a device table as is; a
// pinned host table through its mapped device pointer (zero copy over UVA:
// only the rows asked for cross the link, with no CPU thread or staging).
const void* device_address(const at::Tensor& table, at::Device device) {
  if (table.device() == device) return table.const_data_ptr();
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.is_pinned(), "gather_rows: table is ",
                    table.device().is_cpu() ? "in pageable host memory" : "on " + table.device().str(),
                    "; expected pinned host memory (table_placement='host' pins it when CUDA is available) or a "
                    "table on ", device);
  void* mapped = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, const_cast<void*>(table.const_data_ptr()), 0));
  return mapped;
}

// check=false: a row out of range is not read (zeros) and not reported; the
// prefetcher's rows come from ngram_hash, in range by construction.
at::Tensor gather_rows_cuda(const at::Tensor& table, const at::Tensor& rows_in, bool check) {
  const std::vector<int64_t> shape = check_gather_rows_args(table, rows_in);
  TORCH_CHECK(rows_in.is_cuda(), "gather_rows: rows is on ", rows_in.device(), "; expected a CUDA tensor here");
  const c10::cuda::OptionalCUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous();
  at::Tensor out = at::empty(shape, table.options().device(rows.device()));
  if (rows.numel() == 0 || table.size(1) == 0) return out;
  const void* src = device_address(table, rows.device());
  const DeviceErrorSlot err =
      check ? device_error_slot(rows.device(), kOpGatherRows) : DeviceErrorSlot{nullptr, nullptr, kOpGatherRows};
  auto stream = at::cuda::getCurrentCUDAStream();
  launch_row_gather(src, table.size(0), table.size(1) * table.element_size(), rows.const_data_ptr<int64_t>(),
                    nullptr, 1, rows.numel(), out.data_ptr(), err, stream);
  if (check) finish_checked_launch(rows.device(), stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("compress_ids", &compress_ids_cuda);
  m.impl("ngram_hash", &ngram_hash_cuda);
  m.impl("multihead_embedding", &multihead_embedding_cuda);
  m.impl("multihead_embedding_backward", &multihead_embedding_backward_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
}

}  // namespace engram
