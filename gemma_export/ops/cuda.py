"""Our CUDA kernels for the `ai.gemma` ops (graphs/*/kernels/), loaded with ctypes, and their torch faces.

The kernels are C ABI functions in one shared library, `libgemma_kernels.so` (graphs/README.md, "Kernels").
This module finds it, in this order:

1. `GEMMA_KERNELS_LIB`: a path to a library built elsewhere;
2. `build/kernels/libgemma_kernels.so` in the repository (`make kernels`), unless a source is newer;
3. a cache folder (`$GEMMA_EXPORT_CACHE/kernels/<hash>/`, else `~/.cache/gemma-export/...`), building it
   there with nvcc on first use, for the GPU at hand (its compute capability) plus compute_90 PTX; the hash
   covers the sources and the command, so an edited kernel is rebuilt.

It exposes the launchers the TensorRT plugins call (`attention_launch`, `rglru_launch`: raw device pointers,
sizes, a dtype name and a stream), and CUDA implementations of `torch.ops.gemma.attention` /
`torch.ops.gemma.rglru` registered by `register_torch_kernels()` (explicitly: importing gemma_export never
needs CUDA, nvcc or this library).

`python -m gemma_export.ops.cuda build [--out PATH] [--arch 80,86,89,90] [--ptx 90]` compiles the library
(`make kernels` runs it); `python -m gemma_export.ops.cuda symbols PATH` lists the ABI symbols it exports.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = ROOT / "graphs"
SOURCES = (
    GRAPHS / "kernels" / "common.cu",
    GRAPHS / "attention" / "kernels" / "attention.cu",
    GRAPHS / "rglru" / "kernels" / "rglru.cu",
)
HEADERS = (
    GRAPHS / "kernels" / "gemma_kernels_common.h",
    GRAPHS / "attention" / "kernels" / "gemma_attention.h",
    GRAPHS / "rglru" / "kernels" / "gemma_rglru.h",
    GRAPHS / "kernels" / "launch.cuh",
)
LIBRARY_NAME = "libgemma_kernels.so"
REPO_LIBRARY = ROOT / "build" / "kernels" / LIBRARY_NAME
# The GPUs we build for: Ampere (A100 sm_80, consumer/A10 sm_86), Ada (sm_89), Hopper (sm_90), plus compute_90
# PTX that newer GPUs JIT-compile.
DEFAULT_ARCHS = ("80", "86", "89", "90")
DEFAULT_PTX = "90"
ABI_VERSION = 1
ABI_SYMBOLS = (
    "gemma_kernels_abi_version",
    "gemma_kernels_error_string",
    "gemma_attention_workspace_size",
    "gemma_attention_launch",
    "gemma_rglru_launch",
)

# Codes of gemma_kernels_common.h.
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
MASK_DTYPES = {"int64": 0, "int32": 1, "bool": 2}
MAX_HEAD_DIM = 256


class KernelError(RuntimeError):
    """The library could not be found, built or loaded, or a launcher refused its arguments."""


# ---- building ------------------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / the usual install folder."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def nvcc_command(out: Path, archs: Sequence[str] = DEFAULT_ARCHS, ptx: str | None = DEFAULT_PTX,
                 nvcc: str = "nvcc") -> list[str]:  # fmt: skip
    """The one command that builds the library: every source, SASS for each arch, PTX for `ptx`.

    The CUDA runtime is linked statically (the library needs only the driver) and its symbols are hidden
    (`--exclude-libs`), as are our own internals (`-fvisibility=hidden`): the library exports the C ABI only."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx:
        gencode.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    includes = sorted({f"-I{h.parent}" for h in HEADERS})
    return [
        nvcc, "-O3", "-std=c++17", "--threads", "0", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
        "-Xlinker", "--exclude-libs,ALL", "-cudart", "static", "-lineinfo", *includes, *gencode,
        *(str(s) for s in SOURCES), "-o", str(out),
    ]  # fmt: skip


