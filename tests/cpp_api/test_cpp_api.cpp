// The C++ API (include/engram/*.h) against the Python layer: layers saved by
// tests/cpp_api/make_fixtures.py load in C++, hash to the same ids, give
// bit-identical outputs, hold the same state_dict, and bad calls and bad files
// raise c10::Error with Python's messages.
//
// Usage: test_cpp_api FIXTURE_DIR [gtest flags] (scripts/cpp_api_tests.sh).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <engram/hasher.h>
#include <engram/layer.h>

namespace {

std::string g_fixture_dir;

using Dict = c10::impl::GenericDict;

const Dict& fixtures() {
  static const Dict d = [] {
    std::ifstream in(g_fixture_dir + "/cases.pt", std::ios::binary);
    std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return torch::pickle_load(data).toGenericDict();
  }();
  return d;
}

std::vector<Dict> dicts(const c10::IValue& list) {
  std::vector<Dict> out;
  for (const auto& v : list.toListRef()) out.push_back(v.toGenericDict());
  return out;
}

std::vector<Dict> cases() { return dicts(fixtures().at("cases")); }
at::Tensor tensor(const Dict& d, const char* key) { return d.at(key).toTensor(); }
std::string str(const Dict& d, const char* key) { return d.at(key).toStringRef(); }
// Ints outside int32 come as 0-d tensors (engram.cpp_io.pickle_safe).
int64_t integer(const c10::IValue& v) { return engram::detail::as_int(v).value(); }
int64_t integer(const Dict& d, const char* key) { return integer(d.at(key)); }
std::vector<int64_t> ints(const c10::IValue& v) {
  std::vector<int64_t> out;
  for (const auto& x : v.toListRef()) out.push_back(integer(x));
  return out;
}

// The EngramConfig of a fixture, field by field, as a C++ user would write it.
engram::EngramConfig config_of(const Dict& c) {
  const Dict d = c.at("config").toGenericDict();
  engram::EngramConfig config;
  config.engram_vocab_size = ints(d.at("engram_vocab_size"));
  config.max_ngram_size = integer(d, "max_ngram_size");
  config.n_embed_per_ngram = integer(d, "n_embed_per_ngram");
  config.n_head_per_ngram = integer(d, "n_head_per_ngram");
  config.layer_ids = ints(d.at("layer_ids"));
  config.pad_id = integer(d, "pad_id");
  config.seed = integer(d, "seed");
  config.kernel_size = integer(d, "kernel_size");
  config.hash = str(d, "hash");
  return config;
}

std::string dtype_name(at::ScalarType t) { return engram::detail::py_dtype(t); }

// Python's exception class -> the c10::Error subclass the C++ API raises.
::testing::AssertionResult raises_like_python(const std::function<void()>& call, const std::string& type,
                                              const std::string& message, bool exact = true) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string got = e.what_without_backtrace();
    bool type_ok = true;
    if (type == "ValueError") type_ok = dynamic_cast<const c10::ValueError*>(&e) != nullptr;
    if (type == "IndexError" || type == "KeyError") type_ok = dynamic_cast<const c10::IndexError*>(&e) != nullptr;
    if (type == "TypeError") type_ok = dynamic_cast<const c10::TypeError*>(&e) != nullptr;
    if (!type_ok) {
      return ::testing::AssertionFailure() << "Python raises " << type << ", C++ another c10::Error: " << got;
    }
    const bool text_ok = exact ? got == message : got.rfind(message, 0) == 0 && got.size() > message.size() + 1;
    if (!text_ok)
      return ::testing::AssertionFailure() << "message differs\n  C++:    " << got << "\n  Python: " << message
                                           << (exact ? "" : " (a prefix)");
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no c10::Error; Python raises " << type << ": " << message;
}

TEST(Config, DefaultsEqualPython) {
  const Dict d = fixtures().at("default_config").toGenericDict();
  const engram::EngramConfig c;
  EXPECT_EQ(c.engram_vocab_size, ints(d.at("engram_vocab_size")));
  EXPECT_EQ(c.max_ngram_size, integer(d, "max_ngram_size"));
  EXPECT_EQ(c.n_embed_per_ngram, integer(d, "n_embed_per_ngram"));
  EXPECT_EQ(c.n_head_per_ngram, integer(d, "n_head_per_ngram"));
  EXPECT_EQ(c.layer_ids, ints(d.at("layer_ids")));
  EXPECT_EQ(c.pad_id, integer(d, "pad_id"));
  EXPECT_EQ(c.seed, integer(d, "seed"));
  EXPECT_EQ(c.kernel_size, integer(d, "kernel_size"));
  EXPECT_EQ(c.hash, str(d, "hash"));
}

