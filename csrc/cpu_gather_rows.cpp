// CPU kernel of engram::gather_rows (schema in csrc/library.cpp): out = table[rows],
// row by row with memcpy over 64-bit offsets (tables beyond 2^31 elements).
// The op exists for its CUDA kernel (zero-copy reads of pinned host rows,
// csrc/cuda/ops.cu); on the CPU it is the same gather the engine does.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "csrc/checks.h"

namespace engram {
namespace {

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

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("gather_rows", &gather_rows_cpu); }

}  // namespace engram
