"""Our CUDA kernels run on the CPU (graphs/kernels/emulation/): g++ builds the .cu files against an emulation of
the few CUDA features they use, and `attention` / `rglru` below call the result through the same ctypes
launchers as on a GPU, with CPU tensors' pointers. It runs the kernels' own index arithmetic, tiling, key
splits and online softmax on machines without a GPU; it cannot find races or measure anything (one block at a
time, one OS thread per CUDA thread)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch

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
    """`torch.ops.gemma.attention`'s arguments, CPU tensors, through `cuda.attention_launch`, with the caller's
    workspace as `ops.cuda.attention_cuda` passes it, or (`workspace=False`) the launcher's own scratch."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    mask = attention_mask.contiguous()
    out = torch.empty_like(q)
    batch, heads, q_len, head_dim = q.shape
    size = cuda.attention_workspace_size(batch=batch, heads=heads, q_len=q_len, head_dim=head_dim) if workspace else 0
    scratch = torch.empty(size, dtype=torch.uint8) if size else None
    cuda.attention_launch(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
        batch=batch, heads=heads, kv_heads=k.shape[1], q_len=q_len, kv_len=k.shape[2], head_dim=head_dim,
        scale=scale, softcap=softcap, window=window, causal=causal, dtype=str(q.dtype).removeprefix("torch."),
        mask_dtype=str(mask.dtype).removeprefix("torch."), stream=0,
        workspace_ptr=scratch.data_ptr() if scratch is not None else 0, workspace_bytes=size,
    )  # fmt: skip
    return out


def rglru(x, log_a, reset, h0):
    xc, lc, rc, hc = x.contiguous(), log_a.contiguous(), reset.contiguous(), h0.float().contiguous()
    y, h_last = torch.empty_like(xc), torch.empty_like(hc)
    batch, seq, width = xc.shape
    dtype = str(xc.dtype).removeprefix("torch.")
    cuda.rglru_launch(xc.data_ptr(), lc.data_ptr(), rc.data_ptr(), hc.data_ptr(), y.data_ptr(), h_last.data_ptr(),
                      batch=batch, seq=seq, width=width, dtype=dtype, stream=0)  # fmt: skip
    return y, h_last