TEST(Hasher, ParametersEqualPython) {
  for (const Dict& c : cases()) {
    SCOPED_TRACE(str(c, "name"));
    const engram::EngramConfig config = config_of(c);
    const engram::NgramHasher hasher(config, engram::CompressionTable(tensor(c, "compression")));
    for (size_t i = 0; i < config.layer_ids.size(); ++i) {
      const int64_t l = config.layer_ids[i];
      EXPECT_TRUE(torch::equal(hasher.multipliers(l), tensor(c, "multipliers")[i])) << "layer " << l;
      EXPECT_TRUE(torch::equal(hasher.xxh64_seeds(l), tensor(c, "xxh64_seeds")[i])) << "layer " << l;
      EXPECT_TRUE(torch::equal(torch::tensor(hasher.head_sizes(l), torch::kLong), tensor(c, "head_sizes")[i]));
      EXPECT_TRUE(torch::equal(hasher.offsets(l), tensor(c, "offsets")[i])) << "layer " << l;
      EXPECT_EQ(hasher.table_rows(l), tensor(c, "head_sizes")[i].sum().item<int64_t>());
    }
  }
}

TEST(Hasher, IdsEqualPython) {
  for (const Dict& c : cases()) {
    SCOPED_TRACE(str(c, "name"));
    const engram::EngramConfig config = config_of(c);
    const engram::NgramHasher hasher(config, engram::CompressionTable(tensor(c, "compression")));
    const at::Tensor ids = tensor(c, "input_ids");
    EXPECT_TRUE(torch::equal(hasher.hash_stacked(ids), tensor(c, "hasher_ids")));
    EXPECT_TRUE(torch::equal(hasher.hash_stacked(ids, {}, /*with_offsets=*/true), tensor(c, "hasher_rows")));
    const auto by_layer = hasher.hash(ids);
    ASSERT_EQ(by_layer.size(), config.layer_ids.size());
    for (size_t i = 0; i < config.layer_ids.size(); ++i)
      EXPECT_TRUE(torch::equal(by_layer.at(config.layer_ids[i]), tensor(c, "hasher_ids")[i]));
    // A second call is served from the per-device cache: still the same ids.
    EXPECT_TRUE(torch::equal(hasher.hash_stacked(ids), tensor(c, "hasher_ids")));
    const engram::EngramLayer layer = engram::load_layer(str(c, "path"));
    EXPECT_TRUE(torch::equal(layer->hash(ids), tensor(c, "hash_ids")));
  }
}

TEST(Hasher, UnknownLayerRaisesPythonsMessage) {
  for (const Dict& c : cases()) {
    SCOPED_TRACE(str(c, "name"));
    const engram::NgramHasher hasher(config_of(c), engram::CompressionTable(tensor(c, "compression")));
    const Dict e = c.at("hasher_error").toGenericDict();
    EXPECT_TRUE(raises_like_python([&] { hasher.hash_stacked(tensor(c, "input_ids"), {77}); }, str(e, "type"),
                                   str(e, "message")));
  }
}

void expect_state_like_python(const engram::EngramLayer& layer, const Dict& c, bool dtypes) {
  const auto state = layer->state_dict();
  const auto names = c.at("state_names").toListRef();
  const auto shapes = c.at("state_shapes").toListRef();
  const auto dtype_names = c.at("state_dtypes").toListRef();
  ASSERT_EQ(state.size(), names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    const auto& item = state[i];
    EXPECT_EQ(item.key(), names[i].toStringRef()) << "state_dict entry " << i;
    EXPECT_EQ(item.value().sizes().vec(), ints(shapes[i])) << item.key();
    if (dtypes) {
      EXPECT_EQ(dtype_name(item.value().scalar_type()), dtype_names[i].toStringRef()) << item.key();
    }
  }
  // Registered tensors are exactly the state_dict's: the one buffer is the
  // offsets, everything else a parameter.
  std::vector<std::string> registered;
  for (const auto& p : layer->named_parameters()) registered.push_back(p.key());
  for (const auto& b : layer->named_buffers()) registered.push_back(b.key());
  std::sort(registered.begin(), registered.end());
  std::vector<std::string> expected;
  for (const auto& n : names) expected.push_back(n.toStringRef());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(registered, expected);
  ASSERT_EQ(layer->named_buffers().size(), 1u);
  EXPECT_EQ(layer->named_buffers()[0].key(), "multi_head_embedding.offsets");
}

TEST(Layer, StateDictEqualsPython) {
  for (const Dict& c : cases()) {
    SCOPED_TRACE(str(c, "name"));
    const engram::EngramLayer loaded = engram::load_layer(str(c, "path"));
    expect_state_like_python(loaded, c, /*dtypes=*/true);
    // Built from the config in C++, without a file: the same names and shapes.
    const engram::EngramLayer built(config_of(c), integer(c, "layer_id"), integer(c, "hidden_size"),
                                    integer(c, "hc_mult"), engram::CompressionTable(tensor(c, "compression")));
    expect_state_like_python(built, c, /*dtypes=*/false);
    EXPECT_TRUE(torch::equal(built->state_dict()["multi_head_embedding.offsets"],
                             loaded->state_dict()["multi_head_embedding.offsets"]));
  }
}

