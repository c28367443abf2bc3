// Model: the artifact folder opened (manifest now; tokenizer and ONNX Runtime session when first needed, so
// that a bad prompt is reported before the model loads, as the Python CLI does), generation and embedding.
#include <algorithm>
#include <cmath>
#include <unistd.h>
#include <optional>
#include <sys/stat.h>

#include "decoder.h"
#include "image.h"
#include "gemma_runtime.h"
#include "manifest.h"
#include "ort.h"
#include "pages.h"
#include "sampler.h"

namespace gemma {

constexpr int64_t kLogitsBudgetBytes = int64_t{512} << 20;  // session.py's LOGITS_BUDGET_BYTES

void Sampling::check() const {
  if (!(std::isfinite(temperature) && temperature >= 0))
    throw Error("--temperature must be a finite number >= 0, got " + python_repr(temperature));
  if (seed < 0) throw Error("--seed must be >= 0, got " + std::to_string(seed));
  if (top_k < 0) throw Error("--top-k must be >= 0, got " + std::to_string(top_k));
  if (!(0 < top_p && top_p <= 1)) throw Error("--top-p must be in (0, 1], got " + python_repr(top_p));
}

void check_prompts(const std::vector<TokenIds>& prompts, int64_t vocab_size, int64_t max_length, int64_t max_new_tokens) {
  if (prompts.empty()) throw Error("empty prompt: give at least one token");
  for (const auto& p : prompts)
    if (p.empty()) throw Error("empty prompt: give at least one token");
  for (const auto& p : prompts) {
    for (int64_t t : p)
      if (t < 0 || t >= vocab_size)
        throw Error("token id " + std::to_string(t) + " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    if (static_cast<int64_t>(p.size()) + max_new_tokens > max_length)
      throw Error("prompt of " + std::to_string(p.size()) + " tokens + " + std::to_string(max_new_tokens) +
                  " new tokens exceeds the model's maximum length of " + std::to_string(max_length));
  }
}

struct Model::Impl {
  std::unique_ptr<Ort::Session> vision_session;
  std::string dir;
  RuntimeOptions options;
  Manifest manifest;
  std::optional<Tokenizer> tokenizer;
  std::unique_ptr<Ort::Session> session;
  std::unique_ptr<Decoder> decoder;

  Generation generate(const std::vector<TokenIds>& prompts, const GenerateOptions& options, const std::vector<float>* features);

  const Tokenizer& get_tokenizer() {
    if (!tokenizer) {
      std::string path = dir + "/tokenizer.json";
      struct stat st;
      if (::stat(path.c_str(), &st) != 0)
        throw Error(dir + ": no tokenizer.json in the artifact; pass --token-ids instead of --prompt");
      tokenizer = Tokenizer::from_file(path);
    }
    return *tokenizer;
  }

  Ort::Session& get_session() {
    if (!session) {
      ort::load(options.ort_library);
      if (options.verify_files)
        for (const auto& [role, file] : manifest.files)
          if (sha256_file(dir + "/" + file.path) != file.sha256)
            throw Error(dir + "/" + file.path + ": file changed since the build (sha256 differs from manifest.json's)", 1);
      for (const auto& p : manifest.providers)
        if (p != "CPUExecutionProvider")
          throw Error(dir + ": execution provider " + p + " is not supported by gemma_runtime (CPU only)");
      Ort::SessionOptions so;
      so.SetIntraOpNumThreads(options.threads);
      so.SetLogSeverityLevel(3);
      std::string path = dir + "/" + manifest.files.at("model").path;
      try {
        session = std::make_unique<Ort::Session>(ort::env(), path.c_str(), so);
      } catch (const Ort::Exception& e) {
        throw Error(path + ": ONNX Runtime cannot load the model (" + e.what() + ")", 3);
      }
      auto weights = manifest.files.find("weights");
      if (weights != manifest.files.end()) settle_weights(dir + "/" + weights->second.path);
    }
    return *session;
  }
};

Model::Model(const std::string& artifact_dir, const RuntimeOptions& options) : impl_(std::make_unique<Impl>()) {
  impl_->dir = python_path(artifact_dir);
  impl_->options = options;
  impl_->manifest = Manifest::read(artifact_dir);
  int64_t max_threads = 4 * std::max<int64_t>(1, ::sysconf(_SC_NPROCESSORS_ONLN));
  if (options.threads < 0 || options.threads > max_threads)
    throw Error("--threads must be between 0 (all cores) and " + std::to_string(max_threads) + ", got " +
                std::to_string(options.threads));
}

Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

void Model::prepare() { impl_->get_session(); }

bool Model::is_embedding_model() const { return impl_->manifest.is_embedding_model(); }
int64_t Model::vocab_size() const { return impl_->manifest.vocab_size; }
int64_t Model::max_length() const { return impl_->manifest.max_length; }
const TokenIds& Model::eos_token_ids() const { return impl_->manifest.eos_token_ids; }
const Tokenizer& Model::tokenizer() const { return impl_->get_tokenizer(); }

Generation Model::generate(const std::vector<TokenIds>& prompts, const GenerateOptions& options) {
  return impl_->generate(prompts, options, nullptr);
}

// generate() and generate(ImagePrompts): `features` [image tokens, hidden] (runtime/images.py's
// generate_with_images) or null (text).
Generation Model::Impl::generate(const std::vector<TokenIds>& prompts, const GenerateOptions& options,
                                 const std::vector<float>* features) {
  Model::Impl* impl_ = this;
  const Manifest& m = impl_->manifest;
  if (m.is_embedding_model()) throw Error(impl_->dir + ": an embedding artifact (use `gemma-run embed`)");
  options.sampling.check();
  if (options.max_new_tokens < 1) throw Error("--max-new-tokens must be >= 1, got " + std::to_string(options.max_new_tokens));
  check_prompts(prompts, m.vocab_size, m.max_length, options.max_new_tokens);
  if (!impl_->decoder) impl_->decoder = std::make_unique<Decoder>(m, impl_->get_session());
  Decoder& decoder = *impl_->decoder;
  const TokenIds& stop = options.stop_ids.empty() ? m.eos_token_ids : options.stop_ids;
  const int64_t batch = static_cast<int64_t>(prompts.size()), vocab = m.vocab_size, pad = m.pad_token_id;

  // left_pad + positions (session.py): pads are id `pad`, mask 0, position 1
  int64_t width = 0;
  for (const auto& p : prompts) width = std::max<int64_t>(width, p.size());
  std::vector<int64_t> ids(batch * width, pad), mask(batch * width, 0), pos(batch * width, 1);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t offset = width - static_cast<int64_t>(prompts[b].size());
    for (size_t i = 0; i < prompts[b].size(); ++i) {
      ids[b * width + offset + i] = prompts[b][i];
      mask[b * width + offset + i] = 1;
      pos[b * width + offset + i] = static_cast<int64_t>(i);
    }
  }
  decoder.reserve(width + options.max_new_tokens);
  decoder.reset(batch);

  // Image prompts: token_type_ids (1 at image tokens; PaliGemma: over the whole prompt) and each image
  // token's feature row (row-major order).
  std::vector<int64_t> types, row_of;
  int64_t hidden = 0;
  if (features) {
    const ImagePreprocessing& pre = m.vision->pre;
    bool prefix_lm = pre.prompt_layout == "paligemma";
    types.assign(batch * width, 0);
    row_of.assign(batch * width, -1);
    int64_t n_image = 0;
    for (int64_t i = 0; i < batch * width; ++i) {
      bool image = ids[i] == pre.image_token_id && mask[i] != 0;
      if (image) row_of[i] = n_image++;
      types[i] = prefix_lm ? (mask[i] != 0) : image;
    }
    if (prefix_lm && pre.prefix_window && width > pre.prefix_window)
      throw Error("a PaliGemma prompt of " + std::to_string(width) + " tokens (image tokens included) is longer than the "
                  "sliding window (" + std::to_string(pre.prefix_window) + "): this artifact's graph would cut its "
                  "bidirectional prefix (rebuild it: PaliGemma artifacts built now take prompts of any length)");
    hidden = n_image ? static_cast<int64_t>(features->size()) / n_image : 0;
    if (n_image * hidden != static_cast<int64_t>(features->size()) || (n_image == 0 && !features->empty()))
      throw Error(std::to_string(n_image) + " image tokens in the prompts but features for " +
                  std::to_string(hidden ? features->size() / hidden : 0));
  }

  // Prefill in column chunks whose float32 logits fit the budget (prefill_slices), one logit row kept; with
  // images, chunks that would cut a bidirectional block (a run of token_type_ids 1) are merged (whole_blocks).
  const std::vector<float>* logits = nullptr;
  int64_t chunk = std::max<int64_t>(1, kLogitsBudgetBytes / (4 * batch * vocab));
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (int64_t start = 0; start < width; start += chunk) {
    int64_t stop_col = std::min(start + chunk, width);
    bool joins = false;
    if (features && !slices.empty())
      for (int64_t b = 0; b < batch; ++b) joins = joins || (types[b * width + start - 1] && types[b * width + start]);
    if (joins) slices.back().second = stop_col;
    else slices.emplace_back(start, stop_col);
  }
  for (auto [start, stop_col] : slices) {
    int64_t n = stop_col - start;
    std::vector<int64_t> ids_c(batch * n), pos_c(batch * n), mask_c(batch * stop_col);
    for (int64_t b = 0; b < batch; ++b) {
      std::copy(ids.begin() + b * width + start, ids.begin() + b * width + stop_col, ids_c.begin() + b * n);
      std::copy(pos.begin() + b * width + start, pos.begin() + b * width + stop_col, pos_c.begin() + b * n);
      std::copy(mask.begin() + b * width, mask.begin() + b * width + stop_col, mask_c.begin() + b * stop_col);
    }
    if (!features) {
      logits = &decoder.step(ids_c, n, mask_c, stop_col, pos_c, 1);
      continue;
    }
    std::vector<int64_t> types_c(batch * stop_col);
    std::vector<float> rows;
    for (int64_t b = 0; b < batch; ++b) {
      std::copy(types.begin() + b * width, types.begin() + b * width + stop_col, types_c.begin() + b * stop_col);
      for (int64_t col = start; col < stop_col; ++col) {
        int64_t r = row_of[b * width + col];
        if (r >= 0) rows.insert(rows.end(), features->begin() + r * hidden, features->begin() + (r + 1) * hidden);
      }
    }
    logits = &decoder.step(ids_c, n, mask_c, stop_col, pos_c, 1, &types_c, &rows);
  }

  SplitMix64 rng(static_cast<uint64_t>(options.sampling.seed));
  Generation out;
  out.new_ids.resize(batch);
  std::vector<bool> done(batch, false);
  std::vector<int64_t> next(batch), last_pos(batch);
  for (int64_t b = 0; b < batch; ++b) last_pos[b] = pos[b * width + width - 1];
  int64_t total = width;
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    if (step) {  // feed_back: the picked tokens (padding for finished rows), one more mask column, next positions
      std::vector<int64_t> grown(batch * (total + 1));
      for (int64_t b = 0; b < batch; ++b) {
        std::copy(mask.begin() + b * total, mask.begin() + (b + 1) * total, grown.begin() + b * (total + 1));
        grown[b * (total + 1) + total] = 1;
      }
      mask.swap(grown);
      ++total;
      std::vector<int64_t> step_ids(batch), step_pos(batch);
      for (int64_t b = 0; b < batch; ++b) {
        step_ids[b] = done[b] ? pad : next[b];
        step_pos[b] = ++last_pos[b];
      }
      logits = &decoder.step(step_ids, 1, mask, total, step_pos, 1);
    }
    bool stop_all = false;
    for (int64_t b = 0; b < batch; ++b) {
      const float* row = logits->data() + b * vocab;
      next[b] = options.sampling.temperature == 0 ? argmax(row, vocab)
                                                  : sample_row(row, vocab, options.sampling, rng.next_double());
    }
    for (int64_t b = 0; b < batch; ++b) {
      if (done[b]) continue;
      out.new_ids[b].push_back(next[b]);
      done[b] = std::find(stop.begin(), stop.end(), next[b]) != stop.end();
      if (options.on_token && !options.on_token(static_cast<size_t>(b), next[b])) stop_all = true;
    }
    if (stop_all || std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
  }
  out.last_logits = *logits;
  return out;
}

bool Model::has_vision() const { return impl_->manifest.vision.has_value(); }

namespace {

size_t count_markers(const std::string& text, const std::string& marker) {
  size_t n = 0;
  if (marker.empty()) return 0;
  for (size_t at = text.find(marker); at != std::string::npos; at = text.find(marker, at + marker.size())) ++n;
  return n;
}

std::string replace_all(const std::string& text, const std::string& from, const std::string& to) {
  std::string out;
  size_t start = 0;
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, start)) {
    out += text.substr(start, at - start) + to;
    start = at + from.size();
  }
  return out + text.substr(start);
}

