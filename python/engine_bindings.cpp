// engram._engine: pybind11 bindings for the torch-free helpers that are not
// operators (the op library stays dispatcher-only).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "kernels/hash.h"
#include "kernels/primes.h"

namespace py = pybind11;

namespace engram {
void bind_prefetch(py::module_& m);  // python/prefetch.cpp
}

PYBIND11_MODULE(_engine, m) {
  m.doc() = "engram helpers that are not operators";
  engram::bind_prefetch(m);
  m.def("head_primes", &engram::head_primes, py::arg("min_size_per_order"), py::arg("heads_per_order"),
        py::arg("num_layers"),
        "Distinct prime head sizes of spec §2, one list of (N-1)*H primes per layer in configured order.");
  m.def(
      "xxh64",
      [](py::bytes data, uint64_t seed) {
        std::string s = data;
        return engram::xxh64(reinterpret_cast<const uint8_t*>(s.data()), s.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0, "XXH64 of a byte string (the kernels' implementation).");
  m.def("xxh64_ngram_seed", &engram::xxh64_ngram_seed, py::arg("seed"), py::arg("layer_id"), py::arg("order"),
        "Seed of the xxh64 n-gram hash for one (seed, layer id, order).");
}
