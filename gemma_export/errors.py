"""Errors that reach the user, each with the exit code the CLI documents.

Exit codes: 0 ok, 1 a parity/quality gate failed, 2 bad input (an OUT_DIR that cannot be written, for want
of space or on a read-only disk, included), 3 internal error, 130 interrupted (cli.main).
Every message is one line: it names the file or option at fault and what was expected.
"""

from __future__ import annotations


class GemmaExportError(Exception):
    """Base class for errors reported to the user as one line, with an exit code."""

    exit_code = 3


class BadInput(GemmaExportError):
    """The user's checkpoint, config, option or prompt is wrong (exit code 2)."""

    exit_code = 2


class ParityError(GemmaExportError):
    """The artifact does not compute what the reference computes (exit code 1)."""

    exit_code = 1
