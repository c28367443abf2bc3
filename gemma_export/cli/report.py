"""Human-facing summaries: `inspect` and the `demo` walk-through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gemma_export.manifest import Manifest
from gemma_export.pipeline.progress import Stages, human_bytes
from gemma_export.verify.gate import describe_parity

console = Console(highlight=False)


def describe_manifest(manifest: Manifest) -> None:
    cfg, build = manifest.model.config.to_json(), manifest.build
    console.print(
        f"[bold]{manifest.model.type}[/bold]: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads of {cfg['head_dim']}, "
        f"vocab {cfg['vocab_size']}, window {cfg.get('sliding_window') or cfg.get('attention_window_size') or '-'}"
    )
    head = manifest.model.head
    if head is not None:  # an embedding model: pooling head and output size
        dense = " -> ".join(str(d["out_features"]) for d in head.dense) or "none"
        console.print(f"sentence embedding: mean pooling, dense {dense}, normalize {head.normalize}, "
                      f"dim {manifest.model.dim}, prompts {', '.join(head.prompts) or 'none'}")  # fmt: skip
    console.print(
        f"target {build.target} ({', '.join(build.providers)}), precision {build.precision}, opset {build.opset}, "
        f"domains {build.domains}, max length {build.max_length}"
        + (f", quant {build.quant}" if build.quant != "none" else "")
        + (f", cache layout {build.cache_layout}" if build.cache_layout else "")
    )
    shared = sum(s.shared_buffer for s in manifest.state)
    if shared:
        console.print(f'{shared} of {len(manifest.state)} caches may be shared buffers (README "Shared KV buffers")')
    io = Table("direction", "name", "dtype", "shape", title="Inputs and outputs")
    for direction in ("inputs", "outputs"):
        for v in _collapse([t.model_dump() for t in getattr(manifest, direction)]):
            shape = "[" + ", ".join(map(str, v["shape"])) + "]"
            if v.get("optional"):
                shape += f" (optional, default {v.get('default')})"
            io.add_row(direction[:-1], v["name"], v["dtype"], shape)
    console.print(io)
    files = Table("role", "path", "bytes", "sha256", title="Files")
    for role, f in manifest.files.items():
        files.add_row(role, f.path, human_bytes(f.bytes), f.sha256[:16] + "...")
    console.print(files)
    p = manifest.parity
    console.print(f"parity: {describe_parity(p)}: {'passed' if p.passed else 'FAILED'}")


def _collapse(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Show per-layer cache tensors as one row with a {i} placeholder."""
    import re

    seen: dict[str, dict[str, Any]] = {}
    for v in values:
        name = re.sub(r"\.(\d+)\.", ".{i}.", v["name"])
        if name not in seen:
            seen[name] = {**v, "name": name}
    return list(seen.values())


def run_demo(workdir: Path, prompt: str, max_new_tokens: int, as_json: bool = False) -> dict[str, Any]:
    """Embedded default checkpoint -> artifact -> verify -> generate, with a summary table (or, with
    `as_json`, nothing printed but the returned result)."""
    import time

    from gemma_export.dev import random_checkpoint
    from gemma_export.pipeline.build import BuildOptions, build
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
