"""runtime/pages.py: once a session has loaded, a lookup's rows, not the folios around them, stay resident."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gemma_export.pipeline import package
from gemma_export.runtime import pages
from gemma_export.targets import ort_cpu
from tests.support.tied_head import tied_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")

VOCAB, HIDDEN = 8192, 1024  # a 32 MiB table: rows of 4 KiB
LOOKUPS = 64

_LOOK_UP = """
import sys, numpy as np, onnxruntime as ort
from gemma_export.runtime import pages
model, data, settle = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
if settle:
    pages.settle_weights(data)
for token in np.random.default_rng(0).integers(0, {vocab}, {lookups}):
    session.run(None, {{"ids": np.array([[token]], np.int64)}})
print(pages.resident_bytes(data))
"""


def _tied_model(folder: Path) -> tuple[Path, Path]:
    """Gather(E, ids) and the head MatMul(x, E^T), as `ort-cpu` writes them: the head in slices that ONNX Runtime
    pre-packs, the lookup reading E's bytes in the external data file (memory-mapped) under its own name."""
    model = tied_model(VOCAB, HIDDEN)
    head = next(n for n in model.graph if n.op_type == "FusedMatMul")
    assert ort_cpu.chunk_head(model, head, max_bytes=VOCAB * HIDDEN) == 4
    folder.mkdir()
    package.write_model(model, folder)
    return folder / package.MODEL_FILE, folder / package.WEIGHTS_FILE


def _resident_after_lookups(model: Path, data: Path, settle: bool) -> int:
    script = _LOOK_UP.format(vocab=VOCAB, lookups=LOOKUPS)
    run = [sys.executable, "-c", script, str(model), str(data), "1" if settle else "0"]
    return int(subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()[-1])


def test_a_settled_table_keeps_about_the_rows_looked_up_resident(tmp_path) -> None:
    """Written just now, the file is in the page cache, in large folios where the kernel makes them: unsettled,
    64 lookups left 28 MiB of the 32 MiB table resident (Linux 6.18; 3.75 MiB once the pre-packing had read the
    file back from disk); settled, 0.25 MiB: each lookup maps its row's page (a row may straddle two)."""
    model, data = _tied_model(tmp_path / "m")
    settled = _resident_after_lookups(model, data, settle=True)
    assert 0 < settled <= LOOKUPS * 2 * 4096, settled
    unsettled = _resident_after_lookups(model, data, settle=False)
    # without settling, each lookup maps at least the fault-around window (64 KiB), a large folio at most: the
    # bound above is what settling buys, not what any run would give
    assert unsettled > LOOKUPS * 2 * 4096, (unsettled, settled)


def test_mappings_of_a_file_are_found_and_measured(tmp_path) -> None:
    import mmap

    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * (4 * mmap.PAGESIZE))
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert len(pages.mappings_of(path)) == 1
        assert m[mmap.PAGESIZE] == 1  # one page read
        assert mmap.PAGESIZE <= pages.resident_bytes(path) <= 4 * mmap.PAGESIZE
    assert pages.mappings_of(path) == [] and pages.resident_bytes(path) == 0
    pages.settle_weights(tmp_path / "missing.bin")  # nothing to settle: no error
