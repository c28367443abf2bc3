#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace gemma {

constexpr double kCutoff = -40.0;  // the spec's candidate bound: exp(-40) never moves a sum that starts at 1

int64_t argmax(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int64_t sample_row(const float* logits, int64_t vocab, const Sampling& s, double u) {
  double top = logits[argmax(logits, vocab)];
  std::vector<std::pair<double, int64_t>> candidates;  // (scaled logit, id)
  for (int64_t i = 0; i < vocab; ++i) {
    double d = (static_cast<double>(logits[i]) - top) / s.temperature;
    if (d >= kCutoff) candidates.emplace_back(d, i);
  }
  auto order = [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; };
  size_t keep = candidates.size();
  if (s.top_k > 0 && static_cast<size_t>(s.top_k) < keep) {
    keep = static_cast<size_t>(s.top_k);
    std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), order);
    candidates.resize(keep);
  } else {
    std::sort(candidates.begin(), candidates.end(), order);
  }
  std::vector<double> cumulative(keep);
  double total = 0.0;
  for (size_t j = 0; j < keep; ++j) cumulative[j] = total += std::exp(candidates[j].first);
  if (s.top_p < 1.0) {
    double bound = s.top_p * total;
    size_t j = 0;
    while (cumulative[j] < bound) ++j;
    keep = j + 1;
  }
  double target = u * cumulative[keep - 1];
  size_t j = 0;
  while (!(cumulative[j] > target)) ++j;
  return candidates[j].second;
}

}  // namespace gemma
