// engram::EngramLayer: the C++ mirror of engram.EngramLayer (engram/layer.py)
// as a torch::nn::Module, and engram::load_layer for layers saved from Python
// with engram.cpp_io.save_layer.
//
// Header-only, LibTorch-only C++17; link engram::ops. The module holds the
// parameters and buffers of the Python layer under the names of its
// state_dict, and forward calls the same engram:: operators and ATen ops in
// the same order as the Python eager forward: on the same device and dtype the
// outputs are bit-identical. Inference only: forward records no autograd graph
// (the backward formulas of the engram ops are registered from Python).
// Only the "device" table placement (the table is a parameter) is supported.
#ifndef ENGRAM_LAYER_H_
#define ENGRAM_LAYER_H_

#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engram/hasher.h"
#include "engram/ops.h"

namespace engram {

namespace detail {

// Module::to casts every tensor, int64 buffers included; nn.Module.to in
// Python casts only floating-point ones. Every engram module follows Python.
class ModuleBase : public torch::nn::Module {
 public:
  explicit ModuleBase(std::string name) : torch::nn::Module(std::move(name)) {}
  using torch::nn::Module::register_buffer;
  using torch::nn::Module::register_parameter;

  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override {
    convert(device, dtype, non_blocking);
  }
  void to(torch::Dtype dtype, bool non_blocking = false) override { convert(std::nullopt, dtype, non_blocking); }
  void to(torch::Device device, bool non_blocking = false) override {
    convert(device, std::nullopt, non_blocking);
  }

 protected:
  virtual void convert(std::optional<torch::Device> device, std::optional<torch::Dtype> dtype, bool non_blocking) {
    torch::NoGradGuard no_grad;
    auto cast = [&](torch::Tensor& t) {
      const auto target = (dtype && t.is_floating_point()) ? *dtype : t.scalar_type();
      t.set_data(t.to(device.value_or(t.device()), target, non_blocking));
    };
    for (auto& p : named_parameters(true)) cast(p.value());
    for (auto& b : named_buffers(true)) cast(b.value());
  }
};

// A module that only holds tensors under the names of a torch.nn module
// (nn.Linear, nn.RMSNorm, nn.Conv1d, nn.Embedding); the Python layer's forward
// reads their weights directly, and so does this one.
class Holder : public ModuleBase {
 public:
  explicit Holder(std::string name) : ModuleBase(std::move(name)) {}
};

// U(-bound, bound), nn.Linear's and nn.Conv1d's initialisation; left
// uninitialised when a loader overwrites it anyway.
inline torch::Tensor uniform(torch::IntArrayRef shape, double bound, bool initialize) {
  torch::Tensor t = torch::empty(shape);
  return initialize ? t.uniform_(-bound, bound) : t;
}

inline std::shared_ptr<Holder> make_linear(int64_t in, int64_t out, bool initialize) {
  auto m = std::make_shared<Holder>("Linear");
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  m->register_parameter("weight", uniform({out, in}, bound, initialize));
  m->register_parameter("bias", uniform({out}, bound, initialize));
  return m;
}

inline std::shared_ptr<Holder> make_rms_norm(int64_t dim) {
  auto m = std::make_shared<Holder>("RMSNorm");
  m->register_parameter("weight", torch::ones({dim}));
  return m;
}

inline torch::nn::ModuleList make_rms_norms(int64_t count, int64_t dim) {
  torch::nn::ModuleList list;
  for (int64_t i = 0; i < count; ++i) list->push_back(make_rms_norm(dim));
  return list;
}

inline torch::Tensor stacked_weights(const torch::nn::ModuleList& list) {
  std::vector<torch::Tensor> weights;
  for (const auto& m : *list) weights.push_back(m->named_parameters(false)["weight"]);
  return torch::stack(weights);
}

}  // namespace detail

// engram.layer.MultiHeadEmbedding with table_placement="device": K hashed
// heads in one [sum(head_sizes), Dh] table.
class MultiHeadEmbeddingImpl : public detail::ModuleBase {
 public:
  MultiHeadEmbeddingImpl(const std::vector<int64_t>& head_sizes, int64_t head_dim, bool initialize = true)
      : ModuleBase("MultiHeadEmbedding") {
    const auto sizes = torch::tensor(head_sizes, torch::kLong);
    offsets = register_buffer("offsets", torch::cumsum(sizes, 0) - sizes);
    embedding = register_module("embedding", std::make_shared<detail::Holder>("Embedding"));
    // nn.Embedding's initialisation: N(0, 1).
    const std::vector<int64_t> shape{sizes.sum().item<int64_t>(), head_dim};
    weight = embedding->register_parameter("weight", initialize ? torch::randn(shape) : torch::empty(shape));
  }

