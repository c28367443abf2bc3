// The specified sampler shared with Python (gemma_export/runtime/sampler.py, whose docstring is the spec) and
// Java (through this code): same seed, same tokens.
#pragma once

#include <cstdint>

#include "gemma_runtime.h"

namespace gemma {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next_u64() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  double next_double() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

// The first argmax of one row of logits.
int64_t argmax(const float* logits, int64_t vocab);
// One token from one row of logits and one uniform draw `u` in [0, 1).
int64_t sample_row(const float* logits, int64_t vocab, const Sampling& sampling, double u);

}  // namespace gemma