def build_library(out: Path, archs: Sequence[str] = DEFAULT_ARCHS, ptx: str | None = DEFAULT_PTX) -> Path:
    """Compile the library to `out` (written to a scratch name and renamed: never a half-written file)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): cannot build the CUDA kernels")
    missing = [str(p) for p in (*SOURCES, *HEADERS) if not p.is_file()]
    if missing:
        raise KernelError(f"kernel sources missing (a source checkout is needed to build them): {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(nvcc_command(Path(scratch), archs, ptx, nvcc), capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelError(f"nvcc failed (exit {done.returncode}):\n{done.stderr.strip()[-4000:]}")
        os.replace(scratch, out)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return out


def source_hash(archs: Sequence[str], ptx: str | None) -> str:
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(nvcc_command(Path("out"), archs, ptx)).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA_EXPORT_CACHE") or Path.home() / ".cache" / "gemma-export") / "kernels"


def local_archs() -> tuple[str, ...]:
    """The compute capability of each visible GPU (torch's view), e.g. ("90",); the defaults without one."""
    try:
        import torch

        if torch.cuda.is_available():
            found = {"".join(map(str, torch.cuda.get_device_capability(i))) for i in range(torch.cuda.device_count())}
            return tuple(sorted(found))
    except ImportError:
        pass
    return DEFAULT_ARCHS


def _newer_than_sources(library: Path) -> bool:
    built = library.stat().st_mtime
    return all(not p.is_file() or p.stat().st_mtime <= built for p in (*SOURCES, *HEADERS))


def library_path(build: bool = True) -> Path:
    """Where the library is (see the module docstring); builds it into the cache when `build` and none is."""
    env = os.environ.get("GEMMA_KERNELS_LIB")
    if env:
        if not Path(env).is_file():
            raise KernelError(f"GEMMA_KERNELS_LIB={env} is not a file")
        return Path(env)
    if REPO_LIBRARY.is_file() and _newer_than_sources(REPO_LIBRARY):  # a stale `make kernels` is passed over
        return REPO_LIBRARY
    archs = local_archs()
    cached = cache_dir() / source_hash(archs, DEFAULT_PTX) / LIBRARY_NAME
    if cached.is_file():
        return cached
    if not build:
        raise KernelError(f"no {LIBRARY_NAME}: run `make kernels` or set GEMMA_KERNELS_LIB")
    return build_library(cached, archs, DEFAULT_PTX)


# ---- loading -------------------------------------------------------------------------------------------

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
# The C prototypes of gemma_kernels_common.h, gemma_attention.h and gemma_rglru.h: (return type, arguments).
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "gemma_kernels_abi_version": (_int, []),
    "gemma_kernels_error_string": (ctypes.c_char_p, [_int]),
    "gemma_attention_workspace_size": (ctypes.c_size_t, [_i64] * 4),
    # query, key, value, mask, out; batch .. head_dim; scale, softcap; window, causal, dtype, mask dtype;
    # workspace, its bytes, stream
    "gemma_attention_launch": (
        _int,
        [_ptr] * 5 + [_i64] * 6 + [ctypes.c_float] * 2 + [_i64] + [_int] * 3 + [_ptr, ctypes.c_size_t, _ptr],
    ),
    "gemma_rglru_launch": (_int, [_ptr] * 6 + [_i64] * 3 + [_int, _ptr]),
}
assert set(SIGNATURES) == set(ABI_SYMBOLS)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def load(path: Path | None = None) -> ctypes.CDLL:
    """The library, loaded once per process (building it on demand), with its functions' C signatures."""
    global _library
    with _lock:
        if _library is not None and path is None:
            return _library
        where = path or library_path()
        try:
            lib = ctypes.CDLL(str(where))
        except OSError as e:
            raise KernelError(f"cannot load {where}: {e}") from e
        for name, (restype, argtypes) in SIGNATURES.items():
            function = getattr(lib, name, None)
            if function is None:
                raise KernelError(f"{where} does not export {name} (not our library, or an old build)")
            function.restype, function.argtypes = restype, argtypes
        version = lib.gemma_kernels_abi_version()
        if version != ABI_VERSION:
            raise KernelError(f"{where} has ABI version {version}; this code needs {ABI_VERSION} (rebuild it)")
        if path is None:
            _library = lib
        return lib


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise KernelError(f"{what}: {lib.gemma_kernels_error_string(code).decode()} (code {code})")


def _code(table: dict[str, int], name: str, what: str) -> int:
    if name not in table:
        raise KernelError(f"{what} {name!r} is not one of: {', '.join(table)}")
    return table[name]


# ---- the launchers (the interface the TensorRT plugins call) ------------------------------------------


def attention_workspace_size(*, batch: int, heads: int, q_len: int, head_dim: int) -> int:
    """Bytes of scratch that make `attention_launch` allocation-free for these sizes (0: it never needs any)."""
    return int(load().gemma_attention_workspace_size(batch, heads, q_len, head_dim))


# attention.cu's kMaxSplits and kSplitMaxQueries: only queries of at most SPLIT_MAX_QUERIES positions (decode)
# split the keys, into at most MAX_SPLITS parts, each keeping a float32 partial row (head_dim + 2 floats).
# Mirrored here because a TensorRT engine asks its plugins for scratch at build time, where no GPU (and maybe no
# built library) exists; tests/ops/test_cuda.py checks this mirror against the library's own answer.
ATTENTION_MAX_SPLITS = 64
ATTENTION_SPLIT_MAX_QUERIES = 16


def attention_workspace_bound(*, batch: int, heads: int, max_q_len: int, head_dim: int) -> int:
    """Scratch bytes enough for `attention_launch` at every query length up to `max_q_len` (the others the same):
    what a TensorRT plugin asks for once, for a profile's largest shapes. Needs no library."""
    q_len = min(max_q_len, ATTENTION_SPLIT_MAX_QUERIES)
    if min(batch, heads, q_len, head_dim) <= 0:
        return 0
    return ATTENTION_MAX_SPLITS * batch * heads * q_len * (head_dim + 2) * 4


def attention_launch(
    query_ptr: int,
    key_ptr: int,
    value_ptr: int,
    mask_ptr: int,
    out_ptr: int,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    scale: float,
    softcap: float,
    window: int,
    causal: bool | int,
    dtype: str,
    mask_dtype: str,
    stream: int,
    workspace_ptr: int = 0,
    workspace_bytes: int = 0,
) -> None:
    """Enqueue `ai.gemma::Attention` on `stream` (a cudaStream_t as an int; 0 = the legacy default stream).

    query/out [batch, heads, q_len, head_dim], key/value [batch, kv_heads, kv_len, head_dim] in `dtype`
    ("float32" | "float16" | "bfloat16"), mask [batch, kv_len] in `mask_dtype` ("int64" | "int32" | "bool"),
    all dense row-major device memory. `workspace_ptr` / `workspace_bytes` (optional): scratch of
    `attention_workspace_size(...)` bytes; without it a split (decode) launch allocates stream-ordered scratch.
    Raises KernelError on arguments the kernel refuses (shape rules, head_dim > 256) or a CUDA launch error."""
    dtype_code, mask_code = _code(DTYPES, dtype, "dtype"), _code(MASK_DTYPES, mask_dtype, "mask dtype")
    lib = load()
    code = lib.gemma_attention_launch(
        query_ptr, key_ptr, value_ptr, mask_ptr, out_ptr, batch, heads, kv_heads, q_len, kv_len, head_dim,
        float(scale), float(softcap), int(window), int(bool(causal)), dtype_code, mask_code,
        workspace_ptr or None, workspace_bytes, stream or None,
    )  # fmt: skip
    _check(lib, code, "attention_launch")


def rglru_launch(
    x_ptr: int,
    log_a_ptr: int,
    reset_ptr: int,
    h0_ptr: int,
    y_ptr: int,
    h_last_ptr: int,
    *,
    batch: int,
    seq: int,
    width: int,
    dtype: str,
    stream: int,
) -> None:
    """Enqueue `ai.gemma::RGLRU` on `stream`: x, log_a, y [batch, seq, width] in `dtype`, reset [batch, seq]
    bool (one byte), h0 and h_last [batch, width] float32 (h_last may be h0: an in-place state update).
    seq = 0 copies h0 to h_last. Raises KernelError on refused arguments or a CUDA launch error."""
    dtype_code = _code(DTYPES, dtype, "dtype")
    lib = load()
    code = lib.gemma_rglru_launch(x_ptr, log_a_ptr, reset_ptr, h0_ptr, y_ptr, h_last_ptr, batch, seq, width,
                                  dtype_code, stream or None)  # fmt: skip
    _check(lib, code, "rglru_launch")