  // hash_ids [..., K] -> rows [..., K, Dh].
  torch::Tensor forward(const torch::Tensor& hash_ids) { return ops::multihead_embedding(weight, hash_ids, offsets); }

  torch::Tensor offsets, weight;
  std::shared_ptr<detail::Holder> embedding;
};
TORCH_MODULE(MultiHeadEmbedding);

// engram.layer.ShortConv: per-branch RMSNorm, depthwise causal dilated conv,
// SiLU, plus the gated value as residual, in one fused op.
class ShortConvImpl : public detail::ModuleBase {
 public:
  ShortConvImpl(int64_t hidden_size, int64_t hc_mult, int64_t kernel_size, int64_t dilation, bool initialize = true)
      : ModuleBase("ShortConv"), dilation(dilation) {
    const int64_t channels = hidden_size * hc_mult;
    conv = register_module("conv", std::make_shared<detail::Holder>("Conv1d"));
    // nn.Conv1d's initialisation for a depthwise conv: U(-1/sqrt(K), 1/sqrt(K)).
    const double bound = 1.0 / std::sqrt(static_cast<double>(kernel_size));
    conv->register_parameter("weight", detail::uniform({channels, 1, kernel_size}, bound, initialize));
    norms = register_module("norms", detail::make_rms_norms(hc_mult, hidden_size));
  }

  // value [B, T, D], gate [B, T, G] -> [B, T, G, D].
  torch::Tensor forward(const torch::Tensor& value, const torch::Tensor& gate) {
    const torch::Tensor norm_weight = detail::stacked_weights(norms);
    const torch::Tensor conv_weight = conv->named_parameters(false)["weight"].flatten(1);
    return ops::gated_short_conv(value, gate, norm_weight, conv_weight, dilation, kEps);
  }

  static constexpr double kEps = 1e-5;  // nn.RMSNorm(hidden_size, eps=1e-5) in Python
  int64_t dilation;
  std::shared_ptr<detail::Holder> conv;
  torch::nn::ModuleList norms;
};
TORCH_MODULE(ShortConv);

// engram.EngramLayer. forward(hidden_states [B, T, G, D] (or [B, T, D] when
// G = 1), input_ids [B, T]) returns the update for the residual stream, shaped
// like hidden_states. Parameters are initialised as in Python (not with the
// same random numbers); initialize=false leaves them uninitialised, for a
// caller that loads them (load_layer does).
class EngramLayerImpl : public detail::ModuleBase {
 public:
  EngramLayerImpl(EngramConfig config, int64_t layer_id, int64_t hidden_size, int64_t hc_mult = 1,
                  std::optional<CompressionTable> compression = std::nullopt,
                  const std::string& table_placement = "device", bool initialize = true)
      : ModuleBase("EngramLayer"),
        layer_id_(layer_id),
        hidden_size_(hidden_size),
        hc_mult_(hc_mult),
        hasher_(checked(std::move(config), layer_id, hidden_size, hc_mult),
                compression ? std::move(*compression) : CompressionTable::identity(kDefaultVocabSize)) {
    const EngramConfig& cfg = hasher_.config();
    TORCH_CHECK_VALUE(table_placement == "device" || table_placement == "host" || table_placement == "mmap",
                      "EngramLayer: table_placement=", detail::py_repr(table_placement),
                      "; expected one of ['device', 'host', 'mmap']");
    TORCH_CHECK_VALUE(table_placement == "device", "EngramLayer: table_placement=",
                      detail::py_repr(table_placement),
                      " is not supported by the C++ API; expected 'device' (the table as a parameter)");
    const int64_t n = cfg.max_ngram_size;
    const int64_t engram_dim = (n - 1) * cfg.n_embed_per_ngram;
    multi_head_embedding = register_module(
        "multi_head_embedding", MultiHeadEmbedding(hasher_.head_sizes(layer_id), cfg.head_dim(), initialize));
    short_conv = register_module("short_conv", ShortConv(hidden_size, hc_mult, cfg.kernel_size, n, initialize));
    value_proj = register_module("value_proj", detail::make_linear(engram_dim, hidden_size, initialize));
    key_projs = register_module("key_projs", torch::nn::ModuleList());
    for (int64_t g = 0; g < hc_mult; ++g) {
      key_projs->push_back(detail::make_linear(engram_dim, hidden_size, initialize));
    }
    norm1 = register_module("norm1", detail::make_rms_norms(hc_mult, hidden_size));
    norm2 = register_module("norm2", detail::make_rms_norms(hc_mult, hidden_size));
    // The Python layer's non-persistent buffers hash_lookup, hash_keys and
    // hash_sizes: not in its state_dict, so not registered here; to() moves them.
    hash_lookup_ = hasher_.compression().lookup().clone();
    hash_keys_ = hasher_.keys(layer_id).unsqueeze(0);
    hash_sizes_ = torch::tensor(hasher_.head_sizes(layer_id), torch::kLong).unsqueeze(0);
  }

