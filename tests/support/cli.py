"""Running the CLI in-process and reading its one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gemma_export.cli.main import main

# What a build prints on stderr while it runs (not a terminal): `[gemma-export] load: started`, `... done in`.
PROGRESS = re.compile(r"\[gemma-export\] [a-z]+: (started|done in .*)")


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str, *facts: str, prefix: str = "gemma-export: error:") -> str:
    """The one error line of stderr; anything before it may only be the build's progress lines."""
    lines = err.splitlines()
    assert lines, "nothing on stderr"
    *before, last = lines
    assert all(PROGRESS.fullmatch(line) for line in before), f"stderr is not one error line:\n{err}"
    assert last.startswith(prefix), err
    assert "Traceback" not in err
    for fact in facts:
        assert fact in last, f"{fact!r} not in {last!r}"
    return last


def assert_no_output(out: Path) -> None:
    """Neither OUT_DIR nor a staging (`.OUT.partial-*`) or replaced (`.OUT.old-*`) sibling is left."""
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers
