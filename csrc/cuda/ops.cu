// CUDA launchers of the hash and embedding ops: checks, guard, stream,
// allocation; the kernels are in kernels/cuda_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "csrc/checks.h"
#include "csrc/ops.h"
#include "kernels/cuda_kernels.cuh"

namespace engram {
namespace {

// A device flag the kernels raise on an out-of-range id; reading it syncs,
// which is the price of a clear error instead of a device-side assert.
bool flag_raised(const at::Tensor& flag) { return flag.item<int>() != 0; }

at::Tensor new_flag(const at::Tensor& like) { return at::zeros({1}, like.options().dtype(at::kInt)); }

at::Tensor compress_into(const at::Tensor& ids, const at::Tensor& lookup, const char* op) {
  at::Tensor out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  at::Tensor bad = new_flag(ids);
  const int64_t n = ids.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::compress_kernel<<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(
      ids.data_ptr<int64_t>(), n, lookup.data_ptr<int64_t>(), lookup.numel(), out.data_ptr<int64_t>(),
      bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (flag_raised(bad)) report_id_out_of_range(op, "input_ids", ids, std::nullopt, lookup.numel(), "vocab_size", true);
  return out;
}

at::Tensor compress_ids_cuda(const at::Tensor& input_ids, const at::Tensor& lookup) {
  check_compress_args(input_ids, lookup);
  const c10::cuda::OptionalCUDAGuard guard(input_ids.device());
  return compress_into(input_ids.contiguous(), lookup.contiguous(), "compress_ids");
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
  at::Tensor canonical = compress_into(input_ids.contiguous(), table, "ngram_hash");

  // Reduction constants are built on the host (L*K values) and copied once.
  at::Tensor sizes = head_sizes.to(at::kCPU).contiguous();
  const int64_t* sizes_ptr = sizes.data_ptr<int64_t>();
  if (offsets.has_value()) {
    const at::Tensor host_offsets = offsets->to(at::kCPU).contiguous();
    check_head_table("ngram_hash", sizes_ptr, host_offsets.data_ptr<int64_t>(), L * K);
  } else {
    check_head_table("ngram_hash", sizes_ptr, nullptr, L * K);
  }
  std::vector<FastMod> mods(L * K);
  for (int64_t i = 0; i < L * K; ++i) mods[i] = FastMod::make(static_cast<uint64_t>(sizes_ptr[i]));
  static_assert(sizeof(FastMod) % sizeof(int64_t) == 0, "FastMod is copied as int64 words");
  const int64_t words = L * K * static_cast<int64_t>(sizeof(FastMod) / sizeof(int64_t));
  at::Tensor mods_dev =
      at::from_blob(mods.data(), {words}, at::TensorOptions().dtype(at::kLong)).to(input_ids.device());
  at::Tensor pad = table.index({pad_id}).to(at::kCPU);
  at::Tensor key_table = keys.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  at::Tensor out = at::empty({L, B, T, K}, input_ids.options());

  cuda::HashArgs args;
  args.canonical = canonical.data_ptr<int64_t>();
  args.batch = B;
  args.seq_len = T;
  args.pad = pad.item<int64_t>();
  args.num_layers = static_cast<int>(L);
  args.max_ngram_size = static_cast<int>(shape.max_ngram_size);
  args.heads_per_order = static_cast<int>(shape.heads_per_order);
  args.num_heads = static_cast<int>(K);
  args.xxh64 = shape.family == HashFamily::XXH64;
  args.keys = key_table.data_ptr<int64_t>();
  args.mods = reinterpret_cast<const FastMod*>(mods_dev.data_ptr<int64_t>());
  args.offsets = offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr;
  args.out = out.data_ptr<int64_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::ngram_hash_kernel<<<cuda::blocks_for(B * T), cuda::kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor multihead_embedding_cuda(const at::Tensor& weight, const at::Tensor& ids_in,
                                    const std::optional<at::Tensor>& offsets, bool /*sparse*/) {
  constexpr const char* op = "multihead_embedding";
  const int64_t K = check_embedding_args(op, weight, "weight", ids_in, offsets);
  ENGRAM_CHECK_DIM(op, "weight", weight, 2);
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  at::Tensor table = weight.contiguous();
  at::Tensor ids = ids_in.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t R = table.size(0), Dh = table.size(1), entries = ids.numel();
  std::vector<int64_t> out_shape(ids.sizes().begin(), ids.sizes().end());
  out_shape.push_back(Dh);
  at::Tensor out = at::empty(out_shape, table.options());
  at::Tensor bad = new_flag(ids);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "multihead_embedding_cuda", [&] {
    cuda::gather_rows_kernel<scalar_t><<<cuda::blocks_for(entries * Dh), cuda::kThreads, 0, stream>>>(
        table.const_data_ptr<scalar_t>(), R, Dh, ids.data_ptr<int64_t>(),
        offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr, K, entries, out.data_ptr<scalar_t>(),
        bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (flag_raised(bad)) report_id_out_of_range(op, "ids", ids, offsets, R, "weight.size(0)");
  return out;
}

at::Tensor multihead_embedding_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                             const std::optional<at::Tensor>& offsets, int64_t num_rows) {
  constexpr const char* op = "multihead_embedding_backward";
  const int64_t K = check_embedding_backward_args(grad_in, ids_in, offsets, num_rows);
  const c10::cuda::OptionalCUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous();
  at::Tensor ids = ids_in.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t Dh = grad.size(-1), entries = ids.numel();
  at::Tensor bad = new_flag(ids);
  at::Tensor result;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multihead_embedding_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor acc = at::zeros({num_rows, Dh}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    cuda::scatter_add_rows_kernel<scalar_t, acc_t><<<cuda::blocks_for(entries * Dh), cuda::kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), num_rows, Dh, ids.data_ptr<int64_t>(),
        offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr, K, entries, acc.data_ptr<acc_t>(),
        bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    result = acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
  });
  if (flag_raised(bad)) report_id_out_of_range(op, "ids", ids, offsets, num_rows, "num_rows");
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("compress_ids", &compress_ids_cuda);
  m.impl("ngram_hash", &ngram_hash_cuda);
  m.impl("multihead_embedding", &multihead_embedding_cuda);
  m.impl("multihead_embedding_backward", &multihead_embedding_backward_cuda);
}

}  // namespace engram
