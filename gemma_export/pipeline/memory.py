"""The build's resident memory: the checkpoint's pages read without being kept, and the heap handed back.

The reference model's weights are views of a private mapping of the safetensors file (torch's `from_file`):
a page the process reads stays in its resident set (VmRSS, RssFile) until the file is unmapped, so streaming
every weight into model.onnx.data, or one forward pass of the reference, would leave the whole checkpoint
resident. A page of such a mapping that was never written is the file's page in the page cache, so

* `file_span` names the file bytes behind a tensor, for the package stage to copy them file to file in the
  kernel (`copy_file_range`, through onnx_ir's ExternalTensor) without reading them into the process;
* `drop_after_forward` hooks a model so that each module's weights leave the resident set once its forward
  has run (`madvise(MADV_DONTNEED)`: the next read maps them again from the page cache, no disk read).

Only mappings of regular files without a single written (private, "Anonymous") page qualify, so what is
dropped or copied is exactly the file's bytes. Off Linux (no /proc/self/smaps) nothing qualifies and both
are no-ops.
"""

from __future__ import annotations

import bisect
import gc
import mmap
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_export import libc

PAGE = mmap.PAGESIZE
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ (\d+)\s*(.*)$")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int  # the file offset of `start`
    path: str


class FileMappings:
    """This process's clean mappings of regular files (read from /proc/self/smaps when made)."""

    def __init__(self, smaps: str | None = None) -> None:
        if smaps is None:
            try:
                smaps = Path("/proc/self/smaps").read_text()
            except OSError:
                smaps = ""
        self.mappings: list[Mapping] = []
        current: Mapping | None = None
        for line in smaps.splitlines():
            header = _HEADER.match(line)
            if header:  # a mapping's first line; the next ones are its fields
                start, end, offset, inode, path = header.groups()
                clean = inode != "0" and path.startswith("/") and not path.endswith(" (deleted)")
                current = Mapping(int(start, 16), int(end, 16), int(offset, 16), path) if clean else None
                if current is not None:
                    self.mappings.append(current)
            elif current is not None and line.startswith("Anonymous:") and line.split()[1] != "0":
                self.mappings.remove(current)  # a written (copied-on-write) page: not the file's bytes any more
                current = None
        self.mappings.sort(key=lambda m: m.start)
        self._starts = [m.start for m in self.mappings]

    def find(self, address: int, nbytes: int) -> Mapping | None:
        """The clean file mapping holding all of [address, address + nbytes), if any."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0 or nbytes <= 0:
            return None
        m = self.mappings[i]
        return m if address + nbytes <= m.end else None

    def file_span(self, array: Any) -> tuple[str, int, int] | None:
        """(path, offset, length) of the file bytes that a C-contiguous torch tensor or numpy array is a view
        of, if it lies in a clean file mapping."""
        span = buffer_span(array)
        m = self.find(*span) if span is not None else None
        return (m.path, m.offset + span[0] - m.start, span[1]) if m is not None and span is not None else None

    def drop(self, spans: list[tuple[int, int]]) -> None:
        """Drop the pages of [address, address + nbytes) spans from the resident set (see the module's doc)."""
        for address, nbytes in spans:
            m = self.find(address, nbytes)
            if m is not None:  # whole pages, within the mapping: a neighbour's pages come back on its next read
                start, end = max(m.start, address // PAGE * PAGE), min(m.end, -(-(address + nbytes) // PAGE) * PAGE)
                libc.madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", None))


def buffer_span(array: Any) -> tuple[int, int] | None:
    """(address, nbytes) of a C-contiguous torch tensor or numpy array; None for anything else."""
    layout = _layout(array)
    if layout is None:
        return None
    address, shape, strides, itemsize = layout
    contiguous, step = True, itemsize
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        contiguous &= size == 1 or stride == step
        step *= size
    return (address, step) if contiguous else None


def extent(array: Any) -> tuple[int, int] | None:
    """(address, nbytes) of the memory a strided torch tensor or numpy array reads (a transposed view included);
    None for anything else."""
    layout = _layout(array)
    if layout is None:
        return None
    address, shape, strides, itemsize = layout
    if 0 in shape:
        return None
    low = sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if s < 0)
    high = sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if s > 0) + itemsize
    return address + low, high - low


def _layout(array: Any) -> tuple[int, tuple[int, ...], tuple[int, ...], int] | None:
    """(address, shape, strides in bytes, item size) of a CPU torch tensor or a numpy array."""
    if hasattr(array, "data_ptr") and hasattr(array, "element_size"):  # torch.Tensor, without importing torch
        if array.device.type != "cpu":
            return None
        size = array.element_size()
        return array.data_ptr(), tuple(array.shape), tuple(s * size for s in array.stride()), size
    interface = getattr(array, "__array_interface__", None)
    if interface is None or not hasattr(array, "strides"):
        return None
    return interface["data"][0], tuple(array.shape), tuple(array.strides), array.itemsize


def drop_resident(arrays: Iterable[Any]) -> None:
    """Drop the pages of these torch tensors or numpy arrays from the resident set, where they are views of a
    clean file mapping (the checkpoint's weights, once read): they are read again from the page cache if used."""
    mappings = FileMappings()
    mappings.drop([span for array in arrays if (span := extent(array)) is not None])


def drop_after_forward(model: Any) -> int:
    """Hook every module of a torch model whose parameters lie in a clean file mapping: after its forward, their
    pages leave the resident set. A forward pass then keeps about one layer of the checkpoint resident (plus
    a weight used outside its module, like a tied LM head), not all of it. Returns the bytes hooked."""
    mappings = FileMappings()
    hooked = 0
    for module in model.modules():
        spans = [s for p in module.parameters(recurse=False) if (s := extent(p.data)) and mappings.find(*s)]
        if spans:
            module.register_forward_hook(lambda module, args, out, spans=spans: mappings.drop(spans))
            hooked += sum(n for _, n in spans)
    return hooked


def release_heap() -> None:
    """Collect garbage and hand the allocator's free memory back to the system (glibc's malloc_trim)."""
    gc.collect()
    trim = libc.function("malloc_trim")
    if trim is not None:
        trim(0)


def die_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies, so that a child never outlives a killed build."""
    prctl = libc.function("prctl")
    if prctl is not None:
        pr_set_pdeathsig = 1
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(130)
