// CPU kernels of the hash and embedding ops (compress_ids, ngram_hash,
// multihead_embedding and its backward) and of gather_rows: validation,
// allocation and threading here, per-token math in kernels/.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "csrc/checks.h"
#include "csrc/runtime.h"
#include "kernels/hash.h"
#include "kernels/hash_cpu.h"

namespace engram {
namespace {

// Tokens per parallel_for chunk: hashing one token costs ~100 ns.
constexpr int64_t kHashGrain = 512;
// (token, head) rows per chunk for the gather.
constexpr int64_t kGatherGrain = 2048;

// Maps ids through lookup into `out` (may alias nothing); returns false if an
// id is >= the vocabulary. Negative ids pass through, as in the reference.
bool compress_into(const int64_t* ids, int64_t n, const int64_t* lookup, int64_t vocab, int64_t* out) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    bool chunk_ok = true;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t id = ids[i];
      if (id >= vocab) {
        chunk_ok = false;
        out[i] = 0;
      } else {
        out[i] = id >= 0 ? lookup[id] : id;
      }
    }
    if (!chunk_ok) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

at::Tensor compress_ids_cpu(const at::Tensor& input_ids, const at::Tensor& lookup) {
  check_compress_args(input_ids, lookup);
  at::Tensor ids = input_ids.contiguous();
  at::Tensor table = lookup.contiguous();
  at::Tensor out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  if (!compress_into(ids.data_ptr<int64_t>(), ids.numel(), table.data_ptr<int64_t>(), table.numel(),
                     out.data_ptr<int64_t>())) {
    report_id_out_of_range({"compress_ids", "input_ids", "vocab_size", true}, ids, std::nullopt, table.numel());
  }
  return out;
}

at::Tensor ngram_hash_cpu(const at::Tensor& input_ids, const at::Tensor& lookup, const at::Tensor& keys,
                          const at::Tensor& head_sizes, const std::optional<at::Tensor>& offsets, int64_t pad_id,
                          c10::string_view family) {
  const NgramHashShape shape =
      check_ngram_hash_args(input_ids, lookup, keys, head_sizes, offsets, pad_id, std::string_view(family.data(), family.size()));
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const int64_t L = shape.num_layers, K = shape.num_heads;
  const int N = static_cast<int>(shape.max_ngram_size), H = static_cast<int>(shape.heads_per_order);

  at::Tensor ids = input_ids.contiguous();
  at::Tensor table = lookup.contiguous();
  at::Tensor canonical = at::empty({B, T}, ids.options());
  int64_t* x = canonical.data_ptr<int64_t>();
  if (!compress_into(ids.data_ptr<int64_t>(), B * T, table.data_ptr<int64_t>(), table.numel(), x)) {
    report_id_out_of_range({"ngram_hash", "input_ids", "vocab_size", true}, ids, std::nullopt, table.numel());
  }
  at::Tensor sizes = head_sizes.contiguous();
  const int64_t* sizes_ptr = sizes.data_ptr<int64_t>();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  check_head_table("ngram_hash", sizes_ptr, offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr, L * K);
  const cpu::HeadConstants heads(sizes_ptr, L * K);  // per call: L*K divisions, negligible
  at::Tensor key_table = keys.contiguous();
  at::Tensor out = at::empty({L, B, T, K}, ids.options());

  cpu::HashPlan plan;
  plan.canonical = x;
  plan.batch = B;
  plan.seq_len = T;
  plan.pad = table.data_ptr<int64_t>()[pad_id];
  plan.num_layers = static_cast<int>(L);
  plan.max_ngram_size = N;
  plan.heads_per_order = H;
  plan.num_heads = static_cast<int>(K);
  plan.xxh64 = shape.family == HashFamily::XXH64;
  // deepseek keys are int64 multipliers; xxh64 keys are uint64 seeds stored as int64 bit patterns.
  plan.multipliers = key_table.data_ptr<int64_t>();
  plan.seeds = reinterpret_cast<const uint64_t*>(key_table.data_ptr<int64_t>());
  plan.offsets = offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr;
  heads.attach(plan);
  plan.out = out.data_ptr<int64_t>();
  plan.stream_output = cpu::stream_output_ok(plan);

  // avx2 and avx512 reduce in exact double arithmetic when every head allows
  // it (kernels/hash_cpu.h); otherwise, and at the scalar level, Barrett.
  const cpu::CpuIsa isa = cpu::hash_isa(cpu::current_cpu_isa(), heads);
  at::parallel_for(0, B * T, kHashGrain, [&](int64_t begin, int64_t end) {
    cpu::hash_tokens(plan, isa, begin, end);
  });
  return out;
}

// Row index of (token, head) entry e, or -1 if out of range (an id plus
// offset that overflows included).
inline int64_t table_row(const int64_t* ids, const int64_t* offsets, int64_t K, int64_t e, int64_t num_rows) {
  int64_t row = ids[e];
  if (offsets && __builtin_add_overflow(row, offsets[e % K], &row)) return -1;
  return (row >= 0 && row < num_rows) ? row : -1;
}

at::Tensor multihead_embedding_cpu(const at::Tensor& weight, const at::Tensor& ids_in,
                                   const std::optional<at::Tensor>& offsets, bool /*sparse*/) {
  const int64_t K = check_multihead_embedding_args(weight, ids_in, offsets);
  at::Tensor table = weight.contiguous();
  at::Tensor ids = ids_in.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t* offset_ptr = offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr;
  const int64_t R = table.size(0), Dh = table.size(1);
  std::vector<int64_t> out_shape(ids.sizes().begin(), ids.sizes().end());
  out_shape.push_back(Dh);
  at::Tensor out = at::empty(out_shape, table.options());
  const int64_t entries = ids.numel();
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  const size_t row_bytes = static_cast<size_t>(Dh) * table.element_size();
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  std::atomic<bool> ok{true};
  at::parallel_for(0, entries, kGatherGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t row = table_row(id_ptr, offset_ptr, K, e, R);
      if (row < 0) {
        ok.store(false, std::memory_order_relaxed);
        std::memset(dst + e * row_bytes, 0, row_bytes);
        continue;
      }
      std::memcpy(dst + e * row_bytes, src + row * row_bytes, row_bytes);
    }
  });
  if (!ok.load()) report_id_out_of_range({"multihead_embedding", "ids", "weight.size(0)"}, ids, offsets, R);
  return out;
}

