"""A loaded session's weights file: what of it stays in memory once ONNX Runtime has packed the weights.

ONNX Runtime memory-maps the external data file (model.onnx.data) and, on loading, reads every MatMul weight
through that mapping to pre-pack it into its own buffers, then unmaps the original. What it keeps mapped is
what no kernel packed: above all the tied embedding's lookup table, which `targets/ort_cpu.alias_lookup_tables`
points at the head's bytes so that it is stored and resident once. A lookup reads a few rows per token, so only
those pages should be resident. Two things make far more resident (measured, Gemma-3-270M fp32, Linux 6.18):

* The pre-packing read the whole file sequentially, so the page cache holds it in large folios (up to 2 MiB);
  a lookup's fault maps the whole folio around the row: 128 random ids left 185 MiB of the 640 MiB table in
  the process's resident set (1,316 MiB in all, against 1,140 after `settle_weights`).
* Read-around: a fault on a cold page reads and maps the pages around it (64 KiB), for a row of 2.5 KiB.

`settle_weights` runs once the session is open: it drops the file's page-cache pages that no mapping holds
(fdatasync, then posix_fadvise DONTNEED, which skips pages not yet written back; nothing packed is read from the
file again; the lookup's rows come back from disk as
they are used, which costs the first prompts a little time) and marks this process's mappings of the file
for random access (madvise MADV_RANDOM: a fault reads and maps its own page only). The file's pages a kernel
still reads are mapped, so they stay. Off Linux both calls are no-ops. The C++ runtime (and through it Java)
does the same in `cpp/src/pages.cpp`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from pathlib import Path

from gemma_export import libc

_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s+(/.*)$")


def settle_weights(path: Path) -> None:
    """After a session loaded the weights file `path`: drop its unmapped pages from the page cache and read the
    rest of it page by page (see the module's doc)."""
    if not hasattr(os, "posix_fadvise") or not Path(path).is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a page not yet written back (a build just made the file) stays
            os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    for start, end in mappings_of(path):
        libc.madvise(start, end - start, getattr(mmap, "MADV_RANDOM", None))


def mappings_of(path: Path) -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of the file `path` (none off Linux)."""
    target = os.path.realpath(path)
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        match = _MAPS_LINE.match(line)
        if match and match.group(3) == target:
            spans.append((int(match.group(1), 16), int(match.group(2), 16)))
    return spans


def resident_bytes(path: Path) -> int:
    """Resident bytes (smaps' Rss) of this process's mappings of the file `path`; 0 off Linux."""
    target, total, inside = os.path.realpath(path), 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        match = _MAPS_LINE.match(line)
        if match or re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = bool(match) and match.group(3) == target
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
