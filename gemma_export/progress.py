"""Stage reporting: a live line per stage on a terminal, plain log lines otherwise (CI logs)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.console import Console


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    bytes: int | None = None
    report: Callable[[str], None] | None = field(default=None, repr=False)
    _last_logged: int = field(default=0, repr=False)

    def progress(self, written: int) -> None:
        """Bytes written so far: the live line shows every update, a log gets a line per 512 MiB."""
        self.bytes = written
        if self.report is not None and (written - self._last_logged >= LOG_EVERY_BYTES or self._last_logged < 0):
            self._last_logged = written
            self.report(f"{self.name}: {human_bytes(written)} written")


LOG_EVERY_BYTES = 512 << 20


@dataclass
class Stages:
    """Times each stage; prints progress to stderr unless quiet (e.g. with --json)."""

    quiet: bool = False
    records: list[StageRecord] = field(default_factory=list)
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        record = StageRecord(name)
        start = time.perf_counter()
        live = self.console.is_terminal and not self.quiet
        status = self.console.status(f"{name}...") if live else contextlib.nullcontext()
        if not live and not self.quiet:
            self.console.print(f"[gemma-export] {name}: started", markup=False)
        with status as shown:
            if live:
                record.report = lambda text: shown.update(text)
                record._last_logged = -1  # a live line takes every update
            elif not self.quiet:
                record.report = lambda text: self.console.print(f"[gemma-export] {text}", markup=False)
            yield record
        record.seconds = time.perf_counter() - start
        self.records.append(record)
        if not self.quiet:
            size = f", {human_bytes(record.bytes)} written" if record.bytes is not None else ""
            self.console.print(f"[gemma-export] {name}: done in {record.seconds:.1f} s{size}", markup=False)

    def to_json(self) -> list[dict]:
        return [{"stage": r.name, "seconds": round(r.seconds, 3), "bytes": r.bytes} for r in self.records]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
