// Times engram::EngramLayer::forward on the layer and inputs that
// `make_fixtures.py DIR --bench` saved (DIR/bench.pt), next to the Python
// eager time measured there, and checks the output is Python's bit for bit.
// Usage: cpp_api_bench DIR [repeats]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <vector>

#include <engram/layer.h>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " DIR [repeats]\n";
    return 2;
  }
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 30;
  std::ifstream in(std::string(argv[1]) + "/bench.pt", std::ios::binary);
  const std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto bench = torch::pickle_load(data).toGenericDict();
  engram::EngramLayer layer = engram::load_layer(bench.at("layer").toStringRef());
  const at::Tensor hidden = bench.at("hidden").toTensor(), ids = bench.at("input_ids").toTensor();
  torch::InferenceMode guard;
  at::Tensor out;
  for (int i = 0; i < 3; ++i) out = layer->forward(hidden, ids);
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    layer->forward(hidden, ids);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  const double low = times.front(), median = times[times.size() / 2];
  const double python_low = bench.at("python_min_s").toDouble(), python_median = bench.at("python_median_s").toDouble();
  const bool same = torch::equal(out, bench.at("output").toTensor());
  std::cout << "C++ forward: min " << low * 1e3 << " ms, median " << median * 1e3 << " ms over " << repeats
            << " runs, " << at::get_num_threads() << " threads; C++/Python (last Python run): min "
            << low / python_low << ", median " << median / python_median << "; output "
            << (same ? "bit-identical to Python" : "DIFFERS from Python") << "\n";
  return same ? 0 : 1;
}
