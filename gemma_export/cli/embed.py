"""`gemma-export embed`: sentence embeddings from an EmbeddingGemma artifact (runtime/embed.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gemma_export.cli.app import JsonFlag, app, emit


@app.command()
def embed(
    artifact: Annotated[Path, typer.Argument(help="Embedding artifact folder made by `build`.")],
    text: Annotated[list[str], typer.Option(help="Text to embed; repeat for a batch.")],
    task: Annotated[
        str | None, typer.Option(help="Prompt name from the model's prompts (query, document, ...).")
    ] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = all cores).")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Embed texts with an EmbeddingGemma artifact (the task prompt applied as sentence-transformers does)."""
    from gemma_export.runtime import embed as embedding

    result = embedding.run(artifact, texts=text, task=task, threads=threads)
    lines = [f"{len(r['embedding'])} dims, prompt {result['prompt']!r}: {r['text']!r} -> "
             f"[{', '.join(f'{v:.4f}' for v in r['embedding'][:4])}, ...]" for r in result["outputs"]]  # fmt: skip
    emit(result, as_json, "\n".join(lines))
