#include "decoder.h"

#include <cstring>

namespace gemma {
namespace {

ONNXTensorElementDataType element_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  throw Error("manifest.json: state dtype " + dtype + " is not supported (float32, int64)");
}

size_t element_size(ONNXTensorElementDataType t) { return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 8; }

int64_t count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

// One state entry: its bytes (a plain tensor of exactly `shape`), or, for a shared-buffer cache after an
// in-place call, a buffer [batch, kv, capacity, d] whose first shape[2] positions hold it.
struct Decoder::Cache {
  const StateEntry* spec;
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  std::vector<char> bytes;        // the plain tensor (when !in_buffer)
  Ort::Value from_run{nullptr};   // or a plain tensor ONNX Runtime returned (Run's outputs are fresh)
  std::vector<float> buffer;      // shared buffer
  int64_t capacity = 0;
  bool in_buffer = false;
  Ort::Value buffer_value{nullptr};

  const char* plain_data() const {
    return from_run ? static_cast<const char*>(from_run.GetTensorRawData()) : bytes.data();
  }
  // The past as a plain tensor value (a view of our bytes, or a compact copy of the buffer's first positions).
  Ort::Value value(const Ort::MemoryInfo& cpu) {
    if (in_buffer) {  // Run() needs exactly `shape`: copy the positions out (not on the generation path)
      std::vector<char> compact(count(shape) * element_size(type));
      size_t row = shape[2] * shape[3] * 4, stride = capacity * shape[3] * 4;
      for (int64_t bh = 0; bh < shape[0] * shape[1]; ++bh)
        std::memcpy(compact.data() + bh * row, reinterpret_cast<const char*>(buffer.data()) + bh * stride, row);
      bytes.swap(compact);
      from_run = Ort::Value(nullptr);
      in_buffer = false;
      buffer_value = Ort::Value(nullptr);
    }
    // ONNX Runtime wants a non-null pointer even for an empty tensor.
    static char empty;
    void* data = const_cast<char*>(count(shape) ? plain_data() : &empty);
    return Ort::Value::CreateTensor(cpu, data, count(shape) * element_size(type), shape.data(), shape.size(), type);
  }
};

Decoder::Decoder(const Manifest& manifest, Ort::Session& session)
    : manifest_(manifest),
      session_(session),
      cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)),
      vocab_(manifest.vocab_size) {
  const TensorSpec& mask = manifest.input("attention_mask");
  mask_covers_past_ = !(mask.shape.size() == 2 && std::holds_alternative<std::string>(mask.shape[1]) &&
                        std::get<std::string>(mask.shape[1]) == "sequence_length");
  keeps_logits_ = manifest.has_input("logits_to_keep");
  for (const auto& s : manifest.state) any_shared_ = any_shared_ || s.shared_buffer;
  multimodal_ = manifest.has_input("token_type_ids") && manifest.has_input("image_features");
  hidden_ = manifest.hidden_size;
  if (multimodal_) {
    const auto& shape = manifest.input("image_features").shape;
    if (shape.size() == 2 && std::holds_alternative<int64_t>(shape[1])) hidden_ = std::get<int64_t>(shape[1]);
  }
}

Decoder::~Decoder() = default;

void Decoder::reset(int64_t batch) {
  batch_ = batch;
  caches_.clear();
  binding_.reset();
  rebind_ = true;
  for (const auto& spec : manifest_.state) {
    auto c = std::make_unique<Cache>();
    c->spec = &spec;
    c->type = element_type(spec.dtype);
    for (const auto& d : spec.shape) {
      if (std::holds_alternative<int64_t>(d)) c->shape.push_back(std::get<int64_t>(d));
      else if (std::get<std::string>(d) == "batch") c->shape.push_back(batch);
      else throw Error("manifest.json: state " + spec.input + ": symbolic dimension " + std::get<std::string>(d) + " has no initial size");
    }
    c->bytes.assign(count(c->shape) * element_size(c->type), 0);  // zeros: the contract's initial state
    caches_.push_back(std::move(c));
  }
}

