// Prime table sizes of spec §2 (host only; runs once per config).
#pragma once

#include <cstdint>
#include <set>
#include <vector>

namespace engram {

inline bool is_prime(uint64_t n) {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (uint64_t f = 3; f <= n / f; f += 2)
    if (n % f == 0) return false;
  return true;
}

// Smallest prime > start that is not in `taken`.
inline uint64_t next_free_prime(uint64_t start, const std::set<uint64_t>& taken) {
  uint64_t p = start + 1;
  while (!is_prime(p) || taken.count(p)) ++p;
  return p;
}

// Head sizes for `num_layers` Engram layers, in configured layer order:
// result[l] holds (N-1)*H primes, order-major then head. One set of primes is
// shared by all layers and orders, so every head of every layer is distinct.
inline std::vector<std::vector<uint64_t>> head_primes(const std::vector<uint64_t>& min_size_per_order,
                                                      int heads_per_order, int num_layers) {
  std::set<uint64_t> seen;
  std::vector<std::vector<uint64_t>> result(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    for (uint64_t min_size : min_size_per_order) {
      uint64_t start = min_size - 1;
      for (int h = 0; h < heads_per_order; ++h) {
        uint64_t p = next_free_prime(start, seen);
        seen.insert(p);
        result[l].push_back(p);
        start = p;
      }
    }
  }
  return result;
}

}  // namespace engram