  const EngramConfig& config() const { return hasher_.config(); }
  const NgramHasher& hasher() const { return hasher_; }
  const CompressionTable& compression() const { return hasher_.compression(); }
  int64_t layer_id() const { return layer_id_; }
  int64_t hidden_size() const { return hidden_size_; }
  int64_t hc_mult() const { return hc_mult_; }
  // The dtype forward expects hidden_states in: that of the layer's weights.
  torch::Dtype dtype() const { return param(*value_proj, "weight").scalar_type(); }

  // [B, T] token ids -> [B, T, K] hash ids of this layer (without offsets).
  torch::Tensor hash(const torch::Tensor& input_ids) const {
    return ops::ngram_hash(input_ids, hash_lookup_, hash_keys_, hash_sizes_, std::nullopt, config().pad_id,
                           config().hash)[0];
  }

  // value_proj and every key_proj as one [(G+1)*D, (N-1)*E] weight and bias.
  std::pair<torch::Tensor, torch::Tensor> fused_projection_weights() const {
    std::vector<torch::Tensor> weights{param(*value_proj, "weight")}, biases{param(*value_proj, "bias")};
    for (const auto& m : *key_projs) {
      weights.push_back(param(*m, "weight"));
      biases.push_back(param(*m, "bias"));
    }
    return {torch::cat(weights), torch::cat(biases)};
  }

  torch::Tensor forward(const torch::Tensor& hidden_states, const torch::Tensor& input_ids) {
    torch::NoGradGuard no_grad;
    const bool squeeze = hidden_states.dim() == 3;
    const torch::Tensor hidden = check_inputs(hidden_states, input_ids);
    auto [value, gate] = value_and_gate(hidden, input_ids);
    torch::Tensor out = short_conv->forward(value, gate);  // [B, T, G, D]
    return squeeze ? out.squeeze(2) : out;
  }

  // The context gate alone, [B, T, G] values in (0, 1).
  torch::Tensor gate(const torch::Tensor& hidden_states, const torch::Tensor& input_ids) {
    torch::NoGradGuard no_grad;
    return value_and_gate(check_inputs(hidden_states, input_ids), input_ids).second;
  }

  // The tensors of the Python layer's state_dict, under its keys, in its order.
  torch::OrderedDict<std::string, torch::Tensor> state_dict() const {
    torch::OrderedDict<std::string, torch::Tensor> out;
    collect(*this, "", out);
    return out;
  }

  MultiHeadEmbedding multi_head_embedding{nullptr};
  ShortConv short_conv{nullptr};
  std::shared_ptr<detail::Holder> value_proj;
  torch::nn::ModuleList key_projs{nullptr}, norm1{nullptr}, norm2{nullptr};

