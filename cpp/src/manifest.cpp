#include "manifest.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <regex>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

namespace gemma {
namespace {

using json = nlohmann::json;

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool is_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// Walks the document as pydantic validates it: fields in the class's order, the first fault reported as
// "SOURCE: dotted.path: what" with pydantic's wording.
class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw Error(source_ + ": " + where + ": " + what);
  }
  const json& field(const json& obj, const std::string& key, const std::string& where) const {
    if (!obj.contains(key)) fail(join(where, key), "missing field");
    return obj.at(key);
  }
  const json& object(const json& obj, const std::string& key, const std::string& where, const char* type) const {
    const json& v = field(obj, key, where);
    if (!v.is_object()) fail(join(where, key), std::string("Input should be a valid dictionary or instance of ") + type);
    return v;
  }
  std::string str(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = field(obj, key, where);
    if (!v.is_string()) fail(join(where, key), "Input should be a valid string");
    return v.get<std::string>();
  }
  int64_t integer(const json& v, const std::string& where) const {
    if (v.is_number_integer() && !v.is_boolean()) return v.get<int64_t>();
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()) return static_cast<int64_t>(v.get<double>());
    fail(where, "Input should be a valid integer");
  }
  int64_t integer(const json& obj, const std::string& key, const std::string& where) const {
    return integer(field(obj, key, where), join(where, key));
  }
  const json& list(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = field(obj, key, where);
    if (!v.is_array()) fail(join(where, key), "Input should be a valid list");
    return v;
  }
  bool boolean(const json& obj, const std::string& key, const std::string& where) const {
    if (!obj.contains(key)) return false;
    if (!obj.at(key).is_boolean()) fail(join(where, key), "Input should be a valid boolean");
    return obj.at(key).get<bool>();
  }
  void only(const json& obj, std::initializer_list<const char*> known, const std::string& where) const {
    for (const auto& item : obj.items()) {
      bool ok = false;
      for (const char* k : known) ok = ok || item.key() == k;
      if (!ok) fail(join(where, item.key()), "unknown field");
    }
  }
  std::vector<Dim> shape(const json& obj, const std::string& where) const {
    std::vector<Dim> dims;
    const json& s = list(obj, "shape", where);
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i].is_string()) dims.emplace_back(s[i].get<std::string>());
      else dims.emplace_back(integer(s[i], join(where, "shape." + std::to_string(i))));
    }
    return dims;
  }
  static std::string join(const std::string& where, const std::string& key) { return where.empty() ? key : where + "." + key; }

 private:
  std::string source_;
};

void check_format(const json& value, const std::string& source) {
  const std::string expected = "gemma-export/manifest-v" + std::to_string(kManifestMajor) + "." + std::to_string(kManifestMinor);
  std::smatch m;
  std::string text = value.is_string() ? value.get<std::string>() : "";
  static const std::regex pattern(R"(gemma-export/manifest-v(\d+)(?:\.(\d+))?)");
  if (!value.is_string() || !std::regex_match(text, m, pattern)) {
    std::string shown = value.is_string() ? python_repr(text) : value.is_null() ? "None" : value.dump();
    throw Error(source + ": format: unknown manifest format " + shown + " (expected " + python_repr(expected) + ")");
  }
  int major = std::stoi(m[1]), minor = m[2].matched ? std::stoi(m[2]) : 0;
  std::string version = std::to_string(major) + "." + std::to_string(minor);
  if (major != kManifestMajor) {
    std::string newer = major > kManifestMajor ? "a newer gemma-export: upgrade to read it" : "an older gemma-export";
    throw Error(source + ": format: manifest " + version + " was written by " + newer + "; this reader knows " +
                std::to_string(kManifestMajor) + ".x (rebuild the artifact)");
  }
  if (minor > kManifestMinor)
    throw Error(source + ": format: manifest " + version + " was written by a newer gemma-export (this reader knows up to " +
                std::to_string(kManifestMajor) + "." + std::to_string(kManifestMinor) + "); upgrade gemma-export");
}

std::vector<TensorSpec> tensors(const Reader& r, const json& doc, const std::string& key) {
  std::vector<TensorSpec> out;
  const json& list = r.list(doc, key, "");
  for (size_t i = 0; i < list.size(); ++i) {
    std::string where = key + "." + std::to_string(i);
    r.only(list[i], {"name", "dtype", "shape", "optional", "default"}, where);
    out.push_back({r.str(list[i], "name", where), r.str(list[i], "dtype", where), r.shape(list[i], where),
                   r.boolean(list[i], "optional", where)});
  }
  return out;
}

}  // namespace

bool Manifest::has_input(const std::string& name) const {
  for (const auto& t : inputs) if (t.name == name) return true;
  return false;
}

const TensorSpec& Manifest::input(const std::string& name) const {
  for (const auto& t : inputs) if (t.name == name) return t;
  throw Error("manifest.json: inputs: no input named " + name);
}

