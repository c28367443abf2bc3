"""`gemma-export generate`: prompts -> tokens -> the artifact on ONNX Runtime -> text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.runtime.session import OrtDecoder, Sampling, check_prompts, generate


def load_tokenizer(artifact_dir: Path):
    from tokenizers import Tokenizer

    path = Path(artifact_dir) / "tokenizer.json"
    if not path.is_file():
        raise BadInput(f"{artifact_dir}: no tokenizer.json in the artifact; pass --token-ids instead of --prompt")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exception on a malformed file
        raise BadInput(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def parse_token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise BadInput(f"--token-ids must be comma-separated integers, got {text!r}") from None


def check_threads(threads: int) -> None:
    """ONNX Runtime starts every thread it is asked for: a typo would hang the machine, not fail."""
    max_threads = 4 * (os.cpu_count() or 1)
    if not 0 <= threads <= max_threads:
        raise BadInput(f"--threads must be between 0 (all cores) and {max_threads}, got {threads}")


def run(
    artifact_dir: Path,
    *,
    prompts: list[str],
    token_ids: str | None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    threads: int = 0,
) -> dict[str, Any]:
    manifest = Manifest.read(artifact_dir)
    cfg = manifest.model.config
    check_threads(threads)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if bool(prompts) == (token_ids is not None):
        raise BadInput("give either --prompt (repeatable) or --token-ids")
    tokenizer = None
    if token_ids is not None:
        batch = [parse_token_ids(token_ids)]
    else:
        tokenizer = load_tokenizer(artifact_dir)
        batch = [enc.ids for enc in tokenizer.encode_batch(prompts)]
    check_prompts(batch, cfg.vocab_size, manifest.build.max_length, max_new_tokens)

    decoder = OrtDecoder(artifact_dir, manifest, threads=threads)
    new = generate(
        decoder,
        batch,
        max_new_tokens,
        eos_ids=cfg.eos_token_ids,
        pad_id=cfg.pad_token_id,
        sampling=sampling,
    )
    outputs = []
    for prompt_ids, tokens in zip(batch, new, strict=True):
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer else ",".join(map(str, tokens))
        outputs.append({"prompt_ids": prompt_ids, "new_ids": tokens, "text": text})
    return {"artifact": str(artifact_dir), "outputs": outputs}
