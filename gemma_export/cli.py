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


def _emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
    else:
        print(text)


@app.command()
def build(
    checkpoint: Annotated[Path, typer.Argument(help="Hugging Face-format checkpoint folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Artifact folder to create.")],
    target: Annotated[str, typer.Option(help="ort-cpu (ONNX Runtime, CPU) or onnx (portable graph).")] = "ort-cpu",
    precision: Annotated[str, typer.Option(help="Weights and activations: fp32.")] = "fp32",
    tolerance: Annotated[
        float | None,
        typer.Option(help="Parity gate vs the reference: max abs logit (default 1e-4) or embedding (1e-5) error."),
    ] = None,
    dim: Annotated[
        int | None, typer.Option(help="Embedding models: output dimension (Matryoshka: 768, 512, 256, 128).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Build an artifact from CHECKPOINT into OUT, verifying it against the PyTorch reference."""
    from gemma_export.build import BuildOptions
    from gemma_export.build import build as run_build
    from gemma_export.progress import Stages

    stages = Stages(quiet=as_json)
    options = BuildOptions(target=target, precision=precision, tolerance=tolerance, force=force, dim=dim)
    manifest = run_build(checkpoint, out, options, stages)
    _emit({"out": str(out), "stages": stages.to_json(), "parity": manifest["parity"]}, as_json,
          f"built {out}: {describe_parity(manifest['parity'])}")  # fmt: skip


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
            cfg, _, model = load.load_embedding(checkpoint, manifest["model"]["dim"])
        else:
            cfg, model = load.load_model(checkpoint)
        if cfg.to_json() != manifest["model"]["config"]:
            raise BadInput(f"{checkpoint}: config differs from the one the artifact was built from")
        tol = tolerance if tolerance is not None else manifest["parity"]["tolerance"]
        if embedding:
            report = verify_stage.compare_embeddings(TorchEncoder(model), OrtEncoder(artifact, manifest), cfg, tol)
        else:
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
    checkpoint: Annotated[Path | None, typer.Option(help="The artifact's checkpoint, for --compare.")] = None,
    random: Annotated[
        str | None, typer.Option("--random", help="Benchmark a random-weight model of a published size.")
    ] = None,
    layers: Annotated[int | None, typer.Option(help="With --random: keep only the first N layers.")] = None,
    new_tokens: Annotated[str, typer.Option(help="Comma-separated generation lengths.")] = "256,2048,8192",
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 16,
    batch_sizes: Annotated[
        str, typer.Option(help="Embedding models: comma-separated batch sizes (sentences per call).")
    ] = "1,8,32",
    seq_lengths: Annotated[str, typer.Option(help="Embedding models: comma-separated sentence lengths.")] = "64,512",
    threads: Annotated[int, typer.Option(help="Threads per system (0 = all cores).")] = 0,
    compare: Annotated[
        bool, typer.Option(help="Also run transformers eager (sentence-transformers for embeddings) in the same run.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per measurement.")] = 3600.0,
    workdir: Annotated[Path, typer.Option(help="Where --random checkpoints and artifacts are kept.")] = Path(
        "build/bench"
    ),
    as_json: JsonFlag = False,
) -> None:
    """Speed and memory of an artifact beside the PyTorch original in the same run: decode tokens/s against
    transformers eager, or (embedding artifacts) sentences/s against sentence-transformers."""
    from gemma_export import bench as bench_mod
    from gemma_export.generation import check_threads
    from gemma_export.progress import Stages

    counts = bench_mod.parse_counts(new_tokens)
    sizes = bench_mod.parse_sizes(batch_sizes, "--batch-sizes")
    lengths = bench_mod.parse_sizes(seq_lengths, "--seq-lengths")
    check_threads(threads)
    stages = Stages(quiet=as_json)
    if random is not None:
        checkpoint, artifact = bench_mod.prepare_random(random, workdir, layers, stages)
    elif artifact is None:
        raise BadInput("give an ARTIFACT folder or --random NAME")
    if bench_mod.is_embedding_artifact(artifact):
        result = bench_mod.run_embedding_bench(artifact, checkpoint, sizes, lengths, threads, compare, timeout, stages)
    else:
        result = bench_mod.run_bench(artifact, checkpoint, counts, prompt_tokens, threads, compare, timeout, stages)
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
    else:
        bench_mod.print_table(result)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Working folder for the demo.")] = Path("build/demo"),
    prompt: Annotated[str, typer.Option()] = "The quick brown fox",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
) -> None:
    """Build the embedded default (a small random-weight Gemma 3), verify it, generate, and summarise."""
    from gemma_export.report import run_demo

    run_demo(out, prompt=prompt, max_new_tokens=max_new_tokens)


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
