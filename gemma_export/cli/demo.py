"""`gemma-export demo`: the embedded default, built, verified and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gemma_export.cli.app import JsonFlag, app
from gemma_export.pipeline.progress import Stages, human_bytes

console = Console(highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Working folder for the demo.")] = Path("build/demo"),
    prompt: Annotated[str, typer.Option()] = "The quick brown fox",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    as_json: JsonFlag = False,
) -> None:
    """Build the embedded default (a small random-weight Gemma 3), verify it, generate, and summarise."""
    summary = run_demo(out, prompt=prompt, max_new_tokens=max_new_tokens, as_json=as_json)
    if as_json:
        print(json.dumps({"ok": True, **summary}, indent=2))


def run_demo(workdir: Path, prompt: str, max_new_tokens: int, as_json: bool = False) -> dict[str, Any]:
    """Embedded default checkpoint -> artifact -> verify -> generate, with a summary table (or, with
    `as_json`, nothing printed but the returned result)."""
    import time

    from gemma_export.dev import random_checkpoint
    from gemma_export.pipeline.build import build
    from gemma_export.pipeline.options import BuildOptions
    from gemma_export.runtime import generation

    workdir = Path(workdir)
    checkpoint, artifact = workdir / "checkpoint", workdir / "artifact"
    stages = Stages(quiet=as_json)
    with stages.stage("make checkpoint") as st:
        random_checkpoint.write_random_checkpoint(checkpoint, random_checkpoint.TINY_CONFIGS["gemma3_text"], seed=0)
        st.bytes = sum(f.stat().st_size for f in checkpoint.iterdir())
    if not as_json:
        console.print(
            f"embedded default: random-weight Gemma 3 checkpoint in {checkpoint} (real checkpoints: "
            f"`gemma-export build PATH -o OUT`)"
        )
    manifest = build(checkpoint, artifact, BuildOptions(force=True), stages)
    start = time.perf_counter()
    result = generation.run(artifact, prompts=[prompt], token_ids=None, max_new_tokens=max_new_tokens)
    gen_seconds = time.perf_counter() - start
    summary = {"artifact": str(artifact), "stages": stages.to_json(), "generate_seconds": round(gen_seconds, 3),
               "parity": manifest.to_json()["parity"], "prompt": prompt, "output": result["outputs"][0]}  # fmt: skip
    if as_json:
        return summary

    table = Table("stage", "seconds", "written", title=f"gemma-export demo -> {artifact}")
    for r in stages.records:
        table.add_row(r.name, f"{r.seconds:.2f}", human_bytes(r.bytes))
    table.add_row("generate", f"{gen_seconds:.2f}", f"{len(result['outputs'][0]['new_ids'])} tokens")
    console.print(table)
    parity = manifest.parity
    console.print(
        f"parity vs PyTorch reference (max abs logit error / logit scale {parity.logit_scale:.3g}): prefill "
        f"{parity.prefill:.2e}, decode {parity.decode:.2e} (gate {parity.tolerance:g}) on prompts of "
        f"{sorted({n for c in parity.cases for n in c.prompt_lengths})} tokens"
    )
    console.print(
        f"prompt: {prompt!r}\ngenerated (random weights, so not meaningful text): {result['outputs'][0]['text']!r}"
    )
    return summary