Manifest Manifest::read(const std::string& artifact_dir) {
  const std::string dir = python_path(artifact_dir);
  const std::string path = python_path(dir + "/manifest.json");
  if (!is_dir(dir)) throw Error(dir + ": artifact directory does not exist");
  if (!is_file(path)) throw Error(dir + ": no manifest.json; not a gemma-export artifact");
  json doc;
  try {
    std::ifstream in(path, std::ios::binary);
    doc = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  }
  if (doc.is_object()) check_format(doc.contains("format") ? doc["format"] : json(), path);
  Reader r(path);
  if (!doc.is_object()) r.fail("(top level)", "Input should be a valid dictionary or instance of Manifest");

  Manifest m;
  m.format = r.str(doc, "format", "");
  const json& model = r.object(doc, "model", "", "ModelInfo");
  m.model_type = r.str(model, "type", "model");
  r.str(model, "source_model_type", "model");
  const json& config = r.object(model, "config", "model", "ModelConfig");
  m.vocab_size = r.integer(config, "vocab_size", "model.config");
  r.integer(config, "hidden_size", "model.config");
  r.integer(config, "num_hidden_layers", "model.config");
  m.bos_token_id = r.integer(config, "bos_token_id", "model.config");
  const json& eos = r.list(config, "eos_token_ids", "model.config");
  for (size_t i = 0; i < eos.size(); ++i) m.eos_token_ids.push_back(r.integer(eos[i], "model.config.eos_token_ids." + std::to_string(i)));
  m.pad_token_id = r.integer(config, "pad_token_id", "model.config");
  if (model.contains("task") && !model["task"].is_null()) m.task = r.str(model, "task", "model");
  if (model.contains("head") && !model["head"].is_null()) {
    const json& head = r.object(model, "head", "model", "EmbeddingHead");
    EmbeddingHead h;
    const json& prompts = r.object(head, "prompts", "model.head", "dict");
    for (const auto& item : prompts.items()) {
      if (!item.value().is_string()) r.fail("model.head.prompts." + item.key(), "Input should be a valid string");
      h.prompts[item.key()] = item.value().get<std::string>();
    }
    r.field(head, "default_prompt_name", "model.head");
    if (head["default_prompt_name"].is_string()) h.default_prompt_name = head["default_prompt_name"].get<std::string>();
    m.head = h;
  }
  if (model.contains("not_exported") && !model["not_exported"].is_null())  // 2.3: inputs a text artifact leaves out
    for (const auto& part : r.list(model, "not_exported", "model"))
      if (!part.is_string()) r.fail("model.not_exported", "Input should be a valid string");
  r.only(model, {"type", "source_model_type", "config", "source", "task", "head", "dim", "not_exported"}, "model");

  const json& build = r.object(doc, "build", "", "BuildInfo");
  r.str(build, "target", "build");
  for (const auto& p : r.list(build, "providers", "build")) m.providers.push_back(p.is_string() ? p.get<std::string>() : "");
  r.str(build, "precision", "build");
  r.str(build, "quant", "build");
  r.integer(build, "opset", "build");
  r.object(build, "domains", "build", "dict");
  m.max_length = r.integer(build, "max_length", "build");
  m.cache_layout = build.contains("cache_layout") && build["cache_layout"].is_string() ? build["cache_layout"].get<std::string>() : "full";
  r.only(build, {"target", "providers", "precision", "quant", "opset", "domains", "max_length", "cache_layout", "tensorrt"}, "build");

  m.inputs = tensors(r, doc, "inputs");
  m.outputs = tensors(r, doc, "outputs");
  const json& state = r.list(doc, "state", "");
  for (size_t i = 0; i < state.size(); ++i) {
    std::string where = "state." + std::to_string(i);
    r.only(state[i], {"input", "output", "shape", "dtype", "shared_buffer"}, where);
    m.state.push_back({r.str(state[i], "input", where), r.str(state[i], "output", where), r.str(state[i], "dtype", where),
                       r.shape(state[i], where), r.boolean(state[i], "shared_buffer", where)});
  }
  const json& files = r.object(doc, "files", "", "dict");
  for (const auto& item : files.items()) {
    std::string where = "files." + item.key();
    if (!item.value().is_object()) r.fail(where, "Input should be a valid dictionary or instance of FileEntry");
    m.files[item.key()] = {r.str(item.value(), "path", where), r.str(item.value(), "sha256", where), r.integer(item.value(), "bytes", where)};
  }
  if (doc.contains("vision") && !doc["vision"].is_null()) {
    const json& v = r.object(doc, "vision", "", "VisionInfo");
    VisionInfo info;
    info.model = r.str(v, "model", "vision");
    const json& p = r.object(v, "preprocessing", "vision", "ImagePreprocessing");
    const std::string w = "vision.preprocessing";
    auto number = [&](const char* key) {
      const json& x = r.field(p, key, w);
      if (!x.is_number()) r.fail(w + "." + key, "Input should be a valid number");
      return x.get<double>();
    };
    auto numbers = [&](const char* key) {
      std::vector<double> out;
      for (const auto& x : r.list(p, key, w)) {
        if (!x.is_number()) r.fail(w + "." + key, "Input should be a valid number");
        out.push_back(x.get<double>());
      }
      return out;
    };
    ImagePreprocessing& pre = info.pre;
    const json& size = r.list(p, "size", w);
    if (size.size() != 2) r.fail(w + ".size", "expected [height, width]");
    pre.height = r.integer(size[0], w + ".size.0");
    pre.width = r.integer(size[1], w + ".size.1");
    pre.resample = r.str(p, "resample", w);
    pre.do_convert_rgb = r.boolean(p, "do_convert_rgb", w);
    pre.do_rescale = r.boolean(p, "do_rescale", w);
    pre.rescale_factor = number("rescale_factor");
    pre.do_normalize = r.boolean(p, "do_normalize", w);
    pre.image_mean = numbers("image_mean");
    pre.image_std = numbers("image_std");
    if (pre.image_mean.size() != 3 || pre.image_std.size() != 3) r.fail(w, "image_mean and image_std need 3 values");
    pre.image_marker = r.str(p, "image_marker", w);
    for (const auto& x : r.list(p, "image_sequence", w)) pre.image_sequence.push_back(x.is_string() ? x.get<std::string>() : "");
    if (pre.image_sequence.size() != 5) r.fail(w + ".image_sequence", "expected 5 strings");
    pre.mm_tokens_per_image = r.integer(p, "mm_tokens_per_image", w);
    pre.image_token_id = r.integer(p, "image_token_id", w);
    if (p.contains("prompt_layout")) pre.prompt_layout = r.str(p, "prompt_layout", w);
    if (p.contains("bos_token")) pre.bos_token = r.str(p, "bos_token", w);
    if (p.contains("prefix_window") && !p["prefix_window"].is_null()) pre.prefix_window = r.integer(p, "prefix_window", w);
    m.vision = info;
  }
  if (model.contains("config") && model["config"].is_object() && model["config"].contains("hidden_size") &&
      model["config"]["hidden_size"].is_number_integer())
    m.hidden_size = model["config"]["hidden_size"].get<int64_t>();
  r.object(doc, "versions", "", "dict");
  r.object(doc, "parity", "", "LogitParity");
  r.only(doc, {"format", "model", "build", "inputs", "outputs", "state", "files", "quantization", "recipe", "versions", "parity", "vision"}, "");
  if (!m.files.count("model")) r.fail("files", "no `model` entry");
  return m;
}