 protected:
  void convert(std::optional<torch::Device> device, std::optional<torch::Dtype> dtype, bool non_blocking) override {
    ModuleBase::convert(device, dtype, non_blocking);
    if (device) {
      for (torch::Tensor* t : {&hash_lookup_, &hash_keys_, &hash_sizes_}) *t = t->to(*device, non_blocking);
    }
  }

 private:
  // The checks of the Python constructor that come before the hasher's.
  static EngramConfig checked(EngramConfig config, int64_t layer_id, int64_t hidden_size, int64_t hc_mult) {
    config.validate();
    TORCH_CHECK_VALUE(std::find(config.layer_ids.begin(), config.layer_ids.end(), layer_id) != config.layer_ids.end(),
                      "EngramLayer: layer_id=", layer_id, " is not in config.layer_ids=",
                      detail::py_repr(config.layer_ids));
    TORCH_CHECK_VALUE(hidden_size >= 1, "EngramLayer: hidden_size=", hidden_size, ", expected a positive int");
    TORCH_CHECK_VALUE(hc_mult >= 1, "EngramLayer: hc_mult=", hc_mult, ", expected a positive int");
    return config;
  }

  static torch::Tensor param(const torch::nn::Module& m, const char* name) {
    return m.named_parameters(false)[name];
  }

  static void collect(const torch::nn::Module& m, const std::string& prefix,
                      torch::OrderedDict<std::string, torch::Tensor>& out) {
    // nn.Module.state_dict: a module's own parameters, its buffers, then its children.
    for (const auto& p : m.named_parameters(false)) out.insert(prefix + p.key(), p.value());
    for (const auto& b : m.named_buffers(false)) out.insert(prefix + b.key(), b.value());
    for (const auto& c : m.named_children()) collect(*c.value(), prefix + c.key() + ".", out);
  }

  // The Python layer's _check_inputs: hidden_states as [B, T, G, D].
  torch::Tensor check_inputs(torch::Tensor hidden_states, const torch::Tensor& input_ids) const {
    const int64_t g = hc_mult_, d = hidden_size_;
    if (hidden_states.dim() == 3) {
      TORCH_CHECK_VALUE(g == 1, "EngramLayer: hidden_states has shape ", hidden_states.sizes(),
                        " but hc_mult=", g, "; expected [B, T, G, D]");
      hidden_states = hidden_states.unsqueeze(2);
    }
    TORCH_CHECK_VALUE(hidden_states.dim() == 4 && hidden_states.size(2) == g && hidden_states.size(3) == d,
                      "EngramLayer: hidden_states has shape ", hidden_states.sizes(), "; expected [B, T, ", g, ", ",
                      d, "]", (g == 1 ? " or [B, T, " + std::to_string(d) + "]" : std::string()));
    TORCH_CHECK_VALUE(input_ids.sizes() == hidden_states.sizes().slice(0, 2), "EngramLayer: input_ids has shape ",
                      input_ids.sizes(), "; expected [B, T] = ", hidden_states.sizes().slice(0, 2),
                      " to match hidden_states");
    const auto weight_dtype = dtype();
    TORCH_CHECK_TYPE(hidden_states.scalar_type() == weight_dtype, "EngramLayer: hidden_states is ",
                     detail::py_dtype(hidden_states.scalar_type()), " but the layer's weights are ",
                     detail::py_dtype(weight_dtype), "; expected one dtype (convert the layer with .to(dtype))");
    return hidden_states;
  }

  // Spec §4-5 on [B, T, G, D] hidden states: the shared value [B, T, D] and the gate [B, T, G].
  std::pair<torch::Tensor, torch::Tensor> value_and_gate(const torch::Tensor& hidden_states,
                                                         const torch::Tensor& input_ids) {
    const int64_t b = input_ids.size(0), t = input_ids.size(1), d = hidden_size_, g = hc_mult_;
    const torch::Tensor e =
        multi_head_embedding->forward(hash(input_ids)).reshape({b, t, -1}).to(hidden_states.scalar_type());
    const auto [weight, bias] = fused_projection_weights();
    // at::linear, as F.linear in Python (torch::nn::functional::linear adds
    // the bias separately, which may round differently).
    const auto parts = at::linear(e, weight, bias).split_with_sizes({d, g * d}, -1);
    const torch::Tensor gate = ops::context_gate(parts[1].unflatten(-1, {g, d}), hidden_states,
                                                 detail::stacked_weights(norm1), detail::stacked_weights(norm2),
                                                 std::nullopt);  // nn.RMSNorm(hidden_size): eps=None
    return {parts[0], gate};
  }

