// The engram operator library: every schema, in one TORCH_LIBRARY (the
// argument checks are in csrc/checks.cpp, the kernels in the device files),
// and the CUDA sync-check switch, here so that CPU builds have it too.
#include <torch/library.h>

#include <atomic>

#include "csrc/runtime.h"

namespace engram {

namespace {
std::atomic<bool> cuda_sync_checks_enabled{false};
}  // namespace

void set_cuda_sync_checks(bool enabled) { cuda_sync_checks_enabled.store(enabled); }

bool cuda_sync_checks() { return cuda_sync_checks_enabled.load(); }

#if !defined(ENGRAM_WITH_CUDA)
CudaError take_cuda_error() { return {}; }
#endif

}  // namespace engram

TORCH_LIBRARY(engram, m) {
  // Token ids -> canonical ids (spec §1); negative ids pass through.
  m.def("compress_ids(Tensor input_ids, Tensor lookup) -> Tensor");
  // Compress + shift + mix + mod (+ offsets) for L layers in one pass:
  // input_ids [B, T] -> [L, B, T, K]. keys: [L, N] multipliers ("deepseek")
  // or [L, N-1] per-order seeds ("xxh64"); head_sizes, offsets: [L, K].
  m.def(
      "ngram_hash(Tensor input_ids, Tensor lookup, Tensor keys, Tensor head_sizes, Tensor? offsets, "
      "int pad_id, str family) -> Tensor");
  // weight [R, Dh], ids [..., K] (+ offsets [K]) -> [..., K, Dh]. `sparse`
  // only selects the gradient layout, as in aten::embedding.
  m.def("multihead_embedding(Tensor weight, Tensor ids, Tensor? offsets, bool sparse=False) -> Tensor");
  // Dense gradient of the table: scatter-add of grad [..., K, Dh] into [R, Dh].
  m.def("multihead_embedding_backward(Tensor grad, Tensor ids, Tensor? offsets, SymInt num_rows) -> Tensor");
  // Context gate of spec §5 for G branches: key, hidden [B, T, G, D] (last dim
  // contiguous, other strides free), norm weights [G, D] -> gate [B, T, G].
  // eps=None: the dtype's machine epsilon, as nn.RMSNorm(D).
  m.def(
      "context_gate(Tensor key, Tensor hidden, Tensor key_norm_weight, Tensor hidden_norm_weight, "
      "float? eps=None) -> Tensor");
  // -> (grad_key, grad_hidden, grad_key_norm_weight, grad_hidden_norm_weight)
  m.def(
      "context_gate_backward(Tensor grad_gate, Tensor key, Tensor hidden, Tensor key_norm_weight, "
      "Tensor hidden_norm_weight, float? eps=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gated short-convolution block of spec §5-6: value [B, T, D] (shared by the
  // branches), gate [B, T, G] -> out [B, T, G, D] with x = gate * value,
  // out = x + SiLU(causal depthwise conv over T of RMSNorm_g(x)), channel
  // g*D + c; conv_weight [G*D, kernel_size], tap i reads t - (kernel_size-1-i)*dilation.
  m.def(
      "gated_short_conv(Tensor value, Tensor gate, Tensor norm_weight, Tensor conv_weight, int dilation, "
      "float eps) -> Tensor");
  // -> (grad_value, grad_gate, grad_norm_weight, grad_conv_weight)
  m.def(
      "gated_short_conv_backward(Tensor grad_out, Tensor value, Tensor gate, Tensor norm_weight, "
      "Tensor conv_weight, int dilation, float eps) -> (Tensor, Tensor, Tensor, Tensor)");

  // --- engram.optim: row-wise sparse table optimizers (csrc/cpu_optim.cpp,
  // csrc/cuda/optim.cu, kernels/optim_math.h) ---------------------------------
  // Touched rows of a table and their summed gradients: grad [..., K, Dh],
  // ids [..., K] (+ offsets [K]) -> (rows [U] int64, strictly increasing;
  // row_grads [U, Dh], each row's entries summed in entry order in opmath).
  m.def("dedup_row_grads(Tensor grad, Tensor ids, Tensor? offsets, SymInt num_rows) -> (Tensor, Tensor)");
  // The same, sized by the entries instead of the distinct rows, so that CUDA
  // needs no host sync (a training step can then be captured in a CUDA graph):
  // rows [E] (E = ids.numel()), the U distinct rows then E - U padding rows of
  // -1; row_grads [E, Dh], zero in the padding. The first U rows equal
  // dedup_row_grads' output (bit for bit on the CPU). On CUDA a row outside
  // the table is reported like every deferred CUDA error and all rows are -1.
  // The rowwise_*_update ops skip a -1 suffix on the CPU.
  m.def("dedup_row_grads_padded(Tensor grad, Tensor ids, Tensor? offsets, SymInt num_rows) -> (Tensor, Tensor)");
  // In-place updates of the rows `rows` (strictly increasing, as
  // dedup_row_grads returns them) of weight [R, Dh] and its state, given their
  // summed gradients row_grads [U, Dh]; rules in kernels/optim_math.h.
  m.def(
      "rowwise_sgd_update(Tensor(a!) weight, Tensor rows, Tensor row_grads, float lr, float weight_decay=0.0) "
      "-> ()");
  // sum_sq [R]: one accumulator per row (FBGEMM's row-wise Adagrad).
  m.def(
      "rowwise_adagrad_update(Tensor(a!) weight, Tensor(b!) sum_sq, Tensor rows, Tensor row_grads, float lr, "
      "float eps, float weight_decay=0.0) -> ()");
  // exp_avg, exp_avg_sq [R, Dh]; step = this update's number (1, 2, ...) for
  // the bias corrections; decoupled_weight_decay: AdamW. step_count: that
  // number as a 0-dim int64 tensor on weight's device instead (step=0),
  // read by the kernel: a captured CUDA graph then replays each replay's count.
  m.def(
      "rowwise_adam_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, "
      "Tensor row_grads, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, int step, Tensor? step_count=None) -> ()");
  // --- end engram.optim ---------------------------------------------------------

  // --- engram.Prefetcher (csrc/cpu_hash_embedding_ops.cpp, csrc/cuda/hash_embedding_ops.cu) ---
  // table [R, Dh] (on the CPU: pinned for the CUDA kernel, which reads it over
  // UVA) and rows [...] int64 -> table[rows] [..., Dh] on the rows' device.
  // check=False: the CUDA kernel neither reports nor reads an out-of-range
  // row (zeros); check=True reports it like every CUDA id error.
  m.def("gather_rows(Tensor table, Tensor rows, bool check=True) -> Tensor");
}
