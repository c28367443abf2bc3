"""Stage reporting: a live line per stage on a terminal, plain log lines otherwise (CI logs)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    bytes: int | None = None
    peak_rss: int | None = None  # the process's peak resident bytes (VmHWM) when the stage ended; None off Linux
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
        if not live and not self.quiet:
            self.console.print(f"[gemma-export] {name}: started", markup=False)
        with _live_line(self.console, name) if live else contextlib.nullcontext() as update:
            if live:
                record.report = update
                record._last_logged = -1  # a live line takes every update
            elif not self.quiet:
                record.report = lambda text: self.console.print(f"[gemma-export] {text}", markup=False)
            yield record
        record.seconds = time.perf_counter() - start
        record.peak_rss = peak_rss_bytes()
        self.records.append(record)
        if not self.quiet:
            size = f", {human_bytes(record.bytes)} written" if record.bytes is not None else ""
            rss = f", peak RSS {human_bytes(record.peak_rss)}" if record.peak_rss is not None else ""
            self.console.print(f"[gemma-export] {name}: done in {record.seconds:.1f} s{size}{rss}", markup=False)

    def to_json(self) -> list[dict]:
        return [{"stage": r.name, "seconds": round(r.seconds, 3), "bytes": r.bytes, "peak_rss": r.peak_rss}
                for r in self.records]  # fmt: skip


def peak_rss_bytes() -> int | None:
    """The process's resident high-water mark so far (VmHWM; mapped file pages that were touched count too).

    It only grows, so the stage that raised it is the first whose `peak_rss` shows the new value; it is never
    reset (clear_refs would also reset what `time -v` and a parent's wait4 report as the process's peak).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _live_line(console: Console, name: str) -> Iterator[Callable[[str], None]]:
    """A terminal line: spinner, stage, time elapsed (ticking on its own), and the latest report (bytes)."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(name, total=None, note="")
        yield lambda text: bar.update(task, note=text)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