// A zero [rows, Dh] tensor for a dense table gradient, which is hundreds of MB
// for real tables. calloc hands out pages the OS has already zeroed (glibc
// maps large blocks and skips the memset), and on Linux the block asks for
// transparent huge pages, which cut the first-touch page faults ~500x (2 MiB
// instead of 4 KiB pages), as PyTorch's allocator does under
// THP_MEM_ALLOC_ENABLE=1. Small blocks come from the heap and calloc zeroes them.
at::Tensor zeros_table_gradient(int64_t rows, int64_t Dh, const at::TensorOptions& options) {
  const size_t bytes = std::max<size_t>(static_cast<size_t>(rows) * static_cast<size_t>(Dh) *
                                            c10::elementSize(c10::typeMetaToScalarType(options.dtype())),
                                        1);
  void* data = std::calloc(bytes, 1);
  TORCH_CHECK(data != nullptr, "multihead_embedding_backward: could not allocate ", bytes,
              " bytes for the table gradient [", rows, ", ", Dh, "]");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = (begin + bytes) & ~(kHugePage - 1);
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);  // a hint only
  }
#endif
  return at::from_blob(data, {rows, Dh}, [](void* p) { std::free(p); }, options);
}

at::Tensor multihead_embedding_backward_cpu(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                            const std::optional<at::Tensor>& offsets, int64_t num_rows) {
  const int64_t K = check_embedding_backward_args(grad_in, ids_in, offsets, num_rows);
  at::Tensor grad = grad_in.contiguous();
  at::Tensor ids = ids_in.contiguous();
  at::Tensor offset_table = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t* offset_ptr = offsets.has_value() ? offset_table.data_ptr<int64_t>() : nullptr;
  const int64_t Dh = grad.size(-1);
  const int64_t entries = ids.numel();
  const int64_t* id_ptr = ids.data_ptr<int64_t>();

  at::Tensor result = zeros_table_gradient(num_rows, Dh, grad.options());
  std::atomic<bool> ok{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multihead_embedding_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* result_ptr = result.data_ptr<scalar_t>();
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    // Each thread owns a contiguous range of rows: it collects the entries
    // that hit them and sums each row's entries in entry order in opmath
    // precision (many tokens can share a row), then stores the row once. No
    // two threads write one row: deterministic, lock-free, and no
    // [num_rows, Dh] float buffer for reduced dtypes.
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), num_rows);
    at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
      std::vector<std::pair<int64_t, int64_t>> hits;  // (row, entry)
      std::vector<acc_t> row_sum(Dh);
      for (int64_t part = part_begin; part < part_end; ++part) {
        // Rows [row_begin, row_end) of an even split, without num_rows * part (which may overflow).
        const int64_t row_begin = part * (num_rows / parts) + std::min(part, num_rows % parts);
        const int64_t row_end = row_begin + num_rows / parts + (part < num_rows % parts ? 1 : 0);
        hits.clear();
        for (int64_t e = 0; e < entries; ++e) {
          const int64_t row = table_row(id_ptr, offset_ptr, K, e, num_rows);
          if (row < 0) {
            ok.store(false, std::memory_order_relaxed);
            continue;
          }
          if (row >= row_begin && row < row_end) hits.emplace_back(row, e);
        }
        std::sort(hits.begin(), hits.end());
        for (size_t first = 0; first < hits.size();) {
          const int64_t row = hits[first].first;
          std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
          size_t next = first;
          for (; next < hits.size() && hits[next].first == row; ++next) {
            const scalar_t* src = grad_ptr + hits[next].second * Dh;
            for (int64_t d = 0; d < Dh; ++d) row_sum[d] += static_cast<acc_t>(src[d]);
          }
          scalar_t* dst = result_ptr + row * Dh;
          for (int64_t d = 0; d < Dh; ++d) dst[d] = static_cast<scalar_t>(row_sum[d]);
          first = next;
        }
      }
    });
  });
  if (!ok.load()) report_id_out_of_range({"multihead_embedding_backward", "ids", "num_rows"}, ids, offsets, num_rows);
  return result;
}

