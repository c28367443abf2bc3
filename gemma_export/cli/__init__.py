"""The `gemma-export` command line: `app.py` (the Typer app, shared options), one module per command, `main.py`
(the entry point: one-line errors, exit codes)."""
