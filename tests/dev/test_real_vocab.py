"""A random checkpoint beside the real Gemma 3 tokenizer (gemma_export/dev/real_vocab.py), on tiny stand-in folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma_export.dev import real_vocab
from gemma_export.errors import BadInput


def folder(path: Path, vocab: int, files: dict[str, str]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_weights_linked_tokenizer_copied(tmp_path: Path) -> None:
    ckpt = folder(tmp_path / "ckpt", 262144, {
        "model-00001-of-00001.safetensors": "w", "model.safetensors.index.json": "{}", "generation_config.json": "{}",
        "tokenizer.json": "tiny", "tokenizer_config.json": "tiny", "special_tokens_map.json": "tiny", "README.md": "",
    })  # fmt: skip
    real = folder(tmp_path / "real", 262144, {"tokenizer.json": "real", "tokenizer_config.json": "real"})
    out = real_vocab.with_real_vocab(ckpt, tmp_path / "out", real)
    linked = sorted(p.name for p in out.iterdir() if p.is_symlink())
    assert linked == ["config.json", "generation_config.json", "model-00001-of-00001.safetensors",
                      "model.safetensors.index.json"]  # fmt: skip
    assert all((out / n).resolve() == ckpt / n for n in linked)
    copied = sorted(p.name for p in out.iterdir() if not p.is_symlink())
    assert copied == ["tokenizer.json", "tokenizer_config.json"]  # the tiny special_tokens_map is not kept
    assert (out / "tokenizer.json").read_text() == "real" and (ckpt / "tokenizer.json").read_text() == "tiny"
    real_vocab.with_real_vocab(ckpt, tmp_path / "out", real)  # made again: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out", "real"]  # no temporary left


def test_vocab_mismatch_is_one_line(tmp_path: Path) -> None:
    ckpt = folder(tmp_path / "ckpt", 512, {"model.safetensors": "w"})
    real = folder(tmp_path / "real", 262144, {"tokenizer.json": "real"})
    with pytest.raises(BadInput, match="vocab_size 512 is not the real tokenizer's 262144"):
        real_vocab.with_real_vocab(ckpt, tmp_path / "out", real)
    assert not (tmp_path / "out").exists()
