"""`gemma-export embed`: texts -> (task prompt + text) -> tokens -> the encoder artifact -> embeddings.

The prompt is applied as sentence-transformers applies it: its text is prepended to each input, and the
whole is tokenized with the special tokens the tokenizer adds (Gemma's <bos>, ...), then cut to the
model's maximum sequence length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.runtime.generation import check_threads, load_tokenizer
from gemma_export.runtime.session import OrtEncoder, left_pad


def prompt_for(manifest: Manifest, task: str | None) -> str:
    head = manifest.model.head
    prompts = head.prompts if head is not None else {}
    name = task if task is not None else (head.default_prompt_name if head is not None else None)
    if name is None:
        return ""
    if name not in prompts:
        raise BadInput(f"--task {name!r} is not one of this model's prompts: {', '.join(sorted(prompts)) or 'none'}")
    return prompts[name]


def tokenize(tokenizer, texts: list[str], prompt: str, max_length: int) -> list[list[int]]:
    return [enc.ids[:max_length] for enc in tokenizer.encode_batch([prompt + t for t in texts])]


def run(artifact_dir: Path, *, texts: list[str], task: str | None, threads: int = 0) -> dict[str, Any]:
    manifest = Manifest.read(artifact_dir)
    if not manifest.is_embedding_model:
        raise BadInput(f"{artifact_dir}: not an embedding artifact (use `gemma-export generate`)")
    if not texts:
        raise BadInput("give at least one --text")
    check_threads(threads)
    prompt = prompt_for(manifest, task)
    tokenizer = load_tokenizer(artifact_dir)
    batch = tokenize(tokenizer, texts, prompt, manifest.build.max_length)
    cfg = manifest.model.config
    ids, mask = left_pad(batch, cfg.pad_token_id)
    embeddings, _ = OrtEncoder(artifact_dir, manifest, threads=threads).embed(ids, mask)
    return {
        "artifact": str(artifact_dir),
        "prompt": prompt,
        "dim": int(embeddings.shape[-1]),
        "outputs": [
            {"text": t, "tokens": len(b), "embedding": np.asarray(e, dtype=float).round(7).tolist()}
            for t, b, e in zip(texts, batch, embeddings, strict=True)
        ],
    }
