// CUDA launchers of the Engram layer ops (spec §5-6): checks, guard, stream,
// allocation; the kernels are in kernels/layer_cuda.cuh. Nothing here waits
// for the device (no .item(), no copies to the host), so the ops can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "csrc/checks.h"
#include "csrc/layer_helpers.h"
#include "kernels/layer_cuda.cuh"

namespace engram {
namespace {

using cuda_layer::blocks_for;
using cuda_layer::kRowLanes;
using cuda_layer::kThreads;

// Stage 2 of a weight-gradient sum: partial [chunks, n] (acc_t) -> [n] in the
// dtype of `like`.
template <typename scalar_t>
at::Tensor sum_chunks(const at::Tensor& partial, const at::Tensor& like, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = partial.size(0), n = partial.size(1);
  at::Tensor total = at::empty({n}, like.options());
  cuda_layer::sum_chunks_kernel<acc_t, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), chunks, n, total.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

// ---------------------------------------------------------------------------
// context gate
// ---------------------------------------------------------------------------

template <typename scalar_t>
cuda_layer::GateArgs<scalar_t> gate_args(const at::Tensor& key, const at::Tensor& hidden, const at::Tensor& wk,
                                         const at::Tensor& wq) {
  // Rows4::row splits row indices, and the weight partials G * D, in 32 bits.
  TORCH_CHECK(key.size(0) * key.size(1) * key.size(2) <= INT32_MAX && key.size(2) * key.size(3) <= INT32_MAX,
              "context_gate: B * T * G and G * D must be at most 2^31 - 1 on CUDA, got ", key.sizes());
  return {rows4<scalar_t>(key), rows4<scalar_t>(hidden), wk.const_data_ptr<scalar_t>(),
          wq.const_data_ptr<scalar_t>(), key.size(0) * key.size(1) * key.size(2), key.size(2), key.size(3)};
}

at::Tensor context_gate_cuda(const at::Tensor& key_in, const at::Tensor& hidden_in, const at::Tensor& key_norm_weight,
                             const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  const auto shape =
      check_context_gate_args("context_gate", key_in, hidden_in, key_norm_weight, hidden_norm_weight, eps);
  const c10::cuda::OptionalCUDAGuard guard(key_in.device());
  const int64_t B = shape[0], T = shape[1], G = shape[2];
  const at::Tensor key = rows_contiguous(key_in), hidden = rows_contiguous(hidden_in);
  const at::Tensor wk = key_norm_weight.contiguous(), wq = hidden_norm_weight.contiguous();
  at::Tensor gate = at::empty({B, T, G}, key.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "context_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = gate_args<scalar_t>(key, hidden, wk, wq);
    cuda_layer::context_gate_kernel<scalar_t, acc_t><<<blocks_for(args.rows * kRowLanes), kThreads, 0, stream>>>(
        args, resolve_eps<scalar_t>(eps), gate.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gate;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> context_gate_backward_cuda(
    const at::Tensor& grad_gate_in, const at::Tensor& key_in, const at::Tensor& hidden_in,
    const at::Tensor& key_norm_weight, const at::Tensor& hidden_norm_weight, std::optional<double> eps) {
  constexpr const char* op = "context_gate_backward";
  const auto shape = check_context_gate_args(op, key_in, hidden_in, key_norm_weight, hidden_norm_weight, eps);
  const int64_t B = shape[0], T = shape[1], G = shape[2], D = shape[3];
  check_grad_like(op, "grad_gate", grad_gate_in, key_in, {B, T, G});
  const c10::cuda::OptionalCUDAGuard guard(key_in.device());
  const at::Tensor grad_gate = grad_gate_in.contiguous();
  const at::Tensor key = rows_contiguous(key_in), hidden = rows_contiguous(hidden_in);
  const at::Tensor wk = key_norm_weight.contiguous(), wq = hidden_norm_weight.contiguous();
  at::Tensor grad_key = at::empty({B, T, G, D}, key.options());
  at::Tensor grad_hidden = at::empty({B, T, G, D}, key.options());
  at::Tensor grad_key_weight, grad_hidden_weight;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "context_gate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = gate_args<scalar_t>(key, hidden, wk, wq);
    const auto acc_options = key.options().dtype(acc_dtype<scalar_t>());
    at::Tensor stats = at::empty({args.rows, cuda_layer::kGateStats}, acc_options);
    cuda_layer::context_gate_backward_rows_kernel<scalar_t, acc_t>
        <<<blocks_for(args.rows * kRowLanes), kThreads, 0, stream>>>(
            args, grad_gate.const_data_ptr<scalar_t>(), resolve_eps<scalar_t>(eps), grad_key.data_ptr<scalar_t>(),
            grad_hidden.data_ptr<scalar_t>(), stats.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t tokens = B * T;
    const int64_t chunks = cuda_layer::chunk_count(tokens, cuda_layer::kTokensPerChunk);
    at::Tensor partial = at::empty({chunks, 2 * G * D}, acc_options);
    cuda_layer::context_gate_weight_partials_kernel<scalar_t, acc_t>
        <<<dim3(blocks_for(G * D), cuda_layer::token_blocks(chunks), 2), kThreads, 0, stream>>>(args, stats.const_data_ptr<acc_t>(), tokens,
                                                               cuda_layer::kTokensPerChunk, chunks,
                                                               partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor weight_grads = sum_chunks<scalar_t>(partial, key, stream).view({2, G, D});
    grad_key_weight = weight_grads[0].clone();
    grad_hidden_weight = weight_grads[1].clone();
  });
  return {grad_key, grad_hidden, grad_key_weight, grad_hidden_weight};
}

// ---------------------------------------------------------------------------
// gated short convolution
// ---------------------------------------------------------------------------

template <typename scalar_t>
cuda_layer::ShortConvArgs<scalar_t> short_conv_args(const std::array<int64_t, 5>& shape, const at::Tensor& value,
                                                    const at::Tensor& gate, const at::Tensor& norm_weight,
                                                    const at::Tensor& conv_weight, int64_t dilation) {
  const int64_t B = shape[0], T = shape[1], G = shape[2], D = shape[3], K = shape[4];
  // The kernels index tokens, (token, branch) rows and channels in 32 bits.
  TORCH_CHECK(B * T * G <= INT32_MAX, "gated_short_conv: B * T * G must be at most 2^31 - 1 on CUDA, got B=", B,
              ", T=", T, ", G=", G);
  TORCH_CHECK(G * D <= INT32_MAX, "gated_short_conv: G * D must be at most 2^31 - 1 on CUDA, got G=", G, ", D=", D);
  // A tap whose lag reaches past the sequence start reads only zeros, so any
  // dilation >= T gives the result of dilation T (and lags stay small).
  return {value.const_data_ptr<scalar_t>(), value.stride(0), value.stride(1), gate.const_data_ptr<scalar_t>(),
          norm_weight.const_data_ptr<scalar_t>(), conv_weight.const_data_ptr<scalar_t>(), B, T, G, D, G * D, K,
          std::min(dilation, T)};
}

// scales [tokens, G] (acc_t) = 1 / rms(gate * value).
template <typename scalar_t>
at::Tensor gated_rms_scales(const cuda_layer::ShortConvArgs<scalar_t>& args, double eps, const at::Tensor& like,
                            cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor scales = at::empty({args.tokens(), args.G}, like.options().dtype(acc_dtype<scalar_t>()));
  cuda_layer::gated_rms_scales_kernel<scalar_t, acc_t><<<blocks_for(args.tokens() * kRowLanes), kThreads, 0, stream>>>(
      args, static_cast<acc_t>(eps), scales.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scales;
}

at::Tensor gated_short_conv_cuda(const at::Tensor& value_in, const at::Tensor& gate_in, const at::Tensor& norm_weight,
                                 const at::Tensor& conv_weight, int64_t dilation, double eps) {
  const auto shape =
      check_gated_short_conv_args("gated_short_conv", value_in, gate_in, norm_weight, conv_weight, dilation, eps);
  const c10::cuda::OptionalCUDAGuard guard(value_in.device());
  const at::Tensor value = rows_contiguous(value_in), gate = gate_in.contiguous();
  const at::Tensor w = norm_weight.contiguous(), taps = conv_weight.contiguous();
  at::Tensor out = at::empty({shape[0], shape[1], shape[2], shape[3]}, value.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "gated_short_conv_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = short_conv_args<scalar_t>(shape, value, gate, w, taps, dilation);
    const at::Tensor scales = gated_rms_scales(args, eps, value, stream);
    cuda_layer::gated_short_conv_kernel<scalar_t, acc_t>
        <<<dim3(blocks_for(args.D), cuda_layer::token_blocks(args.tokens())), kThreads, 0, stream>>>(
        args, scales.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_short_conv_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& gate_in,
    const at::Tensor& norm_weight, const at::Tensor& conv_weight, int64_t dilation, double eps) {
  constexpr const char* op = "gated_short_conv_backward";
  const auto shape = check_gated_short_conv_args(op, value_in, gate_in, norm_weight, conv_weight, dilation, eps);
  const int64_t B = shape[0], T = shape[1], G = shape[2], D = shape[3], K = shape[4], C = G * D;
  check_grad_like(op, "grad_out", grad_out_in, value_in, {B, T, G, D});
  const c10::cuda::OptionalCUDAGuard guard(value_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor value = rows_contiguous(value_in), gate = gate_in.contiguous();
  const at::Tensor w = norm_weight.contiguous(), taps = conv_weight.contiguous();
  at::Tensor grad_value = at::empty({B, T, D}, value.options());
  at::Tensor grad_gate = at::empty({B, T, G}, value.options());
  at::Tensor grad_norm_weight, grad_conv_weight;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "gated_short_conv_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = short_conv_args<scalar_t>(shape, value, gate, w, taps, dilation);
    const auto acc_options = value.options().dtype(acc_dtype<scalar_t>());
    const int64_t tokens = B * T;
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const at::Tensor scales = gated_rms_scales(args, eps, value, stream);
    const acc_t* scale_ptr = scales.const_data_ptr<acc_t>();

    // dy = d loss / d conv output (before SiLU), du = d loss / d conv input.
    at::Tensor dy = at::empty({tokens, C}, acc_options);
    at::Tensor du = at::empty({tokens, C}, acc_options);
    cuda_layer::short_conv_grad_y_kernel<scalar_t, acc_t>
        <<<dim3(blocks_for(D), cuda_layer::token_blocks(tokens)), kThreads, 0, stream>>>(
        args, scale_ptr, go, dy.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda_layer::short_conv_grad_u_kernel<scalar_t, acc_t>
        <<<dim3(blocks_for(D), cuda_layer::token_blocks(tokens)), kThreads, 0, stream>>>(
        args, dy.const_data_ptr<acc_t>(), du.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    at::Tensor projection = at::empty({tokens, G}, acc_options);
    cuda_layer::short_conv_norm_rows_kernel<scalar_t, acc_t>
        <<<blocks_for(tokens * G * kRowLanes), kThreads, 0, stream>>>(args, scale_ptr, du.const_data_ptr<acc_t>(),
                                                                      go, grad_gate.data_ptr<scalar_t>(),
                                                                      projection.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda_layer::short_conv_grad_value_kernel<scalar_t, acc_t>
        <<<dim3(blocks_for(D), cuda_layer::token_blocks(tokens)), kThreads, 0, stream>>>(
        args, scale_ptr, du.const_data_ptr<acc_t>(), go, projection.const_data_ptr<acc_t>(),
        grad_value.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t chunks = cuda_layer::chunk_count(tokens, cuda_layer::kTokensPerChunk);
    at::Tensor partial = at::empty({chunks, (K + 1) * C}, acc_options);
    TORCH_CHECK(K + 1 <= 65535, op, ": kernel_size must be below 65535 on CUDA, got ", K);
    cuda_layer::short_conv_weight_partials_kernel<scalar_t, acc_t>
        <<<dim3(blocks_for(C), cuda_layer::token_blocks(chunks), static_cast<unsigned>(K + 1)), kThreads, 0,
           stream>>>(args, scale_ptr, dy.const_data_ptr<acc_t>(),
                                                               du.const_data_ptr<acc_t>(),
                                                               cuda_layer::kTokensPerChunk, chunks,
                                                               partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor weight_grads = sum_chunks<scalar_t>(partial, value, stream);
    // [K, C] tap-major -> [C, K], the layout of conv_weight.
    grad_conv_weight = weight_grads.narrow(0, 0, K * C).view({K, C}).t().contiguous();
    grad_norm_weight = weight_grads.narrow(0, K * C, C).view({G, D}).clone();
  });
  return {grad_value, grad_gate, grad_norm_weight, grad_conv_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("context_gate", &context_gate_cuda);
  m.impl("context_gate_backward", &context_gate_backward_cuda);
  m.impl("gated_short_conv", &gated_short_conv_cuda);
  m.impl("gated_short_conv_backward", &gated_short_conv_backward_cuda);
}

}  // namespace engram