// runtime/images.py's expand_prompt
std::string expand_prompt(const std::string& text, const ImagePreprocessing& pre) {
  const auto& seq = pre.image_sequence;
  std::string full = seq[0] + seq[1];
  for (int64_t i = 0; i < pre.mm_tokens_per_image; ++i) full += seq[2];
  full += seq[3] + seq[4];
  std::string t = text;
  if (pre.prompt_layout == "paligemma") {
    size_t found = t.rfind(pre.image_marker);
    size_t end = (found == std::string::npos ? 0 : found + pre.image_marker.size());
    if (found == std::string::npos) end = pre.image_marker.size() - 1;  // Python: rfind -1 + len(marker)
    t = t.substr(0, end) + pre.bos_token + t.substr(end) + "\n";
  }
  return replace_all(t, pre.image_marker, full);
}

}  // namespace

ImagePrompts Model::image_prompts(const std::vector<std::string>& prompts, const std::vector<std::string>& image_paths) {
  const Manifest& m = impl_->manifest;
  if (!m.vision) throw Error(impl_->dir + ": a text-only artifact; it takes no --image");
  if (prompts.empty()) throw Error("--image needs --prompt text with an image marker (not --token-ids)");
  const ImagePreprocessing& pre = m.vision->pre;
  size_t markers = 0;
  for (const auto& p : prompts) markers += count_markers(p, pre.image_marker);
  if (markers != image_paths.size())
    throw Error(std::string(prompts.size() == 1 ? "the prompt has " : "the prompts have ") + std::to_string(markers) +
                " image marker(s) " + pre.image_marker + " but " + std::to_string(image_paths.size()) +
                " --image(s) were given: put one " + pre.image_marker + " where each image goes");
  ImagePrompts out;
  out.height = pre.height;
  out.width = pre.width;
  for (const auto& path : image_paths) {
    RgbImage image = load_image(path);
    std::vector<float> px = pixel_values(image, pre);
    out.pixels.insert(out.pixels.end(), px.begin(), px.end());
    ++out.images;
  }
  const Tokenizer& tok = tokenizer();
  for (const auto& p : prompts) out.prompts.push_back(tok.encode(expand_prompt(p, pre)));
  return out;
}