const std::vector<float>& Decoder::step(const std::vector<int64_t>& ids, int64_t seq, const std::vector<int64_t>& mask,
                                        int64_t total, const std::vector<int64_t>& positions, int64_t keep,
                                        const std::vector<int64_t>* types, const std::vector<float>* features) {
  std::vector<int64_t> ids_shape{batch_, seq}, mask_shape{batch_, total}, pos_shape{batch_, seq};
  std::vector<int64_t> new_columns;
  const std::vector<int64_t>* mask_data = &mask;
  if (!mask_covers_past_) {  // the state remembers the past's mask: feed the new tokens' columns
    new_columns.reserve(batch_ * seq);
    for (int64_t b = 0; b < batch_; ++b)
      new_columns.insert(new_columns.end(), mask.begin() + b * total + (total - seq), mask.begin() + (b + 1) * total);
    mask_data = &new_columns;
    mask_shape[1] = seq;
  }
  auto tensor = [&](const std::vector<int64_t>& data, const std::vector<int64_t>& shape) {
    return Ort::Value::CreateTensor<int64_t>(cpu_, const_cast<int64_t*>(data.data()), data.size(), shape.data(), shape.size());
  };
  std::vector<Ort::Value> feeds;
  std::vector<std::string> names{"input_ids", "attention_mask", "position_ids"};
  feeds.push_back(tensor(ids, ids_shape));
  feeds.push_back(tensor(*mask_data, mask_shape));
  feeds.push_back(tensor(positions, pos_shape));
  std::vector<int64_t> zero_types;
  static float no_rows;
  if (multimodal_) {
    if (!types) zero_types.assign(batch_ * total, 0), types = &zero_types;
    std::vector<int64_t> types_shape{batch_, total};
    feeds.push_back(tensor(*types, types_shape));
    names.push_back("token_type_ids");
    int64_t rows = features && hidden_ ? static_cast<int64_t>(features->size()) / hidden_ : 0;
    std::vector<int64_t> feature_shape{rows, hidden_};
    float* data = rows ? const_cast<float*>(features->data()) : &no_rows;
    feeds.push_back(Ort::Value::CreateTensor<float>(cpu_, data, rows * hidden_, feature_shape.data(), 2));
    names.push_back("image_features");
  }
  bool drops_rows = 0 < keep && keep < seq;
  bool cut_in_graph = drops_rows && keeps_logits_;
  std::vector<int64_t> keep_value{keep};
  if (any_shared_ && !cut_in_graph) {
    run_in_place(feeds, names, total);
  } else {
    if (cut_in_graph) {  // an overridable initializer: Run() feeds it, io binding cannot
      feeds.push_back(Ort::Value::CreateTensor<int64_t>(cpu_, keep_value.data(), 1, nullptr, 0));
      names.push_back("logits_to_keep");
    }
    run_plain(feeds, names);
  }
  return last_;
}

void Decoder::take_last_logits(const float* data, int64_t rows) {
  last_.resize(batch_ * vocab_);
  for (int64_t b = 0; b < batch_; ++b)
    std::memcpy(last_.data() + b * vocab_, data + ((b * rows) + rows - 1) * vocab_, vocab_ * sizeof(float));
}

void Decoder::run_plain(std::vector<Ort::Value>& feeds, std::vector<std::string>& names) {
  for (auto& c : caches_) {
    feeds.push_back(c->value(cpu_));
    names.push_back(c->spec->input);
  }
  std::vector<const char*> in_names, out_names{"logits"};
  for (auto& n : names) in_names.push_back(n.c_str());
  for (auto& c : caches_) out_names.push_back(c->spec->output.c_str());
  auto outputs = session_.Run(Ort::RunOptions{nullptr}, in_names.data(), feeds.data(), feeds.size(), out_names.data(),
                              out_names.size());
  auto logits_shape = outputs[0].GetTensorTypeAndShapeInfo().GetShape();
  take_last_logits(outputs[0].GetTensorData<float>(), logits_shape[1]);
  for (size_t i = 0; i < caches_.size(); ++i) {
    Cache& c = *caches_[i];
    c.shape = outputs[i + 1].GetTensorTypeAndShapeInfo().GetShape();
    c.from_run = std::move(outputs[i + 1]);
    c.bytes.clear();
    c.in_buffer = false;
  }
  rebind_ = true;  // shared caches now live in Run's outputs: the next in-place call copies them into buffers
}

