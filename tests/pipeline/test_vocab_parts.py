"""vocab_parts.py: the tied embedding's runs of ids, the common tokens' wide, from a BPE tokenizer's merges."""

from __future__ import annotations

import numpy as np

from gemma_export.pipeline import vocab_parts
from gemma_export.pipeline.vocab_parts import Part


def _bpe(vocab: dict[str, int], merges: list) -> dict:
    return {"model": {"type": "BPE", "vocab": vocab, "merges": merges}}


def test_tokens_no_merge_makes_come_first_then_by_their_first_merge_then_unknown_ids() -> None:
    vocab = {"<pad>": 0, "a": 1, "b": 2, "ab": 3, "ba": 4, "abab": 5, "c": 6}
    merges = ["b a", ["a", "b"], "ab ab", "a b"]  # both spellings tokenizers write; a repeated merge ranks once
    order = vocab_parts.merge_rank_order(_bpe(vocab, merges), vocab_size=9)
    # no merge makes 0, 1, 2, 6 (id order); then "ba" (merge 0), "ab" (1), "abab" (2); ids 7, 8 are unknown
    assert order.tolist() == [0, 1, 2, 6, 4, 3, 5, 7, 8]
    # ids beyond the model's vocabulary are left out
    assert vocab_parts.merge_rank_order(_bpe(vocab, merges), vocab_size=4).tolist() == [0, 1, 2, 3]


def test_runs_of_one_width_and_short_runs_made_wide() -> None:
    wide = np.zeros(640, bool)
    wide[:100] = wide[500:] = True
    wide[300:305] = True  # a common run shorter than 640 // MIN_RUN = 10: it stays wide
    wide[600:603] = False  # a rare run as short: made wide, so the last two runs join
    assert vocab_parts.parts_of(wide) == [Part(0, 100, True), Part(100, 300, False), Part(300, 305, True),
                                          Part(305, 500, False), Part(500, 640, True)]  # fmt: skip
    scattered = np.zeros(64 * 40, bool)
    scattered[::128] = True  # every 128th id: 20 runs of 1 made wide, 20 rare runs of 127 between them
    assert vocab_parts.parts_of(scattered) is None  # more than MAX_PARTS: the quantizer splits by id instead


def test_the_commonest_quarter_by_merge_rank(tmp_path) -> None:
    from tokenizers import Tokenizer, models

    # 128 ids: 0-31 single letters (no merge makes them), 32-127 pairs of letters, merged from id 127 down
    letters = [chr(ord("A") + i) for i in range(26)] + [chr(ord("a") + i) for i in range(6)]
    pairs = [(letters[i // 32], letters[i % 32]) for i in range(32, 128)]
    vocab = {t: i for i, t in enumerate(letters)} | {a + b: 32 + i for i, (a, b) in enumerate(pairs)}
    merges = [list(pair) for pair in reversed(pairs)]
    # a quarter, 32 ids: the letters, one run; the first merges (ids 96-127) are next, and narrow
    assert vocab_parts.by_merge_rank(_bpe(vocab, merges), 128) == [Part(0, 32, True), Part(32, 128, False)]
    assert vocab_parts.by_merge_rank({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}, 4) is None
    assert vocab_parts.of_checkpoint(tmp_path, 128) is None  # no tokenizer: the quantizer splits by id

    saved = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges]))
    (tmp_path / "tokenizer.json").write_text(saved.to_str())
    assert vocab_parts.of_checkpoint(tmp_path, 128) == [Part(0, 32, True), Part(32, 128, False)]


def test_the_record_names_each_run_and_its_width() -> None:
    parts = [Part(0, 40165, True), Part(40165, 236743, False), Part(236743, 262144, True)]
    described = vocab_parts.describe(parts, "int8 b128", "int4 b32")
    assert described == "0-40165 int8 b128, 40165-236743 int4 b32, 236743-262144 int8 b128"
