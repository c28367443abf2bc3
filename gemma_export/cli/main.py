"""`gemma-export`: runs a command and turns every failure into one line and an exit code.

Exit codes: 0 ok, 1 a parity gate failed, 2 bad input (one line on stderr), 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.exceptions import TyperException

# Each command module registers itself on `app` when imported.
from gemma_export.cli import bench, build, demo, embed, generate, inspect, recipes, verify  # noqa: F401
from gemma_export.cli.app import app
from gemma_export.errors import GemmaExportError


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
