"""Our CUDA kernels run on the CPU (graphs/kernels/emulation/): g++ builds the .cu files against an emulation of
the few CUDA features they use, and `attention` / `rglru` below call the result through the same tensor
wrappers and ctypes launchers as on a GPU (`ops.cuda.attention_tensors`, `rglru_tensors`), with CPU tensors.
It runs the kernels' own index arithmetic, tiling, key splits and online softmax on machines without a GPU; it
cannot find races or measure anything (one block at a time, one OS thread per CUDA thread)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from gemma_export.ops import cuda

EMULATION = cuda.GRAPHS / "kernels" / "emulation"


def cuda_include() -> Path | None:
    """The CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h, ...): next to nvcc, or in the usual places (nvcc
    on PATH may be a wrapper script)."""
    nvcc = cuda.find_nvcc()
    homes = [Path(nvcc).resolve().parent.parent] if nvcc else []
    homes += [Path(h) for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if h]
    for home in homes:
        if (home / "include" / "cuda_runtime.h").is_file():
            return home / "include"
    return None


def available() -> str | None:
    """None when the emulation can be built here, else why not."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include() is None:
        return "no CUDA headers (cuda_runtime.h next to nvcc)"
    return None


def build(out: Path) -> Path:
    includes = [f"-I{cuda_include()}", *sorted({f"-I{h.parent}" for h in cuda.HEADERS})]
    command = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", *includes,
               "-x", "c++", "-include", str(EMULATION / "emulation.h"), *map(str, cuda.SOURCES),
               "-x", "none", str(EMULATION / "emulation.cpp"), "-o", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return out


def attention(query, key, value, attention_mask, scale, softcap, window, causal, *, workspace: bool = True):
    """`torch.ops.gemma.attention`'s arguments, CPU tensors, through `ops.cuda.attention_tensors` (what
    `attention_cuda` runs on a GPU), with its workspace or (`workspace=False`) the launcher's own scratch."""
    return cuda.attention_tensors(query, key, value, attention_mask, scale, softcap, window, causal, stream=0,
                                  workspace=workspace)  # fmt: skip


def rglru(x, log_a, reset, h0):
    return cuda.rglru_tensors(x, log_a, reset, h0, stream=0)
