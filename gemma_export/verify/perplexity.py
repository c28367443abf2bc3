"""Perplexity of a decoder on a token sequence: the quality measure of reduced-precision builds on real text.

exp(mean negative log-likelihood of each token given the ones before it), one sequence, batch 1, the text fed
in chunks through the carried cache (any `runtime.Decoder`: the artifact on ONNX Runtime, or the PyTorch
reference), so that a 262144-token vocabulary's logits never exceed `chunk` rows at a time. The log-softmax is
taken in float64, so that the measure adds no rounding of its own to the difference between two systems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gemma_export.errors import BadInput
from gemma_export.runtime.session import Decoder

CHUNK = 128  # positions per forward pass: 128 x 262144 float32 logits = 128 MiB


def negative_log_likelihoods(decoder: Decoder, ids: Sequence[int], chunk: int = CHUNK) -> np.ndarray:
    """-log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1 (float64)."""
    if len(ids) < 2:
        raise BadInput(f"perplexity needs at least 2 tokens, got {len(ids)}")
    tokens = np.asarray(ids, np.int64)[None]
    decoder.reserve(tokens.shape[1])
    cache = decoder.empty_cache(1)
    nll = np.empty(tokens.shape[1] - 1)
    for start in range(0, tokens.shape[1] - 1, chunk):
        stop = min(start + chunk, tokens.shape[1] - 1)  # the last token is only a target
        mask = np.ones((1, stop), np.int64)
        pos = np.arange(start, stop, dtype=np.int64)[None]
        logits, cache = decoder.step(tokens[:, start:stop], mask, pos, cache)
        x = logits[0].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        log_z = np.log(np.exp(x).sum(-1))
        targets = tokens[0, start + 1 : stop + 1]
        nll[start:stop] = log_z - x[np.arange(stop - start), targets]
    return nll


def perplexity(decoder: Decoder, ids: Sequence[int], chunk: int = CHUNK) -> float:
    return math.exp(float(negative_log_likelihoods(decoder, ids, chunk).mean()))
