"""`gemma-export inspect`: an artifact's manifest, summarised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gemma_export.cli.app import JsonFlag, app
from gemma_export.manifest import Manifest
from gemma_export.pipeline.progress import human_bytes
from gemma_export.verify.gate import describe_parity

console = Console(highlight=False)


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `build`.")],
    as_json: JsonFlag = False,
) -> None:
    """Show an artifact's contract: model, inputs/outputs, carried state, files, parity."""
    manifest = Manifest.read(artifact)
    if as_json:
        print(json.dumps({"ok": True, "manifest": manifest.to_json()}, indent=2))
    else:
        describe_manifest(manifest)


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
