"""`gemma-export demo`: the embedded default, built, verified and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gemma_export.cli.app import JsonFlag, app


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Working folder for the demo.")] = Path("build/demo"),
    prompt: Annotated[str, typer.Option()] = "The quick brown fox",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    as_json: JsonFlag = False,
) -> None:
    """Build the embedded default (a small random-weight Gemma 3), verify it, generate, and summarise."""
    from gemma_export.cli.report import run_demo

    summary = run_demo(out, prompt=prompt, max_new_tokens=max_new_tokens, as_json=as_json)
    if as_json:
        print(json.dumps({"ok": True, **summary}, indent=2))
