// engram::EngramConfig, engram::CompressionTable and engram::NgramHasher: the
// C++ mirrors of engram.EngramConfig, engram.CompressionTable and
// engram.NgramHasher (engram/config.py, compression.py, hashing.py).
//
// Header-only, LibTorch-only C++17. The hash parameters (multipliers, prime
// head sizes, xxh64 seeds) are derived from the config exactly as Python
// derives them, numpy's default_rng included, and the ids come from the same
// engram::ngram_hash operator: equal configs give bit-identical ids. Bad
// arguments raise c10::Error subclasses whose messages equal Python's.
#ifndef ENGRAM_HASHER_H_
#define ENGRAM_HASHER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "engram/ops.h"

namespace engram {

// Vocabulary of the reference release's tokenizer (DeepSeek-V3): the identity
// compression of a layer built without a CompressionTable.
constexpr int64_t kDefaultVocabSize = 129280;

namespace detail {

// Python's repr() of the values that messages quote, so that C++ and Python
// messages are equal.
inline std::string py_repr(int64_t v) { return std::to_string(v); }
inline std::string py_repr(const std::string& s) {
  const char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, quote);
  for (char c : s) {
    if (c == '\\' || c == quote) out += '\\';
    out += c;
  }
  return out + quote;
}
inline std::string py_repr(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}
inline std::string py_repr(const std::vector<std::string>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + py_repr(v[i]);
  return out + "]";
}

// str(torch.dtype) in Python, e.g. "torch.float32".
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// numpy.random.default_rng(seed).integers(0, high, size=n, dtype=np.int64):
// SeedSequence -> PCG64 (XSL-RR) -> Lemire's bounded integers, as numpy 1.17+
// implements them (the stream numpy promises to keep). The Python hasher draws
// its multipliers this way.
class NumpyPcg64 {
 public:
  // seed: a Python int below 2^128.
  explicit NumpyPcg64(unsigned __int128 seed) {
    const std::vector<uint64_t> words = seed_sequence_state(seed);
    const u128 init_state = (u128(words[0]) << 64) | words[1];
    const u128 init_seq = (u128(words[2]) << 64) | words[3];
    state_ = 0;
    inc_ = (init_seq << 1) | 1;
    step();
    state_ += init_state;
    step();
  }

  uint64_t next64() {
    step();
    const uint64_t x = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    const unsigned rot = static_cast<unsigned>(state_ >> 122);
    return (x >> rot) | (x << ((64 - rot) & 63));
  }

  // PCG64 hands out both halves of a 64-bit draw as 32-bit draws.
  uint32_t next32() {
    if (has_half_) {
      has_half_ = false;
      return half_;
    }
    const uint64_t next = next64();
    has_half_ = true;
    half_ = static_cast<uint32_t>(next >> 32);
    return static_cast<uint32_t>(next);
  }

  // Generator.integers(0, high, size=n, dtype=np.int64) for 1 <= high.
  std::vector<int64_t> integers(int64_t high, int64_t n) {
    const uint64_t range = static_cast<uint64_t>(high - 1);  // inclusive
    std::vector<int64_t> out(static_cast<size_t>(n), 0);
    for (auto& v : out) {
      if (range == 0) {
        v = 0;
      } else if (range < 0xFFFFFFFFULL) {
        const uint32_t excl = static_cast<uint32_t>(range) + 1;
        uint64_t m = uint64_t(next32()) * excl;
        uint32_t leftover = static_cast<uint32_t>(m);
        if (leftover < excl) {
          const uint32_t threshold = (0xFFFFFFFFU - static_cast<uint32_t>(range)) % excl;
          while (leftover < threshold) {
            m = uint64_t(next32()) * excl;
            leftover = static_cast<uint32_t>(m);
          }
        }
        v = static_cast<int64_t>(m >> 32);
      } else if (range == 0xFFFFFFFFULL) {
        v = next32();
      } else {
        const uint64_t excl = range + 1;  // range < 2^63 here
        u128 m = u128(next64()) * excl;
        uint64_t leftover = static_cast<uint64_t>(m);
        if (leftover < excl) {
          const uint64_t threshold = (~uint64_t(0) - range) % excl;
          while (leftover < threshold) {
            m = u128(next64()) * excl;
            leftover = static_cast<uint64_t>(m);
          }
        }
        v = static_cast<int64_t>(m >> 64);
      }
    }
    return out;
  }

