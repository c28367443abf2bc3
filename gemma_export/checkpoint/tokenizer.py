"""A checkpoint's tokenizer, as the build's stages read it (calibration text, the int4 mix's common tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma_export.checkpoint import gguf


def find(checkpoint_dir: Path) -> Any | None:
    """The checkpoint's `tokenizers.Tokenizer`: its tokenizer.json, or one built from a GGUF's vocabulary; None
    when it has neither."""
    from tokenizers import Tokenizer

    found = gguf.find_gguf(checkpoint_dir)
    vocab = gguf.read_vocabulary(gguf.read_header(found)) if found is not None else None
    if vocab is not None:
        return gguf.build_tokenizer(vocab)
    path = Path(checkpoint_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None
