"""Which keys a query sees: the visibility rule of `ai.gemma::Attention` (graphs/attention.md), stated once.

Queries are the last S of T key positions (T = past + S): query i sits at absolute position p = T - S + i.
Key j is visible to it when `attention_mask[b, j] != 0` (left padding, empty buffer slots) and the distance
d = p - j lies in the layer's reach:

    causal          0 <= d            and, with a window W > 0,  d < W   (W keys, the current one included)
    bidirectional   every key         or,  with a window W > 0,  |d| < W (EmbeddingGemma's local layers)

Mask values >= 2 also name bidirectional blocks (an image's tokens: Gemma 3's `token_type_ids`; PaliGemma's
prefix): a key whose mask value equals the query's own value (>= 2) is visible whatever the lower bound on d
(a later key of the same block). How a block meets the window is the op's attribute `blocks`:

    blocks = 1 (BLOCKS_IN_WINDOW)    the window's upper bound d < W still applies: AND(window, OR(causal, block)),
                                     as transformers composes Gemma 3's sliding layers
    blocks = 2 (BLOCKS_PAST_WINDOW)  the block ignores the window: OR(AND(window, causal), block), as transformers
                                     composes PaliGemma's (a prefix longer than the window sees all of itself)

A mask of 0 and 1 (every text graph) has no blocks, and there both modes are the plain rule; a node that may
receive blocks says so with `blocks` 1 or 2 (absent: 0, read as 1), so that a kernel or lowering without blocks
(CUDA, GroupQueryAttention, the TensorRT plugin) can refuse or avoid it.

`visible` evaluates it for numpy arrays (graphs/attention/make_vectors.py, the tests) and torch tensors
(`attention_reference`, what the PyTorch model computes). The faces written in another IR, the function body
of the ONNX op (ops/attention.py) and the ort-cpu lowering's nodes (targets/ort_cpu.py), are checked against
it by tests/ops/test_visibility.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCKS_NONE, BLOCKS_IN_WINDOW, BLOCKS_PAST_WINDOW = 0, 1, 2  # the op's attribute `blocks`
BLOCK_MODES = (BLOCKS_NONE, BLOCKS_IN_WINDOW, BLOCKS_PAST_WINDOW)


def reach(window: int, causal: bool, total: int) -> tuple[int, int]:
    """Bounds (lo, hi), inclusive, of the distances d = p - j a query sees, among T = `total` keys."""
    span = window if window > 0 else total  # |d| < span; without a window |d| < T always holds: every key
    return (0 if causal else 1 - span), span - 1


def visible(attention_mask: Any, seq: int, window: int, causal: bool, blocks: int = BLOCKS_NONE) -> Any:
    """visible[b, i, j], boolean [batch, seq, total]: key j is visible to query i of batch row b.

    `attention_mask` [batch, total] (nonzero: a real token; values >= 2 name bidirectional blocks) is a numpy
    array or a torch tensor; the result is of the same kind (and device). `blocks`: the op's attribute (above)."""
    if blocks not in BLOCK_MODES:
        raise ValueError(f"blocks must be one of {BLOCK_MODES}, got {blocks}")
    total = attention_mask.shape[-1]
    arange = _arange_like(attention_mask)
    distance = arange(total - seq, total)[:, None] - arange(0, total)[None, :]  # [S, T]: p - j
    lo, hi = reach(window, bool(causal), total)
    own = attention_mask[:, total - seq :][:, :, None]  # [B, S, 1]: each query's own mask value
    same = (own == attention_mask[:, None, :]) & (own >= 2)  # [B, S, T]: a key of the query's own block
    if blocks == BLOCKS_PAST_WINDOW:
        seen = ((distance >= lo) & (distance <= hi)) | same  # OR(AND(window, causal), block)
    else:
        seen = ((distance >= lo) | same) & (distance <= hi)  # AND(window, OR(causal, block))
    return (attention_mask != 0)[:, None, :] & seen


def _arange_like(array: Any):
    if isinstance(array, np.ndarray):
        return np.arange
    import torch  # only a torch tensor gets here: numpy callers need no torch

    return lambda start, stop: torch.arange(start, stop, device=array.device)
