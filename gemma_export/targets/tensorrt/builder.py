"""Engines: which TensorRT builds them, for which GPUs, and the child process that does it.

Builders, in order of preference: `tensorrt` (datacenter TensorRT, where it installs) and `tensorrt_rtx`
(TensorRT for RTX, `pip install tensorrt-rtx`: it builds and serializes engines on a machine without a GPU, for
the compute capabilities in COMPUTE_CAPABILITIES). Neither installed: `--onnx-only` or a one-line error.

Each engine is built in a child process (engine_child.py), for two reasons:
  * the `libtensorrt_rtx.so` pitfall: TensorRT-RTX's wheel ships only `libtensorrt_rtx.so.1`, and its ONNX
    parser dlopen()s the unversioned `libtensorrt_rtx.so` when it meets the first plugin node; not found, the
    process aborts ("terminate called without an active exception"). The dynamic loader reads
    LD_LIBRARY_PATH once, at process start, so the child starts with a private temporary folder holding a
    `libtensorrt_rtx.so` link to the wheel's library first on its LD_LIBRARY_PATH. Nothing is written into the
    installed package (it may be read-only, shared, or reinstalled), and a link there, if any, is harmless.
  * an abort inside the builder (a C++ `terminate`) takes down the child, not the build: it is reported as
    one line and the staging folder is removed as for any failure.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_export.errors import BadInput, GemmaExportError

BUILDERS = ("tensorrt", "tensorrt_rtx")  # module names, preferred first
# TensorRT-RTX's `ComputeCapability` members. It has no SM90: its engines do not run on H100/H200; SM75 fails
# on fp32 GEMM; CURRENT needs a GPU.
COMPUTE_CAPABILITIES = {"8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120"}
RTX_LIBRARY = "libtensorrt_rtx.so"


class BuilderError(GemmaExportError):
    """The TensorRT builder failed or crashed on a graph we wrote (exit code 3: our bug, or the builder's)."""


@dataclass(frozen=True)
class Builder:
    module: str  # tensorrt | tensorrt_rtx
    version: str

    @property
    def distribution(self) -> str:
        return "tensorrt-rtx" if self.module == "tensorrt_rtx" else "tensorrt"


def parse_compute_capabilities(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`8.0,8.6` -> ("8.0", "8.6"); an unknown one is a one-line error naming those TensorRT-RTX targets."""
    items = text.split(",") if isinstance(text, str) else list(text or ())
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item not in COMPUTE_CAPABILITIES:
            raise BadInput(f"--compute-capability {item!r} is not one TensorRT-RTX targets; choose from "
                           f"{', '.join(COMPUTE_CAPABILITIES)} (no 9.0: its engines do not run on Hopper)")  # fmt: skip
        if item not in out:
            out.append(item)
    if not out:
        raise BadInput("--compute-capability needs at least one of " + ", ".join(COMPUTE_CAPABILITIES))
    return tuple(out)


def find_builder(preferred: Sequence[str] = BUILDERS) -> Builder | None:
    """The first TensorRT module that imports (datacenter TensorRT's `-libs` stubs install but do not import).
    GEMMA_EXPORT_NO_TENSORRT=1 hides them all (the tests' machine without a builder)."""
    if os.environ.get("GEMMA_EXPORT_NO_TENSORRT") == "1":
        return None
    for name in preferred:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError):
            continue
        return Builder(name, str(getattr(module, "__version__", "unknown")))
    return None


def check_targets(builder: Builder, ccs: Sequence[str]) -> None:
    """Datacenter TensorRT has no compute-capability option: it builds for the GPU it runs on, so the engines can
    only be for that GPU's compute capability (TensorRT-RTX builds for any of COMPUTE_CAPABILITIES, GPU or not)."""
    if builder.module == "tensorrt_rtx":
        return
    device = _device_compute_capability()
    if device is None or list(ccs) != [device]:
        here = f"this machine's GPU is {device}" if device else "this machine has no CUDA GPU"
        raise BadInput(f"{builder.module} builds engines for the GPU it runs on ({here}); --compute-capability "
                       f"{','.join(ccs)} needs TensorRT-RTX (pip install tensorrt-rtx==1.7.1.116)")  # fmt: skip


def _device_compute_capability() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return "{}.{}".format(*torch.cuda.get_device_capability())


def engine_name(cc: str, plugins: bool) -> str:
    return f"model.sm{cc.replace('.', '')}{'.plugins' if plugins else ''}.engine"


@contextlib.contextmanager
def child_environment(builder: Builder) -> Iterator[dict[str, str]]:
    """The child's environment: for TensorRT-RTX, a private folder with the `libtensorrt_rtx.so` link first on
    LD_LIBRARY_PATH (module docstring); removed when the child is done."""
    env = dict(os.environ)
    if builder.module != "tensorrt_rtx":
        yield env
        return
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    locations = list(spec.submodule_search_locations or []) if spec else []
    real = next((Path(d) / f"{RTX_LIBRARY}.1" for d in locations if (Path(d) / f"{RTX_LIBRARY}.1").exists()), None)
    if real is None:  # another layout (a system install): its own links are in place
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="gemma-export-trt-") as private:
        os.symlink(real, Path(private) / RTX_LIBRARY)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (private, env.get("LD_LIBRARY_PATH")) if p)
        yield env


def build_engines(builder: Builder, request: dict[str, Any]) -> dict[str, Any]:
    """Run engine_child.py on `request` (model, engines, shapes, plugins); its JSON result, or a one-line
    BuilderError with the builder's last message."""
    with child_environment(builder) as env:
        proc = subprocess.run(
            [sys.executable, "-m", "gemma_export.targets.tensorrt.engine_child"],
            input=json.dumps({**request, "builder": builder.module}).encode(),
            capture_output=True,
            env=env,
            check=False,
        )
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if proc.returncode == 0 and result is not None and "error" not in result:
        return result
    why = result["error"] if result and "error" in result else _last_line(proc.stderr)
    if proc.returncode < 0:
        why = f"the builder process died (signal {-proc.returncode}): {why}"
    raise BuilderError(f"{builder.module} could not build {request['engines'][0]['path']}: {why}")


def _last_line(stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"