Generation Model::generate(const ImagePrompts& input, const GenerateOptions& options) {
  Impl& impl = *impl_;
  const Manifest& m = impl.manifest;
  if (!m.vision) throw Error(impl.dir + ": a text-only artifact; it takes no --image");
  check_prompts(input.prompts, m.vocab_size, m.max_length, options.max_new_tokens);
  std::vector<float> features;
  if (input.images) {
    impl.get_session();  // ONNX Runtime loaded, files verified
    if (!impl.vision_session) {
      Ort::SessionOptions so;
      so.SetIntraOpNumThreads(impl.options.threads);
      so.SetLogSeverityLevel(3);
      std::string path = impl.dir + "/" + m.files.at(m.vision->model).path;
      try {
        impl.vision_session = std::make_unique<Ort::Session>(ort::env(), path.c_str(), so);
      } catch (const Ort::Exception& e) {
        throw Error(path + ": ONNX Runtime cannot load the model (" + e.what() + ")", 3);
      }
    }
    auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<int64_t> shape{input.images, 3, input.height, input.width};
    auto pixels = Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(input.pixels.data()), input.pixels.size(),
                                                  shape.data(), shape.size());
    const char* in_names[] = {"pixel_values"};
    const char* out_names[] = {"image_features"};
    auto result = impl.vision_session->Run(Ort::RunOptions{nullptr}, in_names, &pixels, 1, out_names, 1);
    const float* data = result[0].GetTensorData<float>();
    features.assign(data, data + result[0].GetTensorTypeAndShapeInfo().GetElementCount());
  }
  return impl.generate(input.prompts, options, &features);
}