TEST(Layer, ForwardEqualsPythonBitForBit) {
  int float32 = 0, float64 = 0;
  for (const Dict& c : cases()) {
    SCOPED_TRACE(str(c, "name"));
    engram::EngramLayer layer = engram::load_layer(str(c, "path"));
    const at::Tensor hidden = tensor(c, "hidden"), ids = tensor(c, "input_ids"), expected = tensor(c, "output");
    const at::Tensor out = layer->forward(hidden, ids);
    EXPECT_EQ(dtype_name(out.scalar_type()), str(c, "dtype"));
    EXPECT_EQ(out.sizes(), expected.sizes());
    EXPECT_TRUE(torch::equal(out, expected)) << "max |C++ - Python| = " << (out - expected).abs().max().item<double>();
    EXPECT_TRUE(torch::equal(layer->gate(hidden, ids), tensor(c, "gate")));
    (str(c, "dtype") == "torch.float32" ? float32 : float64) += 1;
  }
  EXPECT_GT(float32, 0);
  EXPECT_GT(float64, 0);
}

TEST(Layer, ToFloat64EqualsPythonsConvertedLayer) {
  int checked = 0;
  for (const Dict& c : cases()) {
    if (str(c, "float32_path").empty()) continue;
    SCOPED_TRACE(str(c, "name"));
    engram::EngramLayer layer = engram::load_layer(str(c, "float32_path"));
    layer->to(torch::kFloat64);
    // As nn.Module.to(dtype): floating tensors only; the offsets stay int64.
    EXPECT_EQ(layer->state_dict()["multi_head_embedding.offsets"].scalar_type(), torch::kLong);
    EXPECT_TRUE(torch::equal(layer->forward(tensor(c, "hidden"), tensor(c, "input_ids")), tensor(c, "output")));
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST(Layer, BadCallsRaisePythonsMessages) {
  for (const Dict& c : cases()) {
    SCOPED_TRACE(str(c, "name"));
    engram::EngramLayer layer = engram::load_layer(str(c, "path"));
    const auto errors = dicts(c.at("forward_errors"));
    EXPECT_GE(errors.size(), 5u);
    for (const Dict& e : errors) {
      SCOPED_TRACE(str(e, "name"));
      EXPECT_TRUE(raises_like_python([&] { layer->forward(tensor(e, "hidden"), tensor(e, "input_ids")); },
                                     str(e, "type"), str(e, "message")));
    }
  }
}

TEST(Loader, BadFilesRaisePythonsMessages) {
  const auto errors = dicts(fixtures().at("file_errors"));
  EXPECT_GE(errors.size(), 20u);
  for (const Dict& e : errors) {
    SCOPED_TRACE(str(e, "name"));
    EXPECT_TRUE(raises_like_python([&] { engram::load_layer(str(e, "path")); }, str(e, "type"), str(e, "message"),
                                   e.at("exact").toBool()));
  }
}

TEST(Layer, ConstructorErrorsRaisePythonsMessages) {
  const auto errors = dicts(fixtures().at("constructor_errors"));
  EXPECT_GE(errors.size(), 10u);
  for (const Dict& e : errors) {
    SCOPED_TRACE(str(e, "name"));
    const engram::EngramConfig config = config_of(e);
    EXPECT_TRUE(raises_like_python(
        [&] {
          engram::EngramLayer(config, integer(e, "layer_id"), integer(e, "hidden_size"), integer(e, "hc_mult"),
                              engram::CompressionTable::identity(integer(e, "vocab_size")));
        },
        str(e, "type"), str(e, "message")));
  }
}

TEST(Layer, OnlyTheDeviceTablePlacement) {
  engram::EngramConfig config;
  config.engram_vocab_size = {31, 37};
  config.n_embed_per_ngram = 12;
  config.n_head_per_ngram = 3;
  for (const char* placement : {"host", "mmap"}) {
    try {
      engram::EngramLayer(config, 1, 8, 1, std::nullopt, placement);
      ADD_FAILURE() << placement << ": no error";
    } catch (const c10::ValueError& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find("is not supported by the C++ API"), std::string::npos)
          << e.what_without_backtrace();
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc > 1) {
    g_fixture_dir = argv[1];
  } else if (const char* dir = std::getenv("ENGRAM_CPP_API_FIXTURES")) {
    g_fixture_dir = dir;
  } else {
    std::cerr << "usage: " << argv[0] << " FIXTURE_DIR (written by tests/cpp_api/make_fixtures.py)\n";
    return 2;
  }
  return RUN_ALL_TESTS();
}
