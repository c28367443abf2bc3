"""The house rules: no import cycles, a torch-free runtime, one target registry, recipes shipped as package
data, and a lock that matches what the suite runs with."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import pkgutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gemma_export
from gemma_export import targets
from gemma_export.config import recipes
from gemma_export.targets.base import Target
from tests.support import ROOT

PACKAGE = ROOT / "gemma_export"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every gemma_export module `name` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gemma_export"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    return out - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_through_function_level_imports() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) & set(known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports() -> None:
    for info in pkgutil.walk_packages(gemma_export.__path__, "gemma_export."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def test_the_runtime_and_the_manifest_never_import_torch() -> None:
    """What an integrator's Python service loads: the client and the contract, not the exporter."""
    code = ("import sys\n"
            "import gemma_export.manifest, gemma_export.runtime.session, gemma_export.runtime.generation\n"
            "import gemma_export.runtime.embed, gemma_export.verify.child\n"
            "heavy = [m for m in ('torch', 'onnxscript', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_target_module_is_registered_under_its_name() -> None:
    helpers = {"__init__", "base", "genai_config"}
    packages = {p.parent.name for p in (PACKAGE / "targets").glob("*/__init__.py")}  # a target as a package
    on_disk = ({p.stem for p in (PACKAGE / "targets").glob("*.py")} | packages) - helpers
    registered = {targets.target(name) for name in targets.NAMES}
    assert {type(t).__module__.rsplit(".", 1)[1] for t in registered} == on_disk
    for name in targets.NAMES:
        found = targets.target(name)
        assert isinstance(found, Target) and found.name == name and found.providers
    assert targets.DEFAULT == "ort-cpu"


def test_an_unknown_target_is_one_line_naming_the_registered_ones() -> None:
    with pytest.raises(Exception, match=r"--target 'coreml' is not supported; choose one of: ort-cpu, onnx, tensorrt"):
        targets.target("coreml")


def test_recipes_are_package_data_and_every_one_parses() -> None:
    assert recipes.recipes_dir() == PACKAGE / "recipes"
    names = recipes.available()
    assert len(names) >= 14
    for name in names:
        assert recipes.load(name).recipe.name == name
    assert (ROOT / "recipes").resolve() == PACKAGE / "recipes"  # the design card's top-level folder


@pytest.mark.slow
def test_a_wheel_lists_every_recipe_from_outside_the_repository(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("gemma_export-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "gemma_export/pipeline/calibration.txt" in z.namelist()  # --quant int4's default text
        z.extractall(tmp_path / "site")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gemma_export\n"
            "assert gemma_export.__file__.startswith(sys.argv[1]), gemma_export.__file__\n"
            "from gemma_export.cli.main import main; sys.exit(main(['recipes', 'list']))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_EXPORT_RECIPES"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert listed == recipes.available()


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_declared_dependency_at_the_installed_version() -> None:
    """`make install` installs with constraints.txt: what the suite runs with is what the lock says (an upgrade
    is a deliberate commit of the lock, `make lock`)."""
    pins = locked()
    requires = importlib.metadata.requires("gemma-export") or []
    declared = {canonical(re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0]) for r in requires}
    assert declared - set(pins) == set(), "declared but not locked"
    for name in declared:
        assert importlib.metadata.version(name) == pins[name], name
