"""The `gemma-export` command line.

Exit codes: 0 ok, 1 a parity gate failed, 2 bad input (one line on stderr), 3 internal error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from gemma_export.errors import BadInput, GemmaExportError, ParityError
from gemma_export.verify import describe_parity

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn Gemma checkpoints into ONNX / ONNX Runtime artifacts and prove they compute what the model does.",
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable result on stdout.")]
AllowPickleFlag = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Read pickled weights (pytorch_model.bin, *.ckpt, *.pt) when there is no safetensors, with "
        "torch.load(weights_only=True) only: a file holding anything but tensors is refused.",
    ),
]


def _emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
    else:
        print(text)


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
        str | None, typer.Option(help="ort-cpu (ONNX Runtime, CPU) or onnx (portable graph). Default: ort-cpu.")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="Weights and activations: fp32.")] = None,
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
            help="Weight-only quantization (MatMulNBits): none, int8, int4 (int4 projections, int8 embedding) or "
            "int4-plain (int4 everywhere). Default: none."
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
    cache_layout: Annotated[
        str | None,
        typer.Option(
            help="Decoders' KV cache: full (every layer grows) or windowed (sliding-window layers keep "
            "only their window). Default: full (RecurrentGemma: windowed, its only layout)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: AllowPickleFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Build an artifact from CHECKPOINT into OUT, verifying it against the PyTorch reference."""
    from gemma_export import recipes
    from gemma_export.build import BuildOptions, check_output_location, with_recipe
    from gemma_export.build import build as run_build
    from gemma_export.progress import Stages

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
             "cache_layout": cache_layout}  # fmt: skip
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
    result = {"out": str(out), "checkpoint": str(checkpoint), "stages": stages.to_json(), "parity": manifest["parity"]}
    _emit(result, as_json, f"built {out}: {describe_parity(manifest['parity'])}")


def _random_checkpoint(recipe: Any, root: Path, seed: int, layers: int | None, stages: Any) -> Path:
    from gemma_export import random_checkpoint

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
        )