  int64_t layer_id_, hidden_size_, hc_mult_;
  NgramHasher hasher_;
  torch::Tensor hash_lookup_, hash_keys_, hash_sizes_;
};
TORCH_MODULE(EngramLayer);

// ---------------------------------------------------------------------------
// Loading a layer saved from Python with engram.cpp_io.save_layer(layer, path):
// a torch.save file holding
//   {"format": 1, "config": {EngramConfig fields}, "layer": {"layer_id",
//    "hidden_size", "hc_mult", "table_placement"}, "compression": int64 lookup,
//    "state_dict": {key: tensor}}.
// engram.cpp_io.load_layer reads it in Python with the same checks and the
// same messages.
// ---------------------------------------------------------------------------

constexpr int64_t kLayerFileFormat = 1;

namespace detail {

inline const std::vector<std::string>& file_entries() {
  static const std::vector<std::string> v{"compression", "config", "format", "layer", "state_dict"};
  return v;
}
inline const std::vector<std::string>& config_fields() {
  static const std::vector<std::string> v{"engram_vocab_size", "hash",   "kernel_size", "layer_ids", "max_ngram_size",
                                          "n_embed_per_ngram", "n_head_per_ngram", "pad_id", "seed"};
  return v;
}
inline const std::vector<std::string>& layer_fields() {
  static const std::vector<std::string> v{"hc_mult", "hidden_size", "layer_id", "table_placement"};
  return v;
}

// A dict of string keys, checked to hold exactly `expected` (sorted): the
// first missing entry, else the first unexpected one (in sorted order), is an
// error naming it.
inline c10::impl::GenericDict checked_dict(const c10::IValue& v, const std::string& where, const std::string& what,
                                           const char* missing_text, const char* extra_text,
                                           const std::vector<std::string>& expected) {
  TORCH_CHECK_VALUE(v.isGenericDict(), where, what, " is not a dict");
  auto dict = v.toGenericDict();
  std::vector<std::string> keys;
  for (const auto& item : dict) {
    TORCH_CHECK_VALUE(item.key().isString(), where, what, " has a key that is not a string");
    keys.push_back(item.key().toStringRef());
  }
  for (const auto& key : expected) {
    TORCH_CHECK_VALUE(std::find(keys.begin(), keys.end(), key) != keys.end(), where, what, " has no ",
                      py_repr(key), " ", missing_text, "; expected the ", extra_text, " ", py_repr(expected));
  }
  std::sort(keys.begin(), keys.end());
  for (const auto& key : keys) {
    TORCH_CHECK_VALUE(std::find(expected.begin(), expected.end(), key) != expected.end(), where, what,
                      " has an unexpected ", missing_text, " ", py_repr(key), "; expected the ", extra_text, " ",
                      py_repr(expected));
  }
  return dict;
}

// An int field: an int, or a 0-d int64 tensor (engram.cpp_io.pickle_safe
// writes ints outside int32 so, since this unpickler reads only 8-byte LONG1
// values).
inline std::optional<int64_t> as_int(const c10::IValue& v) {
  if (v.isInt()) return v.toInt();
  if (v.isTensor() && v.toTensor().dim() == 0 && v.toTensor().scalar_type() == at::kLong)
    return v.toTensor().item<int64_t>();
  return std::nullopt;
}

inline int64_t int_field(const c10::impl::GenericDict& d, const std::string& where, const char* section,
                         const std::string& key) {
  const auto v = as_int(d.at(key));
  TORCH_CHECK_VALUE(v.has_value(), where, ": ", section, "[", py_repr(key), "] is not an int");
  return *v;
}

inline std::string str_field(const c10::impl::GenericDict& d, const std::string& where, const char* section,
                             const std::string& key) {
  const c10::IValue v = d.at(key);
  TORCH_CHECK_VALUE(v.isString(), where, ": ", section, "[", py_repr(key), "] is not a string");
  return v.toStringRef();
}

inline std::vector<int64_t> ints_field(const c10::impl::GenericDict& d, const std::string& where, const char* section,
                                       const std::string& key) {
  const c10::IValue v = d.at(key);
  bool ok = v.isList();
  std::vector<int64_t> out;
  if (ok) {
    for (const c10::IValue& item : v.toListRef()) {
      const auto i = as_int(item);
      if (!i) {
        ok = false;
        break;
      }
      out.push_back(*i);
    }
  }
  TORCH_CHECK_VALUE(ok, where, ": ", section, "[", py_repr(key), "] is not a list of ints");
  return out;
}

// Runs `make`, prefixing a c10::Error it raises with `where` (the file), as
// c10::ValueError.
template <typename F>
auto with_context(const std::string& where, F make) -> decltype(make()) {
  try {
    return make();
  } catch (const c10::Error& e) {
    throw c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                          where + ": " + e.what_without_backtrace());
  }
}

inline bool is_parameter_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

}  // namespace detail

