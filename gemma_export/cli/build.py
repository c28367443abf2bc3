"""`gemma-export build`: a checkpoint (or a recipe's random one) to a verified artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gemma_export import targets
from gemma_export.cli.app import AllowPickleFlag, JsonFlag, app, emit
from gemma_export.errors import BadInput
from gemma_export.verify.gate import describe_parity


@app.command()
def build(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="Hugging Face-format checkpoint folder, a llama.cpp GGUF file (or a folder holding one), or "
            "--recipe NAME --random."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Artifact folder to create.")] = None,
    recipe: Annotated[
        str | None, typer.Option(help="Recipe name (see `recipes list`) or a recipe TOML file: checks and defaults.")
    ] = None,
    random: Annotated[
        bool, typer.Option("--random", help="With --recipe: build a random-weight checkpoint of the recipe's size.")
    ] = False,
    seed: Annotated[int, typer.Option(min=0, help="With --random: the weights' seed.")] = 0,
    layers: Annotated[
        int | None, typer.Option(min=1, help="With --random: keep the first N layers (a cheaper stand-in).")
    ] = None,
    random_dir: Annotated[
        Path, typer.Option(help="With --random: where random checkpoints are written once and reused.")
    ] = Path("build/random"),
    target: Annotated[
        str | None, typer.Option(help=f"One of: {', '.join(targets.NAMES)} (targets/). Default: {targets.DEFAULT}.")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32; --target tensorrt: also bf16 (16-bit products, float32 norms/residuals).")
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            help="Parity gate vs the reference: max abs logit error relative to the logit scale (default 2e-5) or "
            "max abs embedding error (1e-5)."
        ),
    ] = None,
    dim: Annotated[
        int | None, typer.Option(help="Embedding models: output dimension (Matryoshka: 768, 512, 256, 128).")
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            help="Weight-only quantization (MatMulNBits): none, int8, int4 (a mix: half the embedding and the "
            "o projections at int4, the rest at int8), int4-gptq (the same widths by GPTQ on calibration text), "
            "int4-rtn (int4's earlier name) or int4-plain (int4 everywhere). Default: none."
        ),
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(help="With --quant: input features per scale, a power of two >= 16 (default 32).")
    ] = None,
    min_top1: Annotated[
        float | None, typer.Option(help="With --quant: gate, least top-1 agreement with the fp32 reference.")
    ] = None,
    max_kl: Annotated[
        float | None, typer.Option(help="With --quant: gate, largest mean KL(reference || quantized) of the logits.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="With --quant int4-gptq: GPTQ's calibration text, a UTF-8 file (default: a text shipped with "
            "gemma-export)."
        ),
    ] = None,
    cache_layout: Annotated[
        str | None,
        typer.Option(
            help="Decoders' KV cache: full (every layer grows) or windowed (sliding-window layers keep "
            "only their window). Default: full (RecurrentGemma: windowed, its only layout)."
        ),
    ] = None,
    compute_capability: Annotated[
        str | None,
        typer.Option(help="--target tensorrt: GPUs to build engines for, of 8.0,8.6,8.9,12.0 (default 8.6)."),
    ] = None,
    onnx_only: Annotated[
        bool, typer.Option("--onnx-only", help="--target tensorrt: the graph and manifest only (no engines).")
    ] = False,
    engines: Annotated[
        str | None,
        typer.Option(help="--target tensorrt: inlined (function bodies), plugins (our plugins) or both (default)."),
    ] = None,
    profile: Annotated[
        list[str] | None,
        typer.Option(help="--target tensorrt: an optimization-profile axis, AXIS=MIN:OPT:MAX (batch, sequence, past)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: AllowPickleFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Build an artifact from CHECKPOINT into OUT, verifying it against the PyTorch reference."""
    from gemma_export.config import recipes
    from gemma_export.pipeline.build import build as run_build
    from gemma_export.pipeline.options import BuildOptions, check_output_location, with_recipe
    from gemma_export.pipeline.progress import Stages

    stages = Stages(quiet=as_json)
    chosen = recipes.load(recipe) if recipe is not None else None
    if (random or layers is not None) and (chosen is None or not random):
        raise BadInput("--random (and --layers) need --recipe NAME: the recipe gives the architecture")
    if random == (checkpoint is not None):
        raise BadInput("give either CHECKPOINT or --recipe NAME --random" if random else
                       "missing argument 'checkpoint' (a checkpoint folder, or --recipe NAME --random)")  # fmt: skip
    if out is None:
        raise BadInput("missing option '-o' / '--out': the artifact folder to create")
    given = {"target": target, "precision": precision, "tolerance": tolerance, "dim": dim, "quant": quant,
             "block_size": block_size, "min_top1": min_top1, "max_kl": max_kl,
             "cache_layout": cache_layout, "calibration": calibration,
             "compute_capabilities": compute_capability, "engines": engines,
             "profile": tuple(profile) if profile else None, "onnx_only": onnx_only or None}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    random_record = {"seed": seed, "layers": layers} if random else None
    options = BuildOptions(
        **given, force=force, allow_pickle=allow_pickle, recipe=chosen, random_checkpoint=random_record
    )
    options = with_recipe(options, set(given))
    options.check()  # before a random checkpoint of several GB is written
    if random:
        check_output_location(random_dir, out, force)
        checkpoint = _random_checkpoint(chosen.recipe, random_dir, seed, layers, stages)
    manifest = run_build(checkpoint, out, options, stages)
    result = {
        "out": str(out),
        "checkpoint": str(checkpoint),
        "stages": stages.to_json(),
        "parity": manifest.parity.model_dump(mode="json"),
    }
    emit(result, as_json, f"built {out}: {describe_parity(manifest.parity)}")


def _random_checkpoint(recipe: Any, root: Path, seed: int, layers: int | None, stages: Any) -> Path:
    from gemma_export.dev import random_checkpoint

    embedding = recipe.embedding
    with stages.stage(f"random checkpoint {recipe.name}"):
        return random_checkpoint.write_cached(
            root,
            recipe.name,
            recipe.architecture,
            seed=seed,
            layers=layers,
            dense=tuple(embedding.dense) if embedding else None,
            max_seq_length=embedding.max_seq_length if embedding else None,
            vision=recipe.vision,
        )