std::string python_path(const std::string& path) {
  if (path.empty()) return ".";
  bool absolute = path[0] == '/';
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    std::string part = path.substr(start, end - start);
    if (!part.empty() && part != ".") parts.push_back(part);
    start = end + 1;
  }
  std::string out = absolute ? "/" : "";
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? "/" : "") + parts[i];
  return out.empty() ? "." : out;
}

std::string python_repr(const std::string& text) {
  bool has_single = text.find('\'') != std::string::npos, has_double = text.find('"') != std::string::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : text) {
    if (c == '\\') out += "\\\\";
    else if (c == static_cast<unsigned char>(quote)) out += std::string("\\") + quote;
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else out += static_cast<char>(c);
  }
  return out + quote;
}

std::string python_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  // The shortest round-tripping digits, laid out as Python's repr: fixed for exponents in [-4, 16), else
  // d.ddde+XX (two exponent digits at least).
  char buf[64];
  auto end = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::scientific).ptr;
  std::string sci(buf, end);
  bool negative = sci[0] == '-';
  size_t e = sci.find('e');
  std::string digits;
  for (size_t i = negative; i < e; ++i) if (sci[i] != '.') digits += sci[i];
  int exp = std::stoi(sci.substr(e + 1));
  std::string out = negative ? "-" : "";
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out += "0." + std::string(-exp - 1, '0') + digits;
    } else if (static_cast<size_t>(exp) + 1 >= digits.size()) {
      out += digits + std::string(exp + 1 - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
    return out;
  }
  out += digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
  char tail[16];
  std::snprintf(tail, sizeof tail, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
  return out + tail;
}

// SHA-256 (FIPS 180-4), for RuntimeOptions::verify_files.
std::string sha256_file(const std::string& path) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
      0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
      0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
      0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
      0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
      0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
      0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  auto block = [&](const unsigned char* p) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot read the file");
  std::vector<unsigned char> buf(1 << 20);
  uint64_t total = 0;
  size_t have = 0;
  while (in) {
    in.read(reinterpret_cast<char*>(buf.data() + have), static_cast<std::streamsize>(buf.size() - have));
    size_t got = static_cast<size_t>(in.gcount());
    total += got;
    have += got;
    size_t full = have / 64 * 64;
    for (size_t i = 0; i < full; i += 64) block(buf.data() + i);
    std::copy(buf.begin() + full, buf.begin() + have, buf.begin());
    have -= full;
  }
  unsigned char tail[128] = {0};
  std::copy(buf.begin(), buf.begin() + have, tail);
  tail[have] = 0x80;
  size_t len = have + 1 + 8 <= 64 ? 64 : 128;
  for (int i = 0; i < 8; ++i) tail[len - 1 - i] = static_cast<unsigned char>((total * 8) >> (8 * i));
  for (size_t i = 0; i < len; i += 64) block(tail + i);
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

}  // namespace gemma