std::vector<std::string> Model::generate_text(const std::vector<std::string>& prompts,
                                              const std::vector<std::string>& image_paths, const GenerateOptions& options) {
  const Tokenizer& tok = tokenizer();
  std::vector<std::string> texts;
  for (const auto& ids : generate(image_prompts(prompts, image_paths), options).new_ids) texts.push_back(tok.decode(ids));
  return texts;
}

std::vector<std::string> Model::generate_text(const std::vector<std::string>& prompts, const GenerateOptions& options) {
  const Tokenizer& tok = tokenizer();
  std::vector<TokenIds> batch;
  for (const auto& p : prompts) batch.push_back(tok.encode(p));
  std::vector<std::string> texts;
  for (const auto& ids : generate(batch, options).new_ids) texts.push_back(tok.decode(ids));
  return texts;
}

Embeddings Model::embed(const std::vector<std::string>& texts, const std::string& task) {
  const Manifest& m = impl_->manifest;
  if (!m.is_embedding_model()) throw Error(impl_->dir + ": not an embedding artifact (use `gemma-export generate`)");
  if (texts.empty()) throw Error("give at least one --text");
  Embeddings out;
  std::optional<std::string> name = task.empty() ? (m.head ? m.head->default_prompt_name : std::nullopt) : task;
  if (name) {
    const auto* prompts = m.head ? &m.head->prompts : nullptr;
    if (!prompts || !prompts->count(*name)) {
      std::string known;
      if (prompts)
        for (const auto& [k, v] : *prompts) known += (known.empty() ? "" : ", ") + k;
      throw Error("--task " + python_repr(*name) + " is not one of this model's prompts: " + (known.empty() ? "none" : known));
    }
    out.prompt = prompts->at(*name);
  }
  const Tokenizer& tok = tokenizer();
  std::vector<TokenIds> batch;
  int64_t width = 0;
  for (const auto& t : texts) {
    TokenIds ids = tok.encode(out.prompt + t);
    if (static_cast<int64_t>(ids.size()) > m.max_length) ids.resize(m.max_length);
    width = std::max<int64_t>(width, ids.size());
    out.tokens.push_back(ids.size());
    batch.push_back(std::move(ids));
  }
  const int64_t n = static_cast<int64_t>(texts.size());
  std::vector<int64_t> ids(n * width, m.pad_token_id), mask(n * width, 0);
  for (int64_t b = 0; b < n; ++b) {
    int64_t offset = width - static_cast<int64_t>(batch[b].size());
    for (size_t i = 0; i < batch[b].size(); ++i) ids[b * width + offset + i] = batch[b][i], mask[b * width + offset + i] = 1;
  }
  Ort::Session& session = impl_->get_session();
  auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<int64_t> shape{n, width};
  std::vector<Ort::Value> feeds;
  feeds.push_back(Ort::Value::CreateTensor<int64_t>(cpu, ids.data(), ids.size(), shape.data(), 2));
  feeds.push_back(Ort::Value::CreateTensor<int64_t>(cpu, mask.data(), mask.size(), shape.data(), 2));
  const char* in_names[] = {"input_ids", "attention_mask"};
  const char* out_names[] = {"sentence_embedding"};
  auto result = session.Run(Ort::RunOptions{nullptr}, in_names, feeds.data(), 2, out_names, 1);
  auto dims = result[0].GetTensorTypeAndShapeInfo().GetShape();
  out.dim = dims[1];
  const float* data = result[0].GetTensorData<float>();
  for (int64_t b = 0; b < n; ++b) out.rows.emplace_back(data + b * out.dim, data + (b + 1) * out.dim);
  return out;
}

}  // namespace gemma
