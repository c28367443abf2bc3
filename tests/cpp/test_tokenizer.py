"""The C++ tokenizer against Hugging Face `tokenizers`: ids and decoded text on a large generated corpus (Unicode,
whitespace runs, code, chat turns, long repeats, random bytes of text), with the tiny Gemma-style tokenizer of
the random checkpoints and the real Gemma 3 tokenizer (262,144 tokens) of the real-weight tier."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from gemma_export.dev import random_checkpoint

ALPHABET = [*"abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,;:!?()[]{}<>/\\'\"=+-*_#@&%$|~^`", " ", " ", " ", "\n",
            "\t", "é", "ß", "ñ", "中", "文", "日本", "한", "😀", "👍🏽", "\u200b", "\u00a0", "▁", "\r", "\x00", "\x7f",
            "<0x41>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unused3>", "<mask>"]  # fmt: skip
CODE = 'def f(x):\n    """Doc."""\n    return {"a": [x ** 2 for x in range(10)]}  # comment\n\n\nclass A:\n\tpass\n'
CHAT = "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n"


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "  ", "\n", "a", "Hello world", CODE, "x" * 20000, "ab " * 5000, "  \t\n " * 300, "😀" * 500,
             "▁▁hello▁", "<start_of_turn><start_of_turn>", "<start_of_turn", "<0x00><0xFF>"]  # fmt: skip
    for _ in range(3000):  # mixed: the alphabet's pieces at random
        texts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 300))))
    for _ in range(600):  # any code point (surrogates aside)
        chars = [chr(rng.choice([rng.randint(32, 0x7FF), rng.randint(0x800, 0xFFFF), rng.randint(0x10000, 0x10FFFF)]))
                 for _ in range(rng.randint(1, 80))]  # fmt: skip
        texts.append("".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF))
    for _ in range(300):  # chat turns, code, whitespace runs and long repeats
        words = ["what", "is", "the", "capital", "of", "France?", "naïve", "café", "東京"]
        q = " ".join(rng.choice(words) for _ in range(20))
        texts.append(CHAT.format(q=q, a=CODE * rng.randint(1, 3)))
        texts.append(" " * rng.randint(1, 40) + "word" + "\n" * rng.randint(1, 9) + "\t" * rng.randint(0, 5))
        texts.append(rng.choice(["ab", "the ", "0", "ー", "=="]) * rng.randint(50, 2000))
    return texts


def decode_cases(vocab: int, seed: int = 1) -> list[list[int]]:
    """Random id sequences: byte tokens (valid and broken UTF-8), specials, anything, out of range."""
    rng = random.Random(seed)
    byte_ids = list(range(238, 238 + 256)) if vocab > 1000 else []
    cases = []
    for _ in range(500):
        pool = [rng.randrange(vocab) for _ in range(50)] + byte_ids[:256:7] + [0, 1, 2, 3, 106, 107]
        cases.append([rng.choice(pool) for _ in range(rng.randint(0, 40))])
    return cases


def compare(native, tokenizer_json: Path) -> tuple[int, int, float]:
    """(texts, characters, C++ seconds); fails on the first text whose ids or text differ."""
    hf = Tokenizer.from_file(str(tokenizer_json))
    texts = corpus()
    decodes = decode_cases(hf.get_vocab_size())
    lines = [json.dumps(t) for t in texts] + [json.dumps(ids) for ids in decodes]
    started = time.perf_counter()
    done = subprocess.run(
        [str(native.gemma_run), "tokenize", str(tokenizer_json)],
        input="\n".join(lines) + "\n", capture_output=True, text=True, env=native.env, timeout=600,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.split("\n") if line]
    assert len(results) == len(lines)
    for text, enc, ours in zip(texts, hf.encode_batch(texts), results, strict=False):
        assert ours["ids"] == enc.ids, f"ids differ for {text[:200]!r}"
        assert ours["text"] == hf.decode(enc.ids, skip_special_tokens=True), f"text differs for {text[:200]!r}"
    for ids, ours in zip(decodes, results[len(texts) :], strict=True):
        assert ours["text"] == hf.decode(ids, skip_special_tokens=False), f"decode differs for {ids}"
    return len(texts), sum(map(len, texts)), seconds


def test_tiny_tokenizer(cpp_runtime, tmp_path: Path) -> None:
    random_checkpoint.write_tokenizer(tmp_path)
    count, chars, _ = compare(cpp_runtime, tmp_path / "tokenizer.json")
    assert count > 4000 and chars > 1_000_000


@pytest.mark.real
@pytest.mark.skipif(os.environ.get("GEMMA_EXPORT_SKIP_REAL") == "1", reason="GEMMA_EXPORT_SKIP_REAL=1")
def test_real_gemma3_tokenizer(cpp_runtime) -> None:
    from gemma_export.dev import real_checkpoint

    path = real_checkpoint.hf_folder() / "tokenizer.json"
    assert Tokenizer.from_file(str(path)).get_vocab_size() == 262_144
    count, chars, seconds = compare(cpp_runtime, path)
    print(f"real Gemma 3 tokenizer: {count} texts, {chars} characters identical; C++ {seconds:.2f} s incl. load")
