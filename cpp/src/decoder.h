// The artifact's state contract over an ONNX Runtime session (README "The artifact contract"), mirroring
// gemma_export/runtime/session.py's OrtDecoder call for call, so that the same inputs give the same bits:
//   - a prompt whose logits are cut (logits_to_keep) goes through Run() with its past;
//   - decode steps bind every shared-buffer cache as both past input and present output (io binding): the
//     graph writes the new positions in place; buffers hold `reserve()` positions and double when short;
//   - fixed-size states (windowed caches, RecurrentGemma's) are fed back from the last call's outputs
//     (copied: io binding reuses an output buffer on the next run, which must not be that run's input);
//   - artifacts whose attention mask does not cover the past (RecurrentGemma) get the new columns only.
#pragma once

#include <memory>
#include <vector>

#include "manifest.h"
#include "ort.h"

namespace gemma {

class Decoder {
 public:
  Decoder(const Manifest& manifest, Ort::Session& session);
  ~Decoder();

  void reserve(int64_t length) { reserved_ = length; }  // prompt + new tokens: the shared buffers' capacity
  void reset(int64_t batch);                              // empty caches for a new batch
  // One forward pass over ids [batch, seq] with mask [batch, total] (past + new) and positions [batch, seq];
  // `keep` as logits_to_keep. Returns the last position's float32 logits, [batch, vocab].
  // `types` [batch, total] and `features` [rows, hidden]: an image artifact's token_type_ids and the image
  // features of this pass's image tokens (null: zeros and no rows).
  const std::vector<float>& step(const std::vector<int64_t>& ids, int64_t seq, const std::vector<int64_t>& mask,
                                 int64_t total, const std::vector<int64_t>& positions, int64_t keep,
                                 const std::vector<int64_t>* types = nullptr, const std::vector<float>* features = nullptr);

 private:
  struct Cache;
  void run_plain(std::vector<Ort::Value>& feeds, std::vector<std::string>& names);
  void run_in_place(std::vector<Ort::Value>& feeds, std::vector<std::string>& names, int64_t total);
  void take_last_logits(const float* data, int64_t rows);

  const Manifest& manifest_;
  Ort::Session& session_;
  Ort::MemoryInfo cpu_;
  int64_t batch_ = 0, reserved_ = 0, vocab_;
  bool mask_covers_past_, keeps_logits_, any_shared_ = false, multimodal_ = false;
  int64_t hidden_ = 0;
  std::vector<std::unique_ptr<Cache>> caches_;
  std::unique_ptr<Ort::IoBinding> binding_;
  bool rebind_ = true;
  int64_t bound_seq_ = -1;
  std::vector<float> last_;
};

}  // namespace gemma