# ---- torch.ops.gemma.* on CUDA tensors -----------------------------------------------------------------

_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_registered = False


def _dtype_name(tensor: Any) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise KernelError(f"dtype {tensor.dtype} is not one of float32, float16, bfloat16")
    return name


def attention_tensors(query, key, value, attention_mask, scale: float, softcap: float, window: int, causal: bool,
                      *, stream: int, workspace: bool = True):  # fmt: skip
    """`torch.ops.gemma.attention`'s computation by our kernel on tensors the library can address, enqueued on
    `stream`: checks, contiguous copies where needed, the output, the split workspace (`workspace=False`:
    the launcher allocates its own). `attention_cuda` is this on the tensors' GPU and its current stream."""
    import torch

    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or attention_mask.dim() != 2:
        raise KernelError(f"attention: bad ranks/shapes {tuple(query.shape)} {tuple(key.shape)} "
                          f"{tuple(value.shape)} {tuple(attention_mask.shape)}")  # fmt: skip
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if key.shape[0] != batch or key.shape[3] != head_dim or attention_mask.shape != (batch, kv_len):
        raise KernelError("attention: query, key and mask disagree on batch, head_dim or key length")
    if value.dtype != query.dtype or key.dtype != query.dtype:
        raise KernelError("attention: query, key and value must share a dtype")
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if q_len == 0 or batch == 0:  # the reference's empty output (the kernel requires 1 <= q_len)
        return out
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    mask = attention_mask
    if mask.dtype not in (torch.int64, torch.int32, torch.bool):
        mask = mask != 0
    mask = mask.contiguous()
    size = attention_workspace_size(batch=batch, heads=heads, q_len=q_len, head_dim=head_dim) if workspace else 0
    scratch = torch.empty(size, dtype=torch.uint8, device=q.device) if size else None
    attention_launch(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        scale=scale, softcap=softcap, window=window, causal=causal, dtype=_dtype_name(q),
        mask_dtype=str(mask.dtype).removeprefix("torch."), stream=stream,
        workspace_ptr=scratch.data_ptr() if scratch is not None else 0, workspace_bytes=size,
    )  # fmt: skip
    return out


def rglru_tensors(x, log_a, reset, h0, *, stream: int):
    """`torch.ops.gemma.rglru`'s computation by our kernel, enqueued on `stream`: (y in x's dtype, h_last
    float32). `rglru_cuda` is this on the tensors' GPU and its current stream."""
    import torch

    if x.dim() != 3 or log_a.shape != x.shape or reset.shape != x.shape[:2] or h0.shape != (x.shape[0], x.shape[2]):
        raise KernelError(f"rglru: bad shapes {tuple(x.shape)} {tuple(log_a.shape)} {tuple(reset.shape)} "
                          f"{tuple(h0.shape)}")  # fmt: skip
    if log_a.dtype != x.dtype:
        raise KernelError("rglru: x and log_a must share a dtype")
    batch, seq, width = x.shape
    xc, lc = x.contiguous(), log_a.contiguous()
    rc = reset.to(torch.bool).contiguous()
    hc = h0.to(torch.float32).contiguous()
    y = torch.empty_like(xc)
    h_last = torch.empty_like(hc)
    rglru_launch(xc.data_ptr(), lc.data_ptr(), rc.data_ptr(), hc.data_ptr(), y.data_ptr(), h_last.data_ptr(),
                 batch=batch, seq=seq, width=width, dtype=_dtype_name(xc), stream=stream)  # fmt: skip
    return y, h_last


def attention_cuda(query, key, value, attention_mask, scale: float, softcap: float, window: int, causal: bool):
    """`torch.ops.gemma.attention` for CUDA tensors, computed by our kernel (same arguments, same result as
    `attention_reference` within the spec's tolerance; rows with no visible key are zeros)."""
    import torch

    with torch.cuda.device(query.device):
        stream = torch.cuda.current_stream().cuda_stream
        return attention_tensors(query, key, value, attention_mask, scale, softcap, window, causal, stream=stream)


