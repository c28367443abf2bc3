"""The build's verify stage, ONNX Runtime half: a fresh child process that opens the artifact and measures it.
Both sides of the protocol live here: the parent's `ArtifactInChild` / `run_in_child`, the child's `main`.

    python -m gemma_export.verify.child PARENT_PID < request.json      (run by `run_in_child`, never by hand)

The parent has run the PyTorch reference through every pass and spilled its logits to an unlinked file, whose
descriptor the child inherits; the request (stdin, JSON) carries the artifact folder, its manifest, the
passes' inputs and the measure to take (measures.MEASURES). The child runs the passes, compares each with the
spilled logits, and writes one JSON line on stdout: each pass's measure and its own peak RSS (VmHWM), or the
error it met. It imports numpy and onnxruntime, never torch: the parent's heap (torch, the exporter, the
optimizer: ~0.4 GiB) is not added to ONNX Runtime's, and the parent holds no weights while it runs.

Errors keep their one line and exit code: an error in the child is raised again in the parent with the same
class name and message (cli.main then reports it as before). Ctrl-C: the child is in its own process group,
so a terminal's SIGINT reaches the parent only, which kills the child and waits for it before unwinding
(exit 130, no temporary folder, no orphan); a child whose parent dies gets SIGKILL (memory.die_with_parent).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export import errors
from gemma_export.manifest import ArtifactSpec
from gemma_export.pipeline import memory
from gemma_export.pipeline.progress import peak_rss_bytes, record_child, resident_bytes
from gemma_export.runtime.session import OrtDecoder
from gemma_export.verify.measures import MEASURES
from gemma_export.verify.passes import Pass, artifact_pairs

PROCESS_NAME = "ONNX Runtime child"  # the name its peak is recorded under (progress.record_child)


@dataclass(frozen=True)
class ArtifactInChild:
    """The artifact opened in a fresh process (`gemma_export.verify.child`, which never imports torch) that runs
    the reference's passes and sends back each pass's measure: the build's verify stage, so that this process's
    heap (torch, the exporter, the optimizer) is not added to ONNX Runtime's. `low_memory`: runtime.session_options.
    """

    artifact_dir: Path
    manifest: ArtifactSpec
    low_memory: bool = True


def command() -> list[str]:
    """The child's command line."""
    return [sys.executable, "-m", "gemma_export.verify.child", str(os.getpid())]


def run_in_child(artifact: ArtifactInChild, passes: list[Pass], spill_fd: int, measure: str) -> list[Any]:
    """Each pass's measure, taken in a child process; `spill_fd`: the reference's logits, in pass order."""
    request = {
        "artifact_dir": str(artifact.artifact_dir),
        "manifest": artifact.manifest.to_json(),
        "low_memory": artifact.low_memory,
        "measure": measure,
        "spill_fd": spill_fd,
        "passes": [_pass_to_json(p) for p in passes],
    }
    parent_rss = resident_bytes()
    with subprocess.Popen(
        command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(spill_fd,), process_group=0
    ) as child:
        try:
            out, _ = child.communicate(json.dumps(request).encode())
        except BaseException:  # Ctrl-C (KeyboardInterrupt) included: the child never outlives the stage
            child.kill()
            child.wait()
            raise
    parent_rss = max(parent_rss or 0, resident_bytes() or 0)
    return _values(child.returncode, out, parent_rss)


def _values(returncode: int, out: bytes, parent_rss: int) -> list[Any]:
    lines = out.decode(errors="replace").strip().splitlines()
    if returncode in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if returncode != 0 or not lines:
        why = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
        hint = ", out of memory?" if returncode == -signal.SIGKILL else ""
        raise errors.GemmaExportError(f"verify: the ONNX Runtime process ended without a result ({why}{hint})")
    result = json.loads(lines[-1])
    record_child(PROCESS_NAME, result.get("peak_rss"), parent_rss)
    if "error" in result:
        raise _error(result["error"])
    return result["values"]


def _error(error: dict[str, Any]) -> Exception:
    """The child's exception as the parent raises it: the same class name and message, so the same line."""
    kind, message = error["type"], error["message"]
    known = {cls.__name__: cls for cls in (errors.GemmaExportError, errors.BadInput, errors.ParityError)}
    if kind in known:
        return known[kind](message)
    if error.get("exit_code") is not None:  # another GemmaExportError
        exc = errors.GemmaExportError(message)
        exc.exit_code = error["exit_code"]
        return exc
    return type(kind, (Exception,), {"__module__": __name__})(message)


def _pass_to_json(p: Pass) -> dict[str, Any]:
    return {"case": p.case, "lengths": p.lengths, "phase": p.phase, "new_cache": p.new_cache, "ids": p.ids.tolist(),
            "mask": p.mask.tolist(), "pos": p.pos.tolist(), "shape": list(p.shape)}  # fmt: skip


def _pass_from_json(d: dict[str, Any]) -> Pass:
    arrays = (np.array(d[k], np.int64) for k in ("ids", "mask", "pos"))
    return Pass(d["case"], d["lengths"], d["phase"], d["new_cache"], *arrays, tuple(d["shape"]))


def measure_passes(request: dict[str, Any]) -> list[Any]:
    """The child's work: the artifact through the passes, each compared with the reference's spilled logits."""
    decoder = OrtDecoder(
        Path(request["artifact_dir"]), ArtifactSpec.from_json(request["manifest"]), low_memory=request["low_memory"]
    )
    measure = MEASURES[request["measure"]]
    passes = [_pass_from_json(p) for p in request["passes"]]
    return [measure(ref, art) for _, ref, art in artifact_pairs(decoder, passes, request["spill_fd"])]


def main(argv: list[str]) -> int:
    memory.die_with_parent(int(argv[0]))
    try:
        result: dict[str, Any] = {"values": measure_passes(json.loads(sys.stdin.buffer.read()))}
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("GEMMA_EXPORT_DEBUG"):
            traceback.print_exc()
        exit_code = e.exit_code if isinstance(e, errors.GemmaExportError) else None
        result = {"error": {"type": type(e).__name__, "message": str(e), "exit_code": exit_code}}
    result["peak_rss"] = peak_rss_bytes()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
