"""`gemma-export generate`: greedy or sampled tokens from an artifact (runtime/generation.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gemma_export.cli.app import JsonFlag, app, emit
from gemma_export.errors import BadInput


@app.command()
def generate(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `build`.")],
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt text; repeat for a batch.")] = None,
    token_ids: Annotated[
        str | None, typer.Option("--token-ids", help="Comma-separated prompt token ids instead of text.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = no limit.")] = 0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = all cores).")] = 0,
    image: Annotated[
        list[Path] | None,
        typer.Option(help="An image (PNG, JPEG, ...) for the next <start_of_image> of the prompts; repeatable."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Generate text with the artifact on ONNX Runtime."""
    from gemma_export.runtime import generation

    if image:  # an image + text artifact (README "Image prompts")
        from gemma_export.runtime import images
        from gemma_export.runtime.session import Sampling

        if token_ids is not None:
            raise BadInput("--image needs --prompt text with an image marker (not --token-ids)")
        generation.check_threads(threads)
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        result = images.run(artifact, prompts=prompt or [], images=image, max_new_tokens=max_new_tokens,
                            sampling=sampling, threads=threads)  # fmt: skip
        emit(result, as_json, "\n".join(r["text"] for r in result["outputs"]))
        return

    result = generation.run(
        artifact,
        prompts=prompt or [],
        token_ids=token_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        threads=threads,
    )
    emit(result, as_json, "\n".join(r["text"] for r in result["outputs"]))
