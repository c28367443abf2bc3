// Model: the artifact folder opened (manifest now; tokenizer and ONNX Runtime session when first needed, so
// that a bad prompt is reported before the model loads, as the Python CLI does), generation and embedding.
#include <algorithm>
#include <cmath>
#include <unistd.h>
#include <optional>
#include <sys/stat.h>

#include "decoder.h"
#include "gemma_runtime.h"
#include "manifest.h"
#include "ort.h"
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
  std::string dir;
  RuntimeOptions options;
  Manifest manifest;
  std::optional<Tokenizer> tokenizer;
  std::unique_ptr<Ort::Session> session;
  std::unique_ptr<Decoder> decoder;

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

  // Prefill in column chunks whose float32 logits fit the budget (prefill_slices), one logit row kept.
  const std::vector<float>* logits = nullptr;
  int64_t chunk = std::max<int64_t>(1, kLogitsBudgetBytes / (4 * batch * vocab));
  for (int64_t start = 0; start < width; start += chunk) {
    int64_t stop_col = std::min(start + chunk, width), n = stop_col - start;
    std::vector<int64_t> ids_c(batch * n), pos_c(batch * n), mask_c(batch * stop_col);
    for (int64_t b = 0; b < batch; ++b) {
      std::copy(ids.begin() + b * width + start, ids.begin() + b * width + stop_col, ids_c.begin() + b * n);
      std::copy(pos.begin() + b * width + start, pos.begin() + b * width + stop_col, pos_c.begin() + b * n);
      std::copy(mask.begin() + b * width, mask.begin() + b * width + stop_col, mask_c.begin() + b * stop_col);
    }
    logits = &decoder.step(ids_c, n, mask_c, stop_col, pos_c, 1);
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
