// The typed manifest (gemma_export/manifest.py's classes, the fields a runtime reads), with the Python reader's
// format rule and one-line messages.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "gemma_runtime.h"

namespace gemma {

constexpr int kManifestMajor = 2, kManifestMinor = 3;  // the manifest version this reader knows (manifest.py)

using Dim = std::variant<int64_t, std::string>;  // a fixed size, or a symbolic name ("batch", ...)

struct TensorSpec {
  std::string name, dtype;
  std::vector<Dim> shape;
  bool optional = false;
};

struct StateEntry {
  std::string input, output, dtype;
  std::vector<Dim> shape;  // its initial shape: "batch", and 0 on the dimension that grows
  bool shared_buffer = false;
};

struct FileEntry {
  std::string path, sha256;
  int64_t bytes = 0;
};

struct EmbeddingHead {
  std::map<std::string, std::string> prompts;
  std::optional<std::string> default_prompt_name;
};

// The `vision` section (image + text artifacts): the vision graph's role in `files` and the preprocessing
// (manifest.py's ImagePreprocessing).
struct ImagePreprocessing {
  int64_t height = 0, width = 0;
  std::string resample;
  bool do_convert_rgb = true, do_rescale = true, do_normalize = true;
  double rescale_factor = 1.0 / 255;
  std::vector<double> image_mean, image_std;
  std::string image_marker;
  std::vector<std::string> image_sequence;  // before, begin, image token, end, after
  int64_t mm_tokens_per_image = 0, image_token_id = 0;
  std::string prompt_layout = "gemma3", bos_token;
  int64_t prefix_window = 0;
};

struct VisionInfo {
  std::string model;  // role in `files`
  ImagePreprocessing pre;
};

struct Manifest {
  std::string format, model_type;
  int64_t vocab_size = 0, bos_token_id = 0, pad_token_id = 0;
  TokenIds eos_token_ids;
  std::optional<std::string> task;
  std::optional<EmbeddingHead> head;
  std::vector<std::string> providers;
  int64_t max_length = 0;
  std::string cache_layout;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<StateEntry> state;
  std::map<std::string, FileEntry> files;
  std::optional<VisionInfo> vision;
  int64_t hidden_size = 0;

  bool is_embedding_model() const { return task && *task == "sentence-embedding"; }
  bool has_input(const std::string& name) const;
  const TensorSpec& input(const std::string& name) const;

  // Reads ARTIFACT/manifest.json: "ARTIFACT: artifact directory does not exist", ".../manifest.json: format:
  // ...", "...: build.max_length: missing field", ... (the Python reader's messages).
  static Manifest read(const std::string& artifact_dir);
};

// str(Path(p)) in Python: no trailing or doubled slashes, no "." components (messages name paths this way).
std::string python_path(const std::string& path);
// Python's repr() of a str and of a float, for messages that quote the user's value.
std::string python_repr(const std::string& text);
std::string python_repr(double value);

// sha256 of a file's bytes, lowercase hex (RuntimeOptions::verify_files).
std::string sha256_file(const std::string& path);

}  // namespace gemma
