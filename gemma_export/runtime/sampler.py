"""The sampler every runtime implements (Python here, C++ in cpp/src/sampler.cpp, Java through it): the same seed
gives the same tokens in all of them. README "Sampling, specified" is the prose of this module.

numpy's generator and its pairwise sums are not specified outside numpy, so both the random numbers and the
arithmetic are spelled out here, in IEEE double operations that C, C++ and Java round the same way:

* random numbers: SplitMix64 (Steele, Lea, Flood 2014) seeded with the seed, one 64-bit output per draw;
  a uniform double in [0, 1) is its top 53 bits times 2**-53;
* per step, one uniform per batch row, in row order (finished rows draw too, so rows stay independent of
  when the others stop);
* per row: `d_i = (double(logit_i) - double(max logit)) / temperature`; candidates are the ids with
  `d_i >= -40` (exp(-40) = 4e-18: below half an ulp of the running sum, which starts at exp(0) = 1, so they
  could never be drawn), ordered by `d` descending then id ascending; top-k keeps the first k; weights are
  `exp(d)` (the C library's `exp`), summed left to right into cumulative sums `c_j`; top-p keeps the
  shortest prefix with `c_j >= top_p * c_last`; the token is the first kept `j` with `c_j > u * c_kept`.
"""

from __future__ import annotations

import math

import numpy as np

MASK64 = (1 << 64) - 1
CUTOFF = -40.0  # scaled logits below max - 40 are never candidates (see the module docstring)


class SplitMix64:
    """The specified random generator (one 64-bit state; Java's SplittableRandom mixes the same way)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def next_double(self) -> float:
        """Uniform in [0, 1): 53 random bits, exactly representable."""
        return (self.next_u64() >> 11) * 2.0**-53


def sample_row(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """One token id from one row of float32 logits [vocab] and one uniform `u` in [0, 1)."""
    scaled = (logits.astype(np.float64) - float(logits.max())) / temperature  # IEEE: same bits in C++
    ids = np.nonzero(scaled >= CUTOFF)[0]
    ids = ids[np.lexsort((ids, -scaled[ids]))]  # d descending, then id ascending
    if top_k:
        ids = ids[:top_k]
    cumulative, total = [], 0.0
    for d in scaled[ids].tolist():  # math.exp: the C library's exp, as C++'s std::exp; summed in order
        total += math.exp(d)
        cumulative.append(total)
    kept = len(cumulative)
    if top_p < 1:
        bound = top_p * total
        kept = next(j for j, c in enumerate(cumulative) if c >= bound) + 1
    target = u * cumulative[kept - 1]
    return int(ids[next(j for j in range(kept) if cumulative[j] > target)])
