// Calls engram ops through the dispatcher from a program without Python:
// prints compress_ids of argv's ids, then the c10::Error of an id out of range.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <vector>

#include <engram/runtime.h>

int main(int argc, char** argv) {
  if (engram_ops_abi_version() != ENGRAM_OPS_ABI_VERSION) {
    std::cerr << "op library ABI " << engram_ops_abi_version() << ", header " << ENGRAM_OPS_ABI_VERSION << "\n";
    return 2;
  }
  std::vector<int64_t> ids;
  for (int i = 1; i < argc; ++i) ids.push_back(std::atoll(argv[i]));
  auto compress = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("engram::compress_ids", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const at::Tensor lookup = torch::tensor({3, 3, 1, 0, 2}, torch::kLong);
  const at::Tensor out = compress.call(torch::tensor(ids, torch::kLong), lookup);
  for (int64_t i = 0; i < out.numel(); ++i) std::cout << out[i].item<int64_t>() << (i + 1 < out.numel() ? " " : "\n");
  try {
    compress.call(torch::tensor({7}, torch::kLong), lookup);
    std::cout << "no error\n";
  } catch (const c10::Error& e) {
    std::cout << "c10::Error: " << e.what_without_backtrace() << "\n";
  }
  return 0;
}