recipes_app = typer.Typer(no_args_is_help=True, help="The shipped model variants (recipes/*.toml).")
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list(as_json: JsonFlag = False) -> None:
    """One line per recipe: name, targets, precisions, quantizations, description."""
    from gemma_export import recipes

    rows = []
    for name in recipes.available():
        r = recipes.load(name).recipe
        rows.append({"name": name, "kind": r.kind, "targets": r.build.targets, "precisions": r.build.precisions,
                     "quantizations": r.build.quantizations, "description": r.description})  # fmt: skip
    if as_json:
        print(json.dumps({"ok": True, "recipes": rows}, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        offers = "/".join(r["precisions"] + r["quantizations"])
        print(f"{r['name']:<{width}}  {r['kind']:<9}  {offers:<14}  {r['description']}")


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or TOML file.")],
    as_json: JsonFlag = False,
) -> None:
    """A recipe, validated: its file as written (or, with --json, the parsed content and hash)."""
    from gemma_export import recipes

    loaded = recipes.load(name)
    if as_json:
        print(json.dumps({"ok": True, "recipe": loaded.to_json()}, indent=2))
    else:
        print(f"# {loaded.path} (sha256 {loaded.sha256})")
        print(loaded.path.read_text(encoding="utf-8"), end="")


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
    as_json: JsonFlag = False,
) -> None:
    """Generate text with the artifact on ONNX Runtime."""
    from gemma_export import generation

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
    _emit(result, as_json, "\n".join(r["text"] for r in result["outputs"]))


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `build`.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint to re-run parity against (else: only file hashes).")
    ] = None,
    tolerance: Annotated[float | None, typer.Option(help="Default: the tolerance the artifact was built with.")] = None,
    allow_pickle: AllowPickleFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Re-check an artifact: file hashes against its manifest, and parity against CHECKPOINT."""
    from gemma_export import load, package
    from gemma_export import verify as verify_stage
    from gemma_export.runtime import OrtDecoder, OrtEncoder, TorchDecoder, TorchEncoder

    manifest = package.read_manifest(artifact)
    changed = package.changed_files(artifact, manifest)
    if changed:
        raise ParityError(f"{artifact}: files changed since the build: {', '.join(changed)}")
    result: dict[str, Any] = {"artifact": str(artifact), "files": "unchanged"}
    text = f"{artifact}: {len(manifest['files'])} files match their manifest hashes"
    if checkpoint is not None:
        embedding = manifest["model"].get("task") == "sentence-embedding"
        if embedding:
            cfg, _, model = load.load_embedding(checkpoint, manifest["model"]["dim"], allow_pickle=allow_pickle)
        else:
            cfg, model = load.load_model(checkpoint, allow_pickle=allow_pickle)
            if "cache_layout" in manifest["build"]:  # the reference carries its state as the artifact does
                model.use_cache_layout(manifest["build"]["cache_layout"])
        if cfg.to_json() != manifest["model"]["config"]:
            raise BadInput(f"{checkpoint}: config differs from the one the artifact was built from")
        parity = manifest["parity"]
        if parity["metric"] == "agreement":  # a quantized artifact: the agreement gate it was built with
            if tolerance is not None:
                raise BadInput(f"--tolerance gates fp32 artifacts; this one is {parity['quant']} (agreement gate)")
            report = verify_stage.compare_agreement(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg,
                                                    parity["quant"], parity["min_top1"], parity["max_kl"])  # fmt: skip
        elif embedding:
            tol = tolerance if tolerance is not None else parity["tolerance"]
            report = verify_stage.compare_embeddings(TorchEncoder(model), OrtEncoder(artifact, manifest), cfg, tol)
        else:
            tol = tolerance if tolerance is not None else parity["tolerance"]
            report = verify_stage.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, tol)
        result["parity"] = report.to_json()
        text += f"\nparity: {report.summary()}"
        if not report.passed:
            if as_json:
                print(json.dumps({"ok": False, **result}, indent=2))
            raise ParityError(text.replace("\n", "; "))
    _emit(result, as_json, text)


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
    from gemma_export import embedding

    result = embedding.run(artifact, texts=text, task=task, threads=threads)
    lines = [f"{len(r['embedding'])} dims, prompt {result['prompt']!r}: {r['text']!r} -> "
             f"[{', '.join(f'{v:.4f}' for v in r['embedding'][:4])}, ...]" for r in result["outputs"]]  # fmt: skip
    _emit(result, as_json, "\n".join(lines))


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `build`.")],
    as_json: JsonFlag = False,
) -> None:
    """Show an artifact's contract: model, inputs/outputs, carried state, files, parity."""
    from gemma_export import package
    from gemma_export.report import describe_manifest

    manifest = package.read_manifest(artifact)
    if as_json:
        print(json.dumps({"ok": True, "manifest": manifest}, indent=2))
    else:
        describe_manifest(manifest)


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
    from gemma_export import bench as bench_mod
    from gemma_export.generation import check_threads
    from gemma_export.progress import Stages

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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Working folder for the demo.")] = Path("build/demo"),
    prompt: Annotated[str, typer.Option()] = "The quick brown fox",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    as_json: JsonFlag = False,
) -> None:
    """Build the embedded default (a small random-weight Gemma 3), verify it, generate, and summarise."""
    from gemma_export.report import run_demo

    summary = run_demo(out, prompt=prompt, max_new_tokens=max_new_tokens, as_json=as_json)
    if as_json:
        print(json.dumps({"ok": True, **summary}, indent=2))


def _one_line(text: str) -> str:
    """Messages are promised as one line; a foreign exception's may span several."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # no command: the help, as a usage error (typer's own path reports it as an exception)
        app(args=["--help"], standalone_mode=False, prog_name="gemma-export")
        return 2
    try:
        # typer >= 0.29 vendors click: its Exit/Abort/usage errors are typer's classes, not click's. In
        # non-standalone mode it turns a KeyboardInterrupt into an exit code that it *returns* (130).
        rv = app(args=args, standalone_mode=False, prog_name="gemma-export")
    except typer.Exit as e:
        rv = e.exit_code
    except typer.Abort:
        rv = 130
    except TyperException as e:  # usage: unknown option, missing argument, value of the wrong type
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"gemma-export: error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return 2
    except GemmaExportError as e:
        print(f"gemma-export: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        rv = 130
    except Exception as e:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("GEMMA_EXPORT_DEBUG"):
            raise
        print(
            f"gemma-export: internal error: {type(e).__name__}: {_one_line(str(e))} "
            "(GEMMA_EXPORT_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 3
    if rv == 130:
        print("gemma-export: interrupted", file=sys.stderr)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