def rglru_cuda(x, log_a, reset, h0):
    """`torch.ops.gemma.rglru` for CUDA tensors, computed by our kernel: (y in x's dtype, h_last float32)."""
    import torch

    with torch.cuda.device(x.device):
        return rglru_tensors(x, log_a, reset, h0, stream=torch.cuda.current_stream().cuda_stream)


def register_torch_kernels() -> None:
    """Make `torch.ops.gemma.attention` and `torch.ops.gemma.rglru` run our kernels on CUDA tensors (CPU
    tensors keep the PyTorch reference). Loads (or builds) the library first, so a missing toolchain fails
    here, not inside a model. Idempotent."""
    global _registered
    if _registered:
        return
    import torch

    from gemma_export.ops import attention as _attention  # noqa: F401 - defines torch.ops.gemma.attention
    from gemma_export.ops import rglru as _rglru  # noqa: F401 - defines torch.ops.gemma.rglru

    load()
    torch.library.register_kernel("gemma::attention", "cuda", attention_cuda)
    torch.library.register_kernel("gemma::rglru", "cuda", rglru_cuda)
    _registered = True


# ---- command line --------------------------------------------------------------------------------------


def exported_symbols(path: Path) -> list[str]:
    """The dynamic symbols `path` defines (nm -D --defined-only)."""
    done = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    return sorted(line.split()[-1] for line in done.stdout.splitlines() if line.strip())


_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "ptx", 2: "sass"}


def fatbin_entries(path: Path) -> list[list[tuple[str, int]]]:
    """Per embedded fatbin (one per source with device code), its entries as (kind, arch): ("sass", 90) is
    a cubin for sm_90, ("ptx", 90) compute_90 PTX. Read from the file itself, because not every CUDA install has
    cuobjdump (this machine's nvcc 13 has none): a fatbin is a 16-byte header (magic 0xBA55ED50, u16 version,
    u16 header size, u64 payload size), then entries, each a header (u16 kind, u16, u32 header size,
    u64 payload size, ..., u32 arch at byte 28) and its payload."""
    data = Path(path).read_bytes()
    found: list[list[tuple[str, int]]] = []
    at = data.find(_FATBIN_MAGIC.to_bytes(4, "little"))
    while at >= 0:
        header_size = int.from_bytes(data[at + 6 : at + 8], "little")
        size = int.from_bytes(data[at + 8 : at + 16], "little")
        entries, p, end = [], at + header_size, at + header_size + size
        while p < end and end <= len(data):
            kind = int.from_bytes(data[p : p + 2], "little")
            entry_header = int.from_bytes(data[p + 4 : p + 8], "little")
            payload = int.from_bytes(data[p + 8 : p + 16], "little")
            entries.append((_FATBIN_KINDS.get(kind, f"kind{kind}"), int.from_bytes(data[p + 28 : p + 32], "little")))
            if entry_header == 0:
                break
            p += entry_header + payload
        found.append(entries)
        at = data.find(_FATBIN_MAGIC.to_bytes(4, "little"), max(end, at + 4))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_export.ops.cuda", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile libgemma_kernels.so with nvcc")
    build.add_argument("--out", type=Path, default=REPO_LIBRARY)
    build.add_argument("--arch", default=",".join(DEFAULT_ARCHS), help="SASS for these (comma-separated)")
    build.add_argument("--ptx", default=DEFAULT_PTX, help="PTX for this compute capability ('' for none)")
    symbols = sub.add_parser("symbols", help="list the library's exported symbols")
    symbols.add_argument("path", type=Path, nargs="?", default=REPO_LIBRARY)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            archs = [a.strip() for a in args.arch.split(",") if a.strip()]
            out = build_library(args.out, archs, args.ptx or None)
            print(f"{out} (sm_{', sm_'.join(archs)}{f' + compute_{args.ptx} PTX' if args.ptx else ''})")
        else:
            print("\n".join(exported_symbols(args.path)))
    except KernelError as e:
        print(f"gemma-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