// out = table[rows], row by row with memcpy over 64-bit offsets (tables
// beyond 2^31 elements). The op exists for its CUDA kernel (zero-copy reads
// of pinned host rows, csrc/cuda/hash_embedding_ops.cu); on the CPU it is the
// same gather the prefetch engine does.
at::Tensor gather_rows_cpu(const at::Tensor& table, const at::Tensor& rows_in, bool check) {
  (void)check;  // rows are always checked here: it costs no sync on the CPU
  const std::vector<int64_t> shape = check_gather_rows_args(table, rows_in);
  TORCH_CHECK(table.device().is_cpu(), "gather_rows: table is on ", table.device(),
              " but rows is on the CPU; expected a CPU table");
  const at::Tensor rows = rows_in.contiguous();
  at::Tensor out = at::empty(shape, table.options());
  const int64_t n = rows.numel(), num_rows = table.size(0);
  const int64_t* row = rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(row[i] >= 0 && row[i] < num_rows,
                      id_out_of_range_message({"gather_rows", "rows", "table.size(0)"}, row[i], i, num_rows));
  }
  const size_t row_bytes = static_cast<size_t>(table.size(1)) * table.element_size();
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + static_cast<size_t>(i) * row_bytes, src + static_cast<size_t>(row[i]) * row_bytes,
                  row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("compress_ids", &compress_ids_cpu);
  m.impl("ngram_hash", &ngram_hash_cpu);
  m.impl("multihead_embedding", &multihead_embedding_cpu);
  m.impl("multihead_embedding_backward", &multihead_embedding_backward_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
}

}  // namespace engram