void Decoder::run_in_place(std::vector<Ort::Value>& feeds, std::vector<std::string>& names, int64_t total) {
  for (auto& c : caches_) {
    if (!c->spec->shared_buffer) continue;
    if (c->in_buffer && c->capacity >= total) continue;  // the past is already in place
    int64_t grown = c->in_buffer ? 2 * c->capacity : 0;
    int64_t capacity = std::max({total, reserved_, grown});
    std::vector<float> buffer(c->shape[0] * c->shape[1] * capacity * c->shape[3], 0.0f);
    int64_t past = c->shape[2], d = c->shape[3];
    const float* src = c->in_buffer ? c->buffer.data() : reinterpret_cast<const float*>(c->plain_data());
    int64_t src_stride = c->in_buffer ? c->capacity * d : past * d;
    for (int64_t bh = 0; bh < c->shape[0] * c->shape[1]; ++bh)
      std::memcpy(buffer.data() + bh * capacity * d, src + bh * src_stride, past * d * sizeof(float));
    c->buffer.swap(buffer);
    c->capacity = capacity;
    c->in_buffer = true;
    c->from_run = Ort::Value(nullptr);
    c->bytes.clear();
    std::vector<int64_t> shape{c->shape[0], c->shape[1], capacity, d};
    c->buffer_value = Ort::Value::CreateTensor<float>(cpu_, c->buffer.data(), c->buffer.size(), shape.data(), shape.size());
    rebind_ = true;
  }
  if (rebind_ || !binding_) {  // new buffers: a new binding, logits first (outputs come back in binding order)
    binding_ = std::make_unique<Ort::IoBinding>(session_);
    bound_seq_ = -1;
    binding_->BindOutput("logits", cpu_);
    for (auto& c : caches_) {
      if (c->spec->shared_buffer) {
        binding_->BindInput(c->spec->input.c_str(), c->buffer_value);
        binding_->BindOutput(c->spec->output.c_str(), c->buffer_value);
      } else {
        binding_->BindOutput(c->spec->output.c_str(), cpu_);
      }
    }
    rebind_ = false;
  }
  for (size_t i = 0; i < feeds.size(); ++i) binding_->BindInput(names[i].c_str(), feeds[i]);
  std::vector<Ort::Value> fixed;  // the fixed-size states' pasts, alive through the run
  for (auto& c : caches_) {
    if (c->spec->shared_buffer) continue;
    fixed.push_back(c->value(cpu_));
    binding_->BindInput(c->spec->input.c_str(), fixed.back());
  }
  int64_t seq = feeds[0].GetTensorTypeAndShapeInfo().GetShape()[1];
  if (seq != bound_seq_) {  // ONNX Runtime allocates the logits once per shape, then writes into them (as Python)
    binding_->BindOutput("logits", cpu_);
    bound_seq_ = seq;
  }
  session_.Run(Ort::RunOptions{nullptr}, *binding_);
  auto outputs = binding_->GetOutputValues();
  take_last_logits(outputs[0].GetTensorData<float>(), seq);
  for (size_t i = 0; i < caches_.size(); ++i) {
    Cache& c = *caches_[i];
    if (c.spec->shared_buffer) {
      c.shape[2] = total;
      continue;
    }
    const auto& out = outputs[i + 1];
    c.shape = out.GetTensorTypeAndShapeInfo().GetShape();
    const char* data = static_cast<const char*>(out.GetTensorRawData());
    c.bytes.assign(data, data + count(c.shape) * element_size(c.type));  // a copy: see the header
    c.from_run = Ort::Value(nullptr);
  }
}

}  // namespace gemma
