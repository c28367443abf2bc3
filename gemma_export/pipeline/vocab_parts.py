"""Which rows of the tied embedding the int4 mix keeps at int8: the common tokens', as the tokenizer tells it.

The mix (quantize.py) stores part of the tied embedding at int8 and the rest at int4. Which rows get int8
matters more than how many. A BPE tokenizer's merges are learned in order of pair frequency, so the merge that
makes a token ranks it (earlier, commoner), and a token that no merge makes (a byte, a single character, a control
or special token) is as common as a token gets. Measured on the real Gemma-3-270M (PyTorch, ONNX Runtime's
rounding, the projections as the mix has them; perplexity on GPL-2's text, which the tests do not hold out / on
GPL-3's, which they do): the first half of the ids at int8 13.764 / 14.528; the first quarter by merge rank
13.679 / 14.396 (an eighth: 13.890 / 14.465). Built: 14.429 against fp32's 14.412 on GPL-3, where the id split
gave 14.668.

On Gemma's vocabulary the quarter by merge rank is a few runs of ids, not a scatter: ids [0, 40165) (the merges
learned first), and [236743, 262144) (single characters and special tokens, which no merge makes), but for 30
ids. So the quantizer stores the table in *parts*, runs of consecutive ids, each at one width: the LM head is a
Concat of one MatMulNBits per part, its logits in id order with no gather, and a lookup reads each id's row
from its part. A run shorter than `MIN_RUN` of the vocabulary takes the wider width (it costs little, and saves
a part); a tokenizer whose common tokens make more than `MAX_PARTS` parts, or none (not BPE, no tokenizer),
gives None, and the quantizer splits by id instead (the first half wide).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gemma_export.checkpoint import tokenizer

SELECTION = "bpe-merge-rank"  # the manifest's name for how the wide rows were chosen
WIDE_FRACTION = 4  # the commonest vocab // WIDE_FRACTION tokens by merge rank are wide
MIN_RUN = 64  # a run shorter than vocab // MIN_RUN ids takes the wider width
MAX_PARTS = 8


class Part(NamedTuple):
    """Ids [start, stop) of the tied embedding, stored at the wide width or not."""

    start: int
    stop: int
    wide: bool


def merge_rank_order(tokenizer: dict[str, Any], vocab_size: int) -> np.ndarray | None:
    """Token ids [vocab_size], commonest first: tokens no merge makes (id order), then by their first merge, then
    ids the tokenizer does not know (a model vocabulary larger than its tokenizer's); None when not BPE."""
    model = tokenizer.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        return None
    rank = np.full(vocab_size, np.iinfo(np.int64).max, np.int64)
    rank[np.array([i for i in vocab.values() if 0 <= i < vocab_size], np.int64)] = -1  # known; no merge yet
    for r, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token = vocab.get(left + right)
        if token is not None and 0 <= token < vocab_size and rank[token] == -1:
            rank[token] = r
    return np.argsort(rank, kind="stable")


def parts_of(wide: np.ndarray) -> list[Part] | None:
    """Runs of consecutive ids of one width from a boolean [vocab] (True: wide), a run shorter than vocab //
    MIN_RUN made wide; None when more than MAX_PARTS runs remain."""
    vocab = len(wide)
    wide = wide.copy()
    edges = [0, *(np.flatnonzero(wide[1:] != wide[:-1]) + 1).tolist(), vocab]
    for start, stop in itertools.pairwise(edges):
        if stop - start < vocab // MIN_RUN:
            wide[start:stop] = True
    edges = [0, *(np.flatnonzero(wide[1:] != wide[:-1]) + 1).tolist(), vocab]
    parts = [Part(start, stop, bool(wide[start])) for start, stop in itertools.pairwise(edges)]
    return parts if len(parts) <= MAX_PARTS else None


def by_merge_rank(tokenizer: dict[str, Any], vocab_size: int) -> list[Part] | None:
    """The parts whose wide rows are the commonest vocab // WIDE_FRACTION tokens by merge rank (see the doc)."""
    order = merge_rank_order(tokenizer, vocab_size)
    if order is None:
        return None
    wide = np.zeros(vocab_size, bool)
    wide[order[: vocab_size // WIDE_FRACTION]] = True
    return parts_of(wide)


def of_checkpoint(checkpoint_dir: Path, vocab_size: int) -> list[Part] | None:
    """by_merge_rank of the checkpoint's tokenizer (tokenizer.json, or the one a GGUF's vocabulary makes); None
    when it has none."""
    found = tokenizer.find(checkpoint_dir)
    return by_merge_rank(json.loads(found.to_str()), vocab_size) if found is not None else None


def describe(parts: list[Part], wide: str, narrow: str) -> str:
    """The manifest's record: `0-40165 int8, 40165-236743 int4, ...` (ids [start, stop) and their width)."""
    return ", ".join(f"{p.start}-{p.stop} {wide if p.wide else narrow}" for p in parts)
