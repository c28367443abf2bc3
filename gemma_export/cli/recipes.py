"""`gemma-export recipes list|show`: the shipped model variants."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gemma_export.cli.app import JsonFlag, app

recipes_app = typer.Typer(no_args_is_help=True, help="The shipped model variants (recipes/*.toml).")
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list(as_json: JsonFlag = False) -> None:
    """One line per recipe: name, targets, precisions, quantizations, description."""
    from gemma_export.config import recipes

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
    from gemma_export.config import recipes

    loaded = recipes.load(name)
    if as_json:
        print(json.dumps({"ok": True, "recipe": loaded.to_json()}, indent=2))
    else:
        print(f"# {loaded.path} (sha256 {loaded.sha256})")
        print(loaded.path.read_text(encoding="utf-8"), end="")
