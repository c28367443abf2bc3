// gemma_runtime: run gemma-export artifacts (a folder: manifest.json, model.onnx(+data), tokenizer.json) from
// C++17 with no Python. The one public header; README "C++ and Java" has a worked example.
//
// ONNX Runtime is not linked: Model loads the library at run time (dlopen) from RuntimeOptions::ort_library,
// else $GEMMA_ORT_LIBRARY, else the loader's search path (libonnxruntime.so). Any release with C API >= 21
// works (ONNX Runtime 1.21 or newer; the artifacts need opset 23, i.e. 1.22+ in practice).
//
// Threading: a Model is not safe for concurrent calls (it holds the decode state and reusable buffers);
// use one Model per thread, or a lock. ONNX Runtime's own intra-op threads are RuntimeOptions::threads.
// Errors: every failure is a gemma::Error whose what() is the one line the Python CLI prints for the same
// fault (after "gemma-export: error: "), and whose exit_code() is the CLI's (2 bad input, 3 internal).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace gemma {

using TokenIds = std::vector<int64_t>;

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, int exit_code = 2) : std::runtime_error(message), code_(exit_code) {}
  int exit_code() const { return code_; }

 private:
  int code_;
};

// Gemma's tokenizer.json (BPE with byte fallback, the `▁` space normalizer, added and special tokens),
// giving Hugging Face `tokenizers`' ids and text.
class Tokenizer {
 public:
  static Tokenizer from_file(const std::string& path);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // `add_special_tokens`: the post-processor's tokens (Gemma: <bos> first), as HF's encode does by default.
  TokenIds encode(const std::string& text, bool add_special_tokens = true) const;
  // Unknown ids are skipped (as HF's); `skip_special_tokens` drops <bos>, <eos>, <start_of_turn>, ...
  std::string decode(const TokenIds& ids, bool skip_special_tokens = true) const;
  size_t vocab_size() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// temperature 0 = greedy (the first argmax). Otherwise the specified sampler shared with Python and Java
// (README "Sampling, specified"): same seed, same tokens in every language.
struct Sampling {
  double temperature = 0.0;
  int64_t top_k = 0;  // 0 = no limit
  double top_p = 1.0;
  int64_t seed = 0;
  void check() const;  // throws the CLI's messages (--temperature must be ..., ...)
};

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  Sampling sampling;
  // A row stops after emitting one of these; empty = the model's end-of-sequence ids (manifest).
  TokenIds stop_ids;
  // Called after every step for each row still running, with the token just picked; return false to stop
  // the whole generation early (streaming output, cancellation).
  std::function<bool(size_t row, int64_t token)> on_token;
};

struct Generation {
  std::vector<TokenIds> new_ids;  // per prompt: the new tokens (the stop token included, as Python's)
  std::vector<float> last_logits; // [batch, vocab]: the logits the last token was picked from
};

struct RuntimeOptions {
  int threads = 0;               // ONNX Runtime intra-op threads; 0 = all cores
  std::string ort_library;       // path of libonnxruntime.so.1.x; empty = $GEMMA_ORT_LIBRARY, then the search path
  bool verify_files = false;     // re-hash every file against the manifest (sha256) before loading
};

struct Embeddings {
  std::string prompt;                    // the task prompt prepended to each text
  int64_t dim = 0;
  std::vector<std::vector<float>> rows;  // [texts, dim], L2-normalised
  std::vector<size_t> tokens;            // per text: how many tokens were embedded
};

// Image prompts (image + text artifacts, README "Image prompts"): the prompts with their image markers
// expanded into the image token layout, and the images' preprocessed pixels.
struct ImagePrompts {
  std::vector<TokenIds> prompts;  // token ids per prompt (the tokenizer's <bos> included)
  std::vector<float> pixels;      // [images, 3, height, width] float32, the vision graph's pixel_values
  int64_t images = 0, height = 0, width = 0;
};

class Model {
 public:
  // Opens the artifact: manifest (format version checked), tokenizer if present, ONNX Runtime session.
  explicit Model(const std::string& artifact_dir, const RuntimeOptions& options = {});
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  // Loads ONNX Runtime and the model now (otherwise the first generate() or embed() does).
  void prepare();

  bool is_embedding_model() const;
  int64_t vocab_size() const;
  int64_t max_length() const;
  const TokenIds& eos_token_ids() const;
  const Tokenizer& tokenizer() const;  // throws when the artifact has no tokenizer.json

  // Greedy or sampled tokens for a batch of prompts (left-padded together), the cache carried.
  Generation generate(const std::vector<TokenIds>& prompts, const GenerateOptions& options = {});
  // Texts in, text out (the tokenizer's <bos> added, special tokens skipped in the output).
  std::vector<std::string> generate_text(const std::vector<std::string>& prompts, const GenerateOptions& options = {});
  // Image prompts: the images go to the prompts' image markers in order (one marker per image). Errors as
  // `gemma-export generate --image`'s (no marker, unreadable image, a text-only artifact, ...); an artifact
  // with images needs gemma_runtime built with libpng and libjpeg (else: "image support was not compiled in").
  bool has_vision() const;
  ImagePrompts image_prompts(const std::vector<std::string>& prompts, const std::vector<std::string>& image_paths);
  Generation generate(const ImagePrompts& input, const GenerateOptions& options = {});
  std::vector<std::string> generate_text(const std::vector<std::string>& prompts,
                                         const std::vector<std::string>& image_paths, const GenerateOptions& options = {});
  // Sentence embeddings of an EmbeddingGemma artifact; `task` names one of its prompts (query, document, ...),
  // empty = its default prompt.
  Embeddings embed(const std::vector<std::string>& texts, const std::string& task = "");

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The one-line messages for prompts the model cannot take (shared by generate() and the CLI).
void check_prompts(const std::vector<TokenIds>& prompts, int64_t vocab_size, int64_t max_length,
                   int64_t max_new_tokens);

}  // namespace gemma
