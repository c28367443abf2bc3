"""`gemma-export inspect`: an artifact's manifest, summarised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gemma_export.cli.app import JsonFlag, app
from gemma_export.manifest import Manifest


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `build`.")],
    as_json: JsonFlag = False,
) -> None:
    """Show an artifact's contract: model, inputs/outputs, carried state, files, parity."""
    from gemma_export.cli.report import describe_manifest

    manifest = Manifest.read(artifact)
    if as_json:
        print(json.dumps({"ok": True, "manifest": manifest.to_json()}, indent=2))
    else:
        describe_manifest(manifest)