// A layer from the contents of a file written by engram.cpp_io.save_layer;
// `where` names it in errors.
inline EngramLayer load_layer_from(const c10::IValue& file, const std::string& where) {
  using namespace detail;
  TORCH_CHECK_VALUE(file.isGenericDict(), "load_layer: ", where,
                    " does not hold a dict; expected the dict that engram.cpp_io.save_layer writes");
  const auto top = file.toGenericDict();
  const bool has_format = [&] {
    for (const auto& item : top)
      if (item.key().isString() && item.key().toStringRef() == "format") return true;
    return false;
  }();
  TORCH_CHECK_VALUE(has_format, "load_layer: ", where,
                    " has no 'format' entry; expected a file written by engram.cpp_io.save_layer");
  const c10::IValue format = top.at("format");
  TORCH_CHECK_VALUE(format.isInt(), "load_layer: ", where, ": 'format' is not an int; expected format=",
                    kLayerFileFormat);
  TORCH_CHECK_VALUE(format.toInt() == kLayerFileFormat, "load_layer: ", where, " has format=", format.toInt(),
                    "; expected format=", kLayerFileFormat, " (the format this engram reads)");
  const std::string at_file = "load_layer: " + where;
  checked_dict(file, at_file, "", "entry", "entries", file_entries());

  const auto cfg_dict = checked_dict(top.at("config"), at_file + ": ", "config", "field", "fields", config_fields());
  EngramConfig config;
  config.engram_vocab_size = ints_field(cfg_dict, at_file, "config", "engram_vocab_size");
  config.hash = str_field(cfg_dict, at_file, "config", "hash");
  config.kernel_size = int_field(cfg_dict, at_file, "config", "kernel_size");
  config.layer_ids = ints_field(cfg_dict, at_file, "config", "layer_ids");
  config.max_ngram_size = int_field(cfg_dict, at_file, "config", "max_ngram_size");
  config.n_embed_per_ngram = int_field(cfg_dict, at_file, "config", "n_embed_per_ngram");
  config.n_head_per_ngram = int_field(cfg_dict, at_file, "config", "n_head_per_ngram");
  config.pad_id = int_field(cfg_dict, at_file, "config", "pad_id");
  config.seed = int_field(cfg_dict, at_file, "config", "seed");
  with_context(at_file, [&] { config.validate(); return 0; });

  const auto layer_dict = checked_dict(top.at("layer"), at_file + ": ", "layer", "field", "fields", layer_fields());
  const int64_t hc_mult = int_field(layer_dict, at_file, "layer", "hc_mult");
  const int64_t hidden_size = int_field(layer_dict, at_file, "layer", "hidden_size");
  const int64_t layer_id = int_field(layer_dict, at_file, "layer", "layer_id");
  const std::string placement = str_field(layer_dict, at_file, "layer", "table_placement");
  TORCH_CHECK_VALUE(placement == "device", at_file, ": table_placement=", py_repr(placement),
                    " is not supported: the C++ API holds the table as a parameter; expected 'device'");

  const c10::IValue lookup = top.at("compression");
  TORCH_CHECK_VALUE(lookup.isTensor(), at_file, ": 'compression' is not a tensor");
  CompressionTable compression = with_context(at_file, [&] { return CompressionTable(lookup.toTensor()); });
  EngramLayer layer = with_context(at_file, [&] {
    return EngramLayer(config, layer_id, hidden_size, hc_mult, std::move(compression), placement,
                       /*initialize=*/false);
  });

  // The state_dict: tensors only, exactly the layer's keys, its shapes, and
  // dtypes the layer can hold.
  const c10::IValue state_value = top.at("state_dict");
  TORCH_CHECK_VALUE(state_value.isGenericDict(), at_file, ": state_dict is not a dict");
  const auto state = state_value.toGenericDict();
  std::vector<std::string> keys;
  for (const auto& item : state) {
    TORCH_CHECK_VALUE(item.key().isString(), at_file, ": state_dict has a key that is not a string");
    keys.push_back(item.key().toStringRef());
  }
  std::sort(keys.begin(), keys.end());
  for (const auto& key : keys) {
    TORCH_CHECK_VALUE(state.at(key).isTensor(), at_file, ": state_dict[", py_repr(key), "] is not a tensor");
  }
  auto expected = layer->state_dict();
  for (const auto& item : expected) {
    TORCH_CHECK_VALUE(std::binary_search(keys.begin(), keys.end(), item.key()), at_file, ": state_dict has no ",
                      py_repr(item.key()), "; the layer expects a tensor of shape ", item.value().sizes(), " there");
  }
  for (const auto& key : keys) {
    TORCH_CHECK_VALUE(expected.contains(key), at_file, ": state_dict has an unexpected key ", py_repr(key),
                      " (shape ", state.at(key).toTensor().sizes(),
                      "); the layer has no parameter or buffer of that name");
  }
  for (const auto& item : expected) {
    const at::Tensor saved = state.at(item.key()).toTensor();
    TORCH_CHECK_VALUE(saved.sizes() == item.value().sizes(), at_file, ": state_dict[", py_repr(item.key()),
                      "] has shape ", saved.sizes(), "; the layer expects ", item.value().sizes());
    if (item.value().is_floating_point()) {
      TORCH_CHECK_VALUE(is_parameter_dtype(saved.scalar_type()), at_file, ": state_dict[", py_repr(item.key()),
                        "] is ", py_dtype(saved.scalar_type()),
                        "; expected a floating-point dtype (float16, bfloat16, float32 or float64)");
    } else {
      TORCH_CHECK_VALUE(saved.scalar_type() == item.value().scalar_type(), at_file, ": state_dict[",
                        py_repr(item.key()), "] is ", py_dtype(saved.scalar_type()), "; expected ",
                        py_dtype(item.value().scalar_type()));
    }
  }
  // load_state_dict(assign=True) in Python: each tensor keeps its dtype.
  torch::NoGradGuard no_grad;
  for (auto& item : expected) item.value().set_data(state.at(item.key()).toTensor().clone());
  return layer;
}

// The file's bytes as pickle_load reads them.
inline std::vector<char> read_layer_file(const std::string& path) {
  std::error_code error;
  TORCH_CHECK(std::filesystem::is_regular_file(path, error), "load_layer: ", detail::py_repr(path),
              " does not exist or is not a file");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "load_layer: cannot open ", detail::py_repr(path));
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// engram.cpp_io.load_layer(path) in C++: the layer saved by
// engram.cpp_io.save_layer, on the CPU, each tensor in its saved dtype.
inline EngramLayer load_layer(const std::string& path) {
  const std::string where = detail::py_repr(path);
  const std::vector<char> data = read_layer_file(path);
  c10::IValue file;
  try {
    file = torch::pickle_load(data);
  } catch (const c10::Error& e) {
    throw c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                          "load_layer: cannot read " + where + " as a torch.save archive (" +
                              e.what_without_backtrace() + ")");
  }
  return load_layer_from(file, where);
}

}  // namespace engram

#endif  // ENGRAM_LAYER_H_
