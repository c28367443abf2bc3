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
    # Peak resident bytes when the stage ended (None off Linux): the max over the process tree, i.e. this
    # process's VmHWM or the largest VmHWM a child process reported (tree_peak_rss_bytes), whichever is larger.
    peak_rss: int | None = None
    peak_rss_self: int | None = None  # this process's own VmHWM
    children: list[ChildPeak] = field(default_factory=list)  # the child processes that ran during the stage
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
            first_child = len(CHILDREN)
            yield record
        record.seconds = time.perf_counter() - start
        record.peak_rss_self, record.peak_rss = peak_rss_bytes(), tree_peak_rss_bytes()
        record.children = CHILDREN[first_child:]
        self.records.append(record)
        if not self.quiet:
            size = f", {human_bytes(record.bytes)} written" if record.bytes is not None else ""
            rss = f", peak RSS {human_bytes(record.peak_rss)}" if record.peak_rss is not None else ""
            if record.children:  # a child's peak, and the two together (this process's RSS while it ran + it)
                rss += f" (this process {human_bytes(record.peak_rss_self)}" + "".join(
                    f", {c.name} {human_bytes(c.peak_rss)}, {human_bytes(c.together)} together"
                    for c in record.children) + ")"  # fmt: skip
            line = f"[gemma-export] {name}: done in {record.seconds:.1f} s{size}{rss}"
            self.console.print(line, markup=False, soft_wrap=True)  # one line, however narrow the console

    def note(self, text: str) -> None:
        """One log line between stages (unless quiet: --json callers read the manifest)."""
        if not self.quiet:
            self.console.print(f"[gemma-export] {text}", markup=False, soft_wrap=True)

    def to_json(self) -> list[dict]:
        def entry(r: StageRecord) -> dict:
            out = {"stage": r.name, "seconds": round(r.seconds, 3), "bytes": r.bytes, "peak_rss": r.peak_rss}
            if r.children:
                out.update(peak_rss_self=r.peak_rss_self, children=[c.to_json() for c in r.children])
            return out

        return [entry(r) for r in self.records]


@dataclass(frozen=True)
class ChildPeak:
    """A child process's peak (its own VmHWM, which it reports when it ends: the parent's view of a child's
    memory, ru_maxrss, would count the parent's own pages at the fork), and this process's resident bytes
    (VmRSS) while it ran: their sum bounds what the two held together."""

    name: str
    peak_rss: int
    parent_rss: int

    @property
    def together(self) -> int:
        return self.peak_rss + self.parent_rss

    def to_json(self) -> dict:
        return {"process": self.name, "peak_rss": self.peak_rss, "parent_rss": self.parent_rss,
                "together": self.together}  # fmt: skip


CHILDREN: list[ChildPeak] = []  # every child process whose peak was reported, in this process's life


def tree_peak_rss_bytes() -> int | None:
    """The peak resident bytes of this process or any child process it reported (record_child), whichever is
    larger: what a build's `peak_rss` shows, so that memory moved to a child is never hidden."""
    own = peak_rss_bytes()
    return max([own, *(c.peak_rss for c in CHILDREN)]) if own is not None else None


def record_child(name: str, peak_rss: int | None, parent_rss: int | None) -> None:
    if peak_rss is not None:
        CHILDREN.append(ChildPeak(name, peak_rss, parent_rss or 0))


def resident_bytes() -> int | None:
    """This process's resident bytes now (VmRSS)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """The process's resident high-water mark so far (VmHWM; mapped file pages that were touched count too).

    It only grows, so the stage that raised it is the first whose `peak_rss` shows the new value; it is never
    reset (clear_refs would also reset what `time -v` and a parent's wait4 report as the process's peak).
    """
    return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
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
