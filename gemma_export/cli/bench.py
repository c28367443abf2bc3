"""`gemma-export bench`: speed and memory beside the compared systems (bench/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gemma_export.cli.app import JsonFlag, app
from gemma_export.errors import BadInput


@app.command()
def bench(
    artifact: Annotated[Path | None, typer.Argument(help="Artifact folder (or use --random).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="The artifact's checkpoint, for the other systems.")] = None,
    random: Annotated[
        str | None, typer.Option("--random", help="Benchmark a random-weight model of a published size.")
    ] = None,
    layers: Annotated[int | None, typer.Option(help="With --random: keep only the first N layers.")] = None,
    quant: Annotated[
        str | None, typer.Option(help="With --random: build with `gemma-export build --quant QUANT` (e.g. int4).")
    ] = None,
    new_tokens: Annotated[str, typer.Option(help="Decoders: comma-separated generation lengths.")] = "256,2048,8192",
    prompt_tokens: Annotated[str, typer.Option(help="Decoders: comma-separated prompt lengths.")] = "16",
    batch_sizes: Annotated[
        str | None,
        typer.Option(help="Comma-separated batch sizes (default: 1 for decoders, 1,8,32 for embedding models)."),
    ] = None,
    seq_lengths: Annotated[str, typer.Option(help="Embedding models: comma-separated sentence lengths.")] = "64,512",
    threads: Annotated[int, typer.Option(help="Threads per system (0 = all cores).")] = 0,
    repeat: Annotated[int, typer.Option(min=1, help="Decoders: runs per system and cell; the median is shown.")] = 1,
    compare: Annotated[bool, typer.Option(help="Also run the other systems (see --systems) in the same run.")] = True,
    systems: Annotated[
        str | None,
        typer.Option(
            help="Other systems, comma-separated: transformers, genai, llama.cpp (default: every one available; "
            "llama.cpp when --gguf is given)."
        ),
    ] = None,
    gguf: Annotated[
        list[str] | None,
        typer.Option(
            "--gguf",
            help="llama.cpp's model: a GGUF file (repeatable or comma-separated, e.g. Q4_K_M and its F32 "
            "conversion); a row per file.",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per measurement.")] = 3600.0,
    workdir: Annotated[
        Path, typer.Option(help="Where --random checkpoints and artifacts, and genai's models, are kept.")
    ] = Path("build/bench"),
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="With --random: build the artifact again (e.g. after a code change).")
    ] = False,
    json_out: Annotated[Path | None, typer.Option(help="Also write the JSON result to this file.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Speed and memory of an artifact beside the alternatives in the same run: decoders against transformers
    eager, onnxruntime-genai's own build of the checkpoint and llama.cpp on GGUF files (prefill, first token,
    decode tokens/s, peak RSS), embedding artifacts (sentences/s) against sentence-transformers."""
    from gemma_export.bench import run as bench_mod
    from gemma_export.pipeline.progress import Stages
    from gemma_export.runtime.generation import check_threads

    counts = bench_mod.parse_counts(new_tokens)
    prompts = bench_mod.parse_sizes(prompt_tokens, "--prompt-tokens")
    lengths = bench_mod.parse_sizes(seq_lengths, "--seq-lengths")
    if batch_sizes is not None:
        bench_mod.parse_sizes(batch_sizes, "--batch-sizes")
    others = bench_mod.parse_systems(systems, compare)
    ggufs = bench_mod.parse_ggufs(gguf, others)
    check_threads(threads)
    if quant is not None and random is None:
        raise BadInput("--quant applies to --random (an artifact's quantization is read from its manifest)")
    stages = Stages(quiet=as_json)
    build_info = None
    if random is not None:
        checkpoint, artifact, build_info = bench_mod.prepare_random(
            random, workdir, layers, stages, quant, timeout, rebuild
        )
    elif artifact is None:
        raise BadInput("give an ARTIFACT folder or --random NAME")
    if bench_mod.is_embedding_artifact(artifact):
        sizes = bench_mod.parse_sizes(batch_sizes or "1,8,32", "--batch-sizes")
        result = bench_mod.run_embedding_bench(
            artifact, checkpoint, sizes, lengths, threads, others, timeout, stages, ggufs=ggufs
        )
    else:
        result = bench_mod.run_bench(
            artifact, checkpoint, batch_sizes=bench_mod.parse_sizes(batch_sizes or "1", "--batch-sizes"),
            prompt_tokens=prompts, new_tokens=counts, threads=threads, systems=others, repeat=repeat,
            timeout=timeout, workdir=workdir, stages=stages, ggufs=ggufs,
        )  # fmt: skip
    if build_info is not None:
        result["build"] = build_info
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"ok": True, **result}, indent=2) + "\n")
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
    else:
        bench_mod.print_table(result)
