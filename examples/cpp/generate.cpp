// Greedy decoding with an AOTInductor package of a model with Engram layers,
// without Python.
//
//   generate PACKAGE.pt2 TABLES.json PROMPT NEW_TOKENS [--repeats N] [--threads N] [--default-malloc]
//
// PACKAGE.pt2: written by engram.export.compile_package. Its Engram tables are
//   runtime inputs, not part of the package.
// TABLES.json: {"tables": [{"name": ..., "path": ...}]}, one .npy file per
//   table in the package's order, paths relative to TABLES.json (written by
//   examples/export_tiny_lm.py). The files are memory-mapped, not read: a
//   table may be far larger than memory.
// PROMPT: token ids, rows separated by ';' (a batch), ids by ',': "5,9,2;7,1,3".
//
// Before loading the package it checks the package's metadata against this
// op library (ABI version) and the tables (count, names, shapes, dtypes), so
// that a package exported with another Engram configuration or engram build
// fails with a message naming what differs instead of reading out of bounds.
// Prints one line of tokens (prompt then new) per row, then the median time of
// one forward pass of the decoded ids.
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <fcntl.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <engram/runtime.h>

namespace {

// Must equal engram/export.py's METADATA_* and EXPORT_FORMAT.
const char* const kMetadataFormat = "engram.export_format";
const char* const kMetadataOpsAbi = "engram.ops_abi_version";
const char* const kMetadataTables = "engram.tables";
const char* const kMetadataInput = "engram.input_ids";
const char* const kExportFormat = "1";

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string join_shape(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

// ---------------------------------------------------------------------------
// A small JSON reader: the package metadata and the manifest are JSON, and
// LibTorch ships no JSON library. Numbers are kept as doubles (table shapes
// are far below 2^53).
struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;

  const Json* find(const std::string& key) const {
    for (const auto& kv : object)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

class JsonParser {
 public:
  JsonParser(const std::string& text, std::string what) : text_(text), what_(std::move(what)) {}

  Json parse() {
    Json value = parse_value();
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw Error(what_ + " is not valid JSON (" + why + " at character " + std::to_string(pos_) + ")");
  }
  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    return text_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  bool consume_word(const char* word) {
    const size_t n = std::strlen(word);
    if (text_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }
  Json parse_value() {
    Json v;
    const char c = peek();
    if (c == '{') {
      v.kind = Json::kObject;
      ++pos_;
      if (peek() == '}') return ++pos_, v;
      while (true) {
        if (peek() != '"') fail("expected a key");
        std::string key = parse_string();
        expect(':');
        v.object.emplace_back(std::move(key), parse_value());
        if (peek() == ',') { ++pos_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::kArray;
      ++pos_;
      if (peek() == ']') return ++pos_, v;
      while (true) {
        v.array.push_back(parse_value());
        if (peek() == ',') { ++pos_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::kString;
      v.string = parse_string();
      return v;
    }
    if (consume_word("true")) { v.kind = Json::kBool; v.boolean = true; return v; }
    if (consume_word("false")) { v.kind = Json::kBool; return v; }
    if (consume_word("null")) return v;
    const char* begin = text_.c_str() + pos_;
    char* end = nullptr;
    v.number = std::strtod(begin, &end);
    if (end == begin) fail("unexpected character");
    v.kind = Json::kNumber;
    pos_ += static_cast<size_t>(end - begin);
    return v;
  }
  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (pos_ >= text_.size()) fail("unterminated escape");
      const char e = text_[pos_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          // Table names and paths are ASCII in practice; other code points are
          // written as UTF-8 (surrogate pairs are not combined).
          if (pos_ + 4 > text_.size()) fail("short \\u escape");
          const unsigned cp = static_cast<unsigned>(std::stoul(text_.substr(pos_, 4), nullptr, 16));
          pos_ += 4;
          if (cp < 0x80) {
            out += static_cast<char>(cp);
          } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          } else {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          }
          break;
        }
        default: fail("bad escape");
      }
    }
  }

  const std::string& text_;
  std::string what_;
  size_t pos_ = 0;
};

std::string read_file(const std::string& path, const std::string& what) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error(what + " " + path + ": cannot open (" + std::strerror(errno) + ")");
  std::string text;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  std::fclose(f);
  return text;
}

// ---------------------------------------------------------------------------
// A memory-mapped .npy table (format versions 1-3, C order, little endian).
struct NpyTable {
  std::string path;
  std::string dtype;  // as engram.export names it: "float32", ...
  std::vector<int64_t> shape;
  at::Tensor tensor;  // a view of the mapping; unmaps when the last view goes
};

struct Mapping {
  Mapping(void* d, size_t n) : data(d), size(n) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { munmap(data, size); }
  void* data;
  size_t size;
};

std::string npy_field(const std::string& header, const std::string& key, const std::string& path) {
  const std::string quoted = "'" + key + "'";
  const size_t k = header.find(quoted);
  if (k == std::string::npos) throw Error("table file " + path + ": the .npy header has no " + quoted);
  size_t v = header.find(':', k + quoted.size());
  if (v == std::string::npos) throw Error("table file " + path + ": bad .npy header");
  ++v;
  while (v < header.size() && header[v] == ' ') ++v;
  size_t end = v;
  if (header[v] == '(') {
    end = header.find(')', v);
    if (end == std::string::npos) throw Error("table file " + path + ": bad shape in the .npy header");
    ++end;
  } else {
    while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  }
  return header.substr(v, end - v);
}

NpyTable map_npy(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("table file " + path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    throw Error("table file " + path + ": cannot stat (" + std::strerror(errno) + ")");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  // MAP_PRIVATE with write access: the tensor is writable as LibTorch expects,
  // and a write (none is made: inference) would never reach the file.
  void* data = size ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  close(fd);
  if (data == MAP_FAILED) throw Error("table file " + path + ": cannot map (" + std::strerror(errno) + ")");
  auto mapping = std::make_shared<Mapping>(data, size);
  const char* bytes = static_cast<const char*>(data);

  if (size < 10 || std::memcmp(bytes, "\x93NUMPY", 6) != 0)
    throw Error("table file " + path + " is not an .npy file");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len, header_start;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw Error("table file " + path + " is a truncated .npy file");
    header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    header_start = 12;
  } else {
    throw Error("table file " + path + ": .npy format version " + std::to_string(major) + " is not supported");
  }
  if (header_start + header_len > size) throw Error("table file " + path + " is a truncated .npy file");
  const std::string header(bytes + header_start, header_len);

  NpyTable t;
  t.path = path;
  const std::string descr = npy_field(header, "descr", path);
  static const std::map<std::string, std::pair<std::string, at::ScalarType>> kTypes = {
      {"'<f2'", {"float16", at::kHalf}}, {"'<f4'", {"float32", at::kFloat}}, {"'<f8'", {"float64", at::kDouble}}};
  const auto type = kTypes.find(descr);
  if (type == kTypes.end())
    throw Error("table file " + path + " holds dtype " + descr + "; expected little-endian float16, float32 or float64");
  t.dtype = type->second.first;
  if (npy_field(header, "fortran_order", path) != "False")
    throw Error("table file " + path + " is in Fortran order; expected a C-order array");
  const std::string shape = npy_field(header, "shape", path);
  std::string digits;
  for (char c : shape.substr(1)) {
    if (std::isdigit(static_cast<unsigned char>(c))) {
      digits += c;
    } else if (!digits.empty()) {
      t.shape.push_back(std::stoll(digits));
      digits.clear();
    }
  }
  int64_t numel = 1;
  for (int64_t d : t.shape) numel *= d;
  const size_t data_start = header_start + header_len;
  const size_t data_bytes = static_cast<size_t>(numel) * c10::elementSize(type->second.second);
  if (data_start + data_bytes > size)
    throw Error("table file " + path + " is truncated: its header says " + join_shape(t.shape) + " " + t.dtype +
                " (" + std::to_string(data_bytes) + " bytes), the file holds " + std::to_string(size - data_start));
  t.tensor = torch::from_blob(const_cast<char*>(bytes) + data_start, t.shape, [mapping](void*) {},
                              torch::TensorOptions().dtype(type->second.second));
  return t;
}

// ---------------------------------------------------------------------------
struct TableRecord {
  std::string name, dtype;
  std::vector<int64_t> shape;
};

// The largest input_ids the package takes: export's max_batch and max_seq
// (0: not recorded).
struct InputBounds {
  int64_t max_batch = 0, max_seq = 0;
};

InputBounds input_bounds(const std::unordered_map<std::string, std::string>& meta, const std::string& package) {
  InputBounds b;
  const auto it = meta.find(kMetadataInput);
  if (it == meta.end()) return b;
  const Json v = JsonParser(it->second, std::string("metadata ") + kMetadataInput + " of " + package).parse();
  const Json *batch = v.find("max_batch"), *seq = v.find("max_seq");
  if (batch) b.max_batch = static_cast<int64_t>(batch->number);
  if (seq) b.max_seq = static_cast<int64_t>(seq->number);
  return b;
}

// The metadata checks of engram.export.check_metadata; returns the package's
// table records.
std::vector<TableRecord> check_metadata(const std::unordered_map<std::string, std::string>& meta,
                                        const std::string& package) {
  auto get = [&](const char* key) -> const std::string* {
    const auto it = meta.find(key);
    return it == meta.end() ? nullptr : &it->second;
  };
  const std::string* format = get(kMetadataFormat);
  if (!format || *format != kExportFormat)
    throw Error("package " + package + " is not a package of engram.export.compile_package format " + kExportFormat +
                " (metadata " + kMetadataFormat + "=" + (format ? "'" + *format + "'" : "missing") + ")");
  const std::string* abi = get(kMetadataOpsAbi);
  const std::string library_abi = std::to_string(engram_ops_abi_version());
  if (!abi || *abi != library_abi)
    throw Error("package " + package + " was exported for engram op library ABI version " + (abi ? *abi : "(none)") +
                " (metadata " + kMetadataOpsAbi + "); the loaded op library libengram_ops.so has version " +
                library_abi + ". Export the model again with this engram, or run with the engram it was exported with");
  const std::string* tables = get(kMetadataTables);
  if (!tables) throw Error("package " + package + " has no metadata " + kMetadataTables);
  const Json records = JsonParser(*tables, std::string("metadata ") + kMetadataTables + " of " + package).parse();
  std::vector<TableRecord> out;
  for (const Json& r : records.array) {
    TableRecord t;
    const Json *name = r.find("name"), *dtype = r.find("dtype"), *shape = r.find("shape");
    if (!name || !dtype || !shape) throw Error(std::string("metadata ") + kMetadataTables + " of " + package +
                                               ": a record lacks name, dtype or shape");
    t.name = name->string;
    t.dtype = dtype->string;
    for (const Json& d : shape->array) t.shape.push_back(static_cast<int64_t>(d.number));
    out.push_back(std::move(t));
  }
  return out;
}

// The tables of the manifest, mapped and checked against the package's records.
std::vector<at::Tensor> load_tables(const std::string& manifest, const std::vector<TableRecord>& want,
                                    const std::string& package) {
  const Json doc = JsonParser(read_file(manifest, "table manifest"), "table manifest " + manifest).parse();
  const Json* entries = doc.find("tables");
  if (!entries || entries->kind != Json::kArray)
    throw Error("table manifest " + manifest + ": expected {\"tables\": [{\"name\": ..., \"path\": ...}, ...]}");
  const size_t slash = manifest.rfind('/');
  const std::string base = slash == std::string::npos ? "" : manifest.substr(0, slash + 1);
  if (entries->array.size() != want.size()) {
    std::string names;
    for (const auto& w : want) names += (names.empty() ? "" : ", ") + w.name;
    throw Error("table manifest " + manifest + " lists " + std::to_string(entries->array.size()) +
                " tables; the package " + package + " takes " + std::to_string(want.size()) + " (" + names + ")");
  }
  std::vector<at::Tensor> tensors;
  for (size_t i = 0; i < want.size(); ++i) {
    const Json& e = entries->array[i];
    const Json *name = e.find("name"), *path = e.find("path");
    if (!name || !path) throw Error("table manifest " + manifest + ": entry " + std::to_string(i) + " lacks name or path");
    if (name->string != want[i].name)
      throw Error("table manifest " + manifest + ": table " + std::to_string(i) + " is '" + name->string +
                  "'; the package " + package + " takes '" + want[i].name + "' there");
    const std::string file = !path->string.empty() && path->string[0] == '/' ? path->string : base + path->string;
    NpyTable t = map_npy(file);
    if (t.shape != want[i].shape || t.dtype != want[i].dtype)
      throw Error("table '" + want[i].name + "' (" + file + ") is a " + t.dtype + " table of shape " +
                  join_shape(t.shape) + "; the package " + package + " was exported with a " + want[i].dtype +
                  " table of shape " + join_shape(want[i].shape) + " (another Engram configuration?)");
    tensors.push_back(t.tensor);
  }
  return tensors;
}

at::Tensor parse_prompt(const std::string& text) {
  std::vector<std::vector<int64_t>> rows(1);
  std::string number;
  auto flush = [&]() {
    if (number.empty()) throw Error("PROMPT '" + text + "': expected ids like 5,9,2;7,1,3 (an empty id)");
    rows.back().push_back(std::stoll(number));
    number.clear();
  };
  for (char c : text) {
    if (std::isdigit(static_cast<unsigned char>(c))) {
      number += c;
    } else if (c == ',') {
      flush();
    } else if (c == ';') {
      flush();
      rows.emplace_back();
    } else if (c != ' ') {
      throw Error(std::string("PROMPT '") + text + "': unexpected character '" + c + "'; expected ids like 5,9,2;7,1,3");
    }
  }
  flush();
  for (const auto& r : rows)
    if (r.size() != rows[0].size())
      throw Error("PROMPT '" + text + "': rows of " + std::to_string(rows[0].size()) + " and " +
                  std::to_string(r.size()) + " ids; every row of a batch needs the same length");
  at::Tensor ids = torch::empty({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}, torch::kLong);
  for (size_t b = 0; b < rows.size(); ++b)
    for (size_t t = 0; t < rows[b].size(); ++t) ids[b][t] = rows[b][t];
  return ids;
}

int64_t parse_int(const std::string& text, const std::string& what, int64_t min) {
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || v < min)
    throw Error(what + "='" + text + "': expected an integer >= " + std::to_string(min));
  return v;
}

int run(int argc, char** argv) {
  std::vector<std::string> positional;
  int64_t repeats = 20, threads = 0;
  bool keep_freed_memory = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--repeats" || a == "--threads") && i + 1 < argc) {
      (a == "--repeats" ? repeats : threads) = parse_int(argv[++i], a, 1);
    } else if (a == "--default-malloc") {
      keep_freed_memory = false;
    } else if (a.rfind("--", 0) == 0) {
      throw Error("unknown option " + a + " (options: --repeats N, --threads N, --default-malloc)");
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 4) {
    std::cerr << "usage: generate PACKAGE.pt2 TABLES.json PROMPT NEW_TOKENS [--repeats N] [--threads N] "
                 "[--default-malloc]\n"
                 "  PROMPT: token ids, rows separated by ';', ids by ',' (\"5,9,2;7,1,3\")\n"
                 "  --repeats N: forward passes timed (median reported), default 20\n"
                 "  --threads N: intra-op threads (default: LibTorch's)\n"
                 "  --default-malloc: keep glibc's policy of returning freed memory to the OS\n";
    return 2;
  }
  const std::string package = positional[0], manifest = positional[1];
  const at::Tensor prompt = parse_prompt(positional[2]);
  const int64_t new_tokens = parse_int(positional[3], "NEW_TOKENS", 0);
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));
  if (keep_freed_memory) {
    // Every forward pass allocates and frees the same buffers (activations,
    // the ops' scratch), of a few hundred KiB to MiBs. By default glibc serves
    // those from fresh mmaps or trims them off the heap when freed, so each
    // pass faults its pages in again (measured here: about half the time of a
    // tiny LM's forward). Keeping freed memory in the heap avoids it; a
    // Python process rarely sees the effect, its heap is large and fragmented.
    mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest allowed value
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }

  // The program was compiled against runtime.h; the library it loaded must match it.
  if (engram_ops_abi_version() != ENGRAM_OPS_ABI_VERSION)
    throw Error("the loaded op library libengram_ops.so has ABI version " + std::to_string(engram_ops_abi_version()) +
                "; this program was built against engram/runtime.h version " + std::to_string(ENGRAM_OPS_ABI_VERSION) +
                ". Rebuild it against the installed engram");
  // Metadata first: a mismatched package is refused before its code is loaded.
  if (access(package.c_str(), R_OK) != 0)
    throw Error("package " + package + ": cannot open (" + std::strerror(errno) + ")");
  const auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
  const std::vector<TableRecord> records = check_metadata(meta, package);
  const InputBounds bounds = input_bounds(meta, package);
  if (bounds.max_batch && prompt.size(0) > bounds.max_batch)
    throw Error("PROMPT has " + std::to_string(prompt.size(0)) + " rows; the package " + package +
                " takes batches of up to " + std::to_string(bounds.max_batch) + " (export's max_batch)");
  if (bounds.max_seq && prompt.size(1) + new_tokens > bounds.max_seq)
    throw Error("PROMPT of " + std::to_string(prompt.size(1)) + " ids + NEW_TOKENS " + std::to_string(new_tokens) +
                " = " + std::to_string(prompt.size(1) + new_tokens) + " ids; the package " + package +
                " takes sequences of up to " + std::to_string(bounds.max_seq) + " (export's max_seq)");
  const std::vector<at::Tensor> tables = load_tables(manifest, records, package);
  torch::inductor::AOTIModelPackageLoader loader(package);

  torch::NoGradGuard no_grad;
  // The package's inputs, flattened: input_ids, then the tables.
  auto forward = [&](const at::Tensor& ids) {
    std::vector<at::Tensor> inputs{ids};
    inputs.insert(inputs.end(), tables.begin(), tables.end());
    return loader.run(inputs).at(0);
  };
  at::Tensor ids = prompt;
  for (int64_t i = 0; i < new_tokens; ++i) {
    const at::Tensor logits = forward(ids);
    ids = torch::cat({ids, logits.select(1, -1).argmax(-1, /*keepdim=*/true)}, 1);
  }
  for (int64_t b = 0; b < ids.size(0); ++b) {
    std::cout << "tokens[" << b << "]:";
    for (int64_t t = 0; t < ids.size(1); ++t) std::cout << " " << ids[b][t].item<int64_t>();
    std::cout << "\n";
  }

  // One forward pass of the decoded ids: median wall time after a warm-up call.
  forward(ids);
  std::vector<double> ms;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    forward(ids);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  std::cout << "forward " << join_shape(ids.sizes().vec()) << ": median " << ms[ms.size() / 2] << " ms of "
            << repeats << " (" << at::get_num_threads() << " threads)\n";
  return 0;
}

}  // namespace

// A LibTorch error's message without the C++ backtrace that follows it.
std::string first_part(const std::string& message) {
  const size_t at = message.find("\nException raised from");
  return at == std::string::npos ? message : message.substr(0, at);
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Error& e) {
    std::cerr << "generate: error: " << e.what() << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "generate: error: " << first_part(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "generate: error: " << first_part(e.what()) << "\n";
  }
  return 1;
}