 private:
  using u128 = unsigned __int128;

  void step() {
    const u128 mult = (u128(0x2360ED051FC65DA4ULL) << 64) | 0x4385DF649FCCF645ULL;
    state_ = state_ * mult + inc_;
  }

  // numpy.random.SeedSequence(seed).generate_state(4, np.uint64).
  static std::vector<uint64_t> seed_sequence_state(u128 seed) {
    std::vector<uint32_t> entropy;
    if (seed == 0) entropy.push_back(0);
    for (; seed > 0; seed >>= 32) entropy.push_back(static_cast<uint32_t>(seed));
    uint32_t hash_const = 0x43b0d7e5U;
    auto hashmix = [&hash_const](uint32_t value) {
      value ^= hash_const;
      hash_const *= 0x931e8875U;
      value *= hash_const;
      return value ^ (value >> 16);
    };
    auto mix = [](uint32_t x, uint32_t y) {
      uint32_t r = 0xca01f9ddU * x - 0x4973f715U * y;
      return r ^ (r >> 16);
    };
    uint32_t pool[4];
    for (size_t i = 0; i < 4; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0);
    for (int src = 0; src < 4; ++src)
      for (int dst = 0; dst < 4; ++dst)
        if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
    for (size_t src = 4; src < entropy.size(); ++src)
      for (int dst = 0; dst < 4; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
    uint32_t out_const = 0x8b51f9ddU;
    std::vector<uint64_t> words(4, 0);
    for (int i = 0; i < 8; ++i) {
      uint32_t v = pool[i % 4] ^ out_const;
      out_const *= 0x58f38dedU;
      v *= out_const;
      v ^= v >> 16;
      words[i / 2] |= uint64_t(v) << (32 * (i % 2));  // little-endian pairs
    }
    return words;
  }

  u128 state_ = 0, inc_ = 0;
  bool has_half_ = false;
  uint32_t half_ = 0;
};

inline bool is_prime(uint64_t n) {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (uint64_t f = 3; f <= n / f; f += 2)
    if (n % f == 0) return false;
  return true;
}

// Spec §2: per layer (in config order), per order, per head, the next prime
// above the previous one that no head of any layer took yet.
inline std::vector<std::vector<int64_t>> head_primes(const std::vector<int64_t>& min_size_per_order,
                                                     int64_t heads_per_order, size_t num_layers) {
  std::set<int64_t> taken;
  std::vector<std::vector<int64_t>> result(num_layers);
  for (auto& layer : result) {
    for (int64_t min_size : min_size_per_order) {
      int64_t p = min_size - 1;
      for (int64_t h = 0; h < heads_per_order; ++h) {
        do ++p;
        while (!is_prime(static_cast<uint64_t>(p)) || taken.count(p));
        taken.insert(p);
        layer.push_back(p);
      }
    }
  }
  return result;
}

// XXH64 (seed 0) of the little-endian int64 words {seed, layer_id, order}:
// the per-order seed of the xxh64 family.
inline uint64_t xxh64_ngram_seed(int64_t seed, int64_t layer_id, int64_t order) {
  constexpr uint64_t P1 = 11400714785074694791ULL, P2 = 14029467366897019727ULL, P3 = 1609587929392839161ULL,
                     P4 = 9650029242287828579ULL, P5 = 2870177450012600261ULL;
  auto rotl = [](uint64_t x, int r) { return (x << r) | (x >> (64 - r)); };
  uint64_t h = P5 + 24;  // seed 0, 24 bytes: below one 32-byte stripe
  for (int64_t word : {seed, layer_id, order}) {
    uint64_t k = static_cast<uint64_t>(word) * P2;
    k = rotl(k, 31) * P1;
    h ^= k;
    h = rotl(h, 27) * P1 + P4;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

}  // namespace detail

// The fields of engram.EngramConfig, with the reference release's defaults.
struct EngramConfig {
  std::vector<int64_t> engram_vocab_size{kDefaultVocabSize * 5, kDefaultVocabSize * 5};
  int64_t max_ngram_size = 3;
  int64_t n_embed_per_ngram = 512;
  int64_t n_head_per_ngram = 8;
  std::vector<int64_t> layer_ids{1, 15};
  int64_t pad_id = 2;
  int64_t seed = 0;
  int64_t kernel_size = 4;
  std::string hash = "deepseek";

  // Width of one head's rows, Dh = E / H.
  int64_t head_dim() const { return n_embed_per_ngram / n_head_per_ngram; }
  // K = (N-1) * H hashed lookups per token.
  int64_t num_heads_total() const { return (max_ngram_size - 1) * n_head_per_ngram; }

  // EngramConfig.validate(): c10::ValueError with Python's message.
  void validate() const {
    auto bad = [](const char* field, const std::string& value, const std::string& expected) {
      TORCH_CHECK_VALUE(false, "EngramConfig.", field, "=", value, ": expected ", expected);
    };
    using detail::py_repr;
    if (max_ngram_size < 2)
      bad("max_ngram_size", py_repr(max_ngram_size), "an int >= 2 (2-grams are the smallest order)");
    for (const auto& [name, v] : {std::pair<const char*, int64_t>{"n_embed_per_ngram", n_embed_per_ngram},
                                  {"n_head_per_ngram", n_head_per_ngram},
                                  {"kernel_size", kernel_size}}) {
      if (v < 1) bad(name, py_repr(v), "a positive int");
    }
    if (n_embed_per_ngram % n_head_per_ngram != 0)
      bad("n_embed_per_ngram", py_repr(n_embed_per_ngram),
          "a multiple of n_head_per_ngram=" + std::to_string(n_head_per_ngram));
    if (static_cast<int64_t>(engram_vocab_size.size()) != max_ngram_size - 1)
      bad("engram_vocab_size", py_repr(engram_vocab_size),
          "one size per n-gram order 2.." + std::to_string(max_ngram_size) + ", i.e. " +
              std::to_string(max_ngram_size - 1) + " values");
    for (int64_t size : engram_vocab_size)
      if (size < 2) bad("engram_vocab_size", py_repr(engram_vocab_size), "ints >= 2");
    if (layer_ids.empty()) bad("layer_ids", py_repr(layer_ids), "at least one layer id");
    for (int64_t id : layer_ids)
      if (id < 0) bad("layer_ids", py_repr(layer_ids), "non-negative ints");
    if (std::set<int64_t>(layer_ids.begin(), layer_ids.end()).size() != layer_ids.size())
      bad("layer_ids", py_repr(layer_ids), "distinct layer ids");
    if (pad_id < 0) bad("pad_id", py_repr(pad_id), "a non-negative token id");
    if (seed < 0) bad("seed", py_repr(seed), "a non-negative int");
    if (hash != "deepseek" && hash != "xxh64") bad("hash", py_repr(hash), "one of ('deepseek', 'xxh64')");
  }
};

// engram.CompressionTable: lookup[t] is the canonical id of token t.
class CompressionTable {
 public:
  explicit CompressionTable(const at::Tensor& lookup) {
    TORCH_CHECK_VALUE(lookup.scalar_type() == at::kLong, "CompressionTable: lookup must be int64, got ",
                      detail::py_dtype(lookup.scalar_type()));
    TORCH_CHECK_VALUE(lookup.dim() == 1 && lookup.numel() > 0,
                      "CompressionTable: lookup must be a non-empty 1-D tensor, got shape ", lookup.sizes());
    lookup_ = lookup.detach().to(at::kCPU).contiguous();
    const int64_t low = lookup_.min().item<int64_t>();
    TORCH_CHECK_VALUE(low >= 0, "CompressionTable: lookup holds negative canonical id ", low,
                      "; expected ids >= 0");
    // V' = max + 1, as in Python.
    num_canonical_ = lookup_.max().item<int64_t>() + 1;
  }

  // Every token is its own canonical id.
  static CompressionTable identity(int64_t vocab_size) {
    TORCH_CHECK_VALUE(vocab_size >= 1, "CompressionTable.identity: vocab_size=", vocab_size,
                      ", expected a positive int");
    return CompressionTable(at::arange(vocab_size, at::TensorOptions().dtype(at::kLong)));
  }

  const at::Tensor& lookup() const { return lookup_; }
  int64_t vocab_size() const { return lookup_.numel(); }
  int64_t num_canonical() const { return num_canonical_; }
  // Token ids -> canonical ids (negative ids pass through).
  at::Tensor apply(const at::Tensor& ids) const { return ops::compress_ids(ids, lookup_.to(ids.device())); }

 private:
  at::Tensor lookup_;
  int64_t num_canonical_ = 0;
};

// engram.NgramHasher: each layer's multipliers, prime head sizes, offsets and
// xxh64 seeds, and the fused hash of spec §3 for several layers at once.
class NgramHasher {
 public:
  NgramHasher(EngramConfig config, CompressionTable compression)
      : config_(std::move(config)), compression_(std::move(compression)) {
    config_.validate();
    TORCH_CHECK_VALUE(config_.pad_id < compression_.vocab_size(), "NgramHasher: config.pad_id=", config_.pad_id,
                      " is outside the tokenizer vocabulary of ", compression_.vocab_size(), " ids");
    const int64_t n = config_.max_ngram_size;
    const int64_t v = compression_.num_canonical();
    // Spec §2: odd multipliers below M_max = (2^63-1) // V', drawn per layer.
    const int64_t half = std::max<int64_t>(1, (INT64_MAX / v) / 2);
    const auto primes = detail::head_primes(config_.engram_vocab_size, config_.n_head_per_ngram,
                                            config_.layer_ids.size());
    const auto long_options = at::TensorOptions().dtype(at::kLong);
    for (size_t i = 0; i < config_.layer_ids.size(); ++i) {
      const int64_t layer_id = config_.layer_ids[i];
      Params p;
      // The numpy seed is a Python int: seed + 10007 * layer_id does not wrap.
      detail::NumpyPcg64 rng(static_cast<unsigned __int128>(config_.seed) +
                             static_cast<unsigned __int128>(10007) * static_cast<uint64_t>(layer_id));
      std::vector<int64_t> mult = rng.integers(half, n);
      for (auto& m : mult) m = m * 2 + 1;
      p.multipliers = at::tensor(mult, long_options);
      p.head_sizes = primes[i];
      p.sizes = at::tensor(p.head_sizes, long_options);
      p.offsets = at::cumsum(p.sizes, 0) - p.sizes;
      std::vector<int64_t> seeds;
      for (int64_t order = 2; order <= n; ++order)
        seeds.push_back(static_cast<int64_t>(detail::xxh64_ngram_seed(config_.seed, layer_id, order)));
      p.xxh64_seeds = at::tensor(seeds, long_options);
      params_.emplace(layer_id, std::move(p));
    }
    pad_ = compression_.lookup()[config_.pad_id].item<int64_t>();
  }

  const EngramConfig& config() const { return config_; }
  const CompressionTable& compression() const { return compression_; }
  const std::vector<int64_t>& layer_ids() const { return config_.layer_ids; }
  // The canonical id of the pad token.
  int64_t pad() const { return pad_; }

  // The N odd int64 multipliers of one layer.
  at::Tensor multipliers(int64_t layer_id) const { return param(layer_id).multipliers.clone(); }
  // K = (N-1)*H distinct primes, order-major then head.
  std::vector<int64_t> head_sizes(int64_t layer_id) const { return param(layer_id).head_sizes; }
  // Exclusive prefix sum of the head sizes: each head's first row.
  at::Tensor offsets(int64_t layer_id) const { return param(layer_id).offsets.clone(); }
  // Rows of the layer's embedding table.
  int64_t table_rows(int64_t layer_id) const { return param(layer_id).sizes.sum().item<int64_t>(); }
  // Per-order seeds of the xxh64 family (orders 2..N), as int64 bit patterns.
  at::Tensor xxh64_seeds(int64_t layer_id) const { return param(layer_id).xxh64_seeds.clone(); }
  // The hash keys the op takes for one layer: multipliers or xxh64 seeds.
  at::Tensor keys(int64_t layer_id) const {
    return config_.hash == "deepseek" ? multipliers(layer_id) : xxh64_seeds(layer_id);
  }

  // [B, T] token ids -> [L, B, T, K] hash ids for `layer_ids` (empty: all).
  at::Tensor hash_stacked(const at::Tensor& input_ids, std::vector<int64_t> layer_ids = {},
                          bool with_offsets = false) const {
    if (layer_ids.empty()) layer_ids = config_.layer_ids;
    for (int64_t l : layer_ids) param(l);
    const DeviceParams& p = device_params(input_ids.device(), layer_ids);
    return ops::ngram_hash(input_ids, p.lookup, p.keys, p.sizes,
                           with_offsets ? std::optional<at::Tensor>(p.offsets) : std::nullopt, config_.pad_id,
                           config_.hash);
  }

  // {layer_id: int64 [B, T, K]} hash ids (spec §3); table rows if with_offsets.
  std::map<int64_t, at::Tensor> hash(const at::Tensor& input_ids, bool with_offsets = false) const {
    const at::Tensor stacked = hash_stacked(input_ids, {}, with_offsets);
    std::map<int64_t, at::Tensor> out;
    for (size_t i = 0; i < config_.layer_ids.size(); ++i) out.emplace(config_.layer_ids[i], stacked[i]);
    return out;
  }

 private:
  struct Params {
    at::Tensor multipliers, sizes, offsets, xxh64_seeds;
    std::vector<int64_t> head_sizes;
  };
  struct DeviceParams {
    at::Tensor lookup, keys, sizes, offsets;
  };

  const Params& param(int64_t layer_id) const {
    auto it = params_.find(layer_id);
    TORCH_CHECK_INDEX(it != params_.end(), "NgramHasher: layer_id=", layer_id,
                      " is not an Engram layer; configured: ", detail::py_repr(config_.layer_ids));
    return it->second;
  }

  // The stacked parameters on one device, built once (a hash call then copies
  // nothing to the device).
  const DeviceParams& device_params(const c10::Device& device, const std::vector<int64_t>& layer_ids) const {
    std::lock_guard<std::mutex> lock(*mutex_);
    auto key = std::make_pair(device.str(), layer_ids);
    auto it = device_params_.find(key);
    if (it == device_params_.end()) {
      std::vector<at::Tensor> keys, sizes, offsets;
      for (int64_t l : layer_ids) {
        const Params& p = param(l);
        keys.push_back(config_.hash == "deepseek" ? p.multipliers : p.xxh64_seeds);
        sizes.push_back(p.sizes);
        offsets.push_back(p.offsets);
      }
      DeviceParams d{compression_.lookup().to(device), at::stack(keys).to(device), at::stack(sizes).to(device),
                     at::stack(offsets).to(device)};
      it = device_params_.emplace(std::move(key), std::move(d)).first;
    }
    return it->second;
  }

  EngramConfig config_;
  CompressionTable compression_;
  int64_t pad_ = 0;
  std::map<int64_t, Params> params_;
  // Shared so that the hasher stays copyable; the cache is filled under it.
  std::shared_ptr<std::mutex> mutex_ = std::make_shared<std::mutex>();
  mutable std::map<std::pair<std::string, std::vector<int64_t>>, DeviceParams> device_params_;
};

}  // namespace engram

#endif  // ENGRAM_HASHER_H_
