"""llama.cpp, the compared system of `gemma-export bench` that runs GGUF files: its tools, built once, and runs.

The only module that knows llama.cpp. Its tools (llama-bench, llama-perplexity, llama-quantize) come from the
llama.cpp that the `llama-cpp-python` sdist vendors (`vendor/llama.cpp`), pinned below, built with cmake for
this CPU (GGML_NATIVE) into `CACHE/llama.cpp-VERSION-RECIPE/bin` (CACHE: $GEMMA_EXPORT_CACHE, else
`${XDG_CACHE_HOME:-~/.cache}/gemma-export`), or are taken from the folder that the environment variable
GEMMA_EXPORT_LLAMA_CPP names (never built there).

    python -m gemma_export.bench.llamacpp                 build the tools when missing (~5 min on 2 cores)
    python -m gemma_export.bench.llamacpp --f32 GGUF      ... and print an F32 GGUF of the same tensors (cached)
    python -m gemma_export.bench.llamacpp --from-hf FOLDER [--type Q4_K_M|Q8_0|F16|BF16]
                                                          ... and print a GGUF of a Hugging Face folder, made by
                                                          llama.cpp's convert_hf_to_gguf.py (extracted from the
                                                          same sdist) and llama-quantize (cached)
    python -m gemma_export.bench.llamacpp --perplexity GGUF --text FILE [--ctx 1024]

What `bench` measures, per (prompt P, new tokens N) cell, as our workers do (a fresh process per measurement,
no warm-up run: each system's first prompt in a fresh process is timed), with llama-bench on one sequence:

    prefill_s   `llama-bench -p P -n 0`: the prompt of P tokens in one process (its pp test; the prompt
                is processed in batches of 2048 tokens, logits of the last position only)
    decode_s    `llama-bench -p 0 -n N-1 -d P`: N - 1 tokens generated one at a time after P tokens are
                in the KV cache (its tg test at depth P, the same contexts P..P+N-2 as our N - 1 decode
                steps after the first token), the depth's prefill untimed
    peak_rss    the larger VmHWM of the two llama-bench processes, read from /proc/PID/status while each
                runs (every POLL_SECONDS; VmHWM only grows, so the last reading before exit misses at most
                the last interval). Not getrusage(RUSAGE_CHILDREN): Linux carries the pre-exec high-water mark
                of the forked (or vfork'ed) parent into ru_maxrss, so it would report this process's peak.
                The weights are memory-mapped (llama.cpp's default); the mapped pages it touched are resident
                and count, as ONNX Runtime's loaded weights do.

llama-bench feeds random token ids and picks no tokens (it computes the logits and samples nothing), so
llama.cpp's rows have no `same_tokens` check. Each runs with `-t THREADS -r 1 --no-warmup -o json`; the
rest (flash attention auto, batch 2048, ubatch 512, f16 KV cache, weight repacking on) is llama-bench's
default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemma_export.errors import BadInput

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # its sdist vendors llama.cpp at commit 0c1e570 (checked: builds, runs Gemma 3)
ENV = "GEMMA_EXPORT_LLAMA_CPP"
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize")
BUILD_JOBS = 2
# Static libraries: the binaries are moved out of the build folder, where shared libraries' RPATHs would point.
# LLAMA_OPENSSL off: nothing here downloads (LLAMA_CURL, which the brief's flags name, is deprecated in this
# llama.cpp and only warns).
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF")  # fmt: skip
# AMX off on x86: built for a CPU that has it (Sapphire Rapids: this workplace's machines), llama.cpp 0c1e570's AMX
# matmul (ggml_backend_amx_mul_mat) segfaults on the first prompt (llama-bench and llama-perplexity exit -11,
# measured; `--repack 0` avoids it too, but also turns off the AVX repacking its Q4_K kernels use). Explicit
# -mno-* flags win over -march=native in GCC and Clang whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# The cache folder's name changes with the build recipe, so that tools built by an earlier recipe are rebuilt.
BUILD_RECIPE = "r2"  # r2: AMX off
POLL_SECONDS = 0.02
NAME = "llama.cpp"

Progress = Callable[[str], None]


class ToolsUnavailable(BadInput):
    """llama.cpp's tools are not here and cannot be built (no cmake, no compiler, a failed build): exit 2."""


class ToolFailed(BadInput):
    """A llama.cpp tool exited with an error; the message is its last stderr line."""


# ---------------------------------------------------------------------------------------------------------
# The tools: found, or built once into the cache
# ---------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """GEMMA_EXPORT_CACHE (as `real_checkpoint` uses it), else ${XDG_CACHE_HOME:-~/.cache}/gemma-export."""
    if os.environ.get("GEMMA_EXPORT_CACHE"):
        return Path(os.environ["GEMMA_EXPORT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma-export"


def tools_dir() -> Path:
    """Where the tools are (or will be built): $GEMMA_EXPORT_LLAMA_CPP, else the cache."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-{BUILD_RECIPE}" / "bin"


def cmake_flags(machine: str | None = None) -> tuple[str, ...]:
    """CMAKE_FLAGS, with AMX turned off on x86-64 (NO_AMX)."""
    if (machine or platform.machine()).lower() in ("x86_64", "amd64"):
        return (*CMAKE_FLAGS, f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")
    return CMAKE_FLAGS


def missing_tools(folder: Path) -> list[str]:
    return [t for t in TOOLS if not os.access(folder / t, os.X_OK)]


def tool(name: str) -> Path:
    """One tool's path, if built; a one-line error naming how to build it otherwise."""
    path = tools_dir() / name
    if not os.access(path, os.X_OK):
        raise ToolsUnavailable(f"{path} is missing: run `python -m gemma_export.bench.llamacpp` (or `make llama-cpp`)")
    return path


def ensure_tools(progress: Progress | None = None, timeout: float = 3600.0) -> Path:
    """The tools' folder, building them first when missing (not in a folder that GEMMA_EXPORT_LLAMA_CPP names)."""
    folder = tools_dir()
    missing = missing_tools(folder)
    if not missing:
        return folder
    if os.environ.get(ENV):
        raise ToolsUnavailable(f"{ENV}={folder} has no {', '.join(missing)}")
    build_tools(folder.parent, progress or (lambda _: None), timeout)
    return folder


def check_build_tools() -> None:
    """cmake and a C/C++ compiler, or a one-line error saying which is missing."""
    needed = {"cmake": ["cmake"], "a C++ compiler": [os.environ.get("CXX", ""), "c++", "g++", "clang++"],
              "a C compiler": [os.environ.get("CC", ""), "cc", "gcc", "clang"]}  # fmt: skip
    for what, names in needed.items():
        if not any(shutil.which(n) for n in names if n):
            raise ToolsUnavailable(f"cannot build llama.cpp's tools: {what} is not installed (apt-get install "
                                   "cmake g++), or point GEMMA_EXPORT_LLAMA_CPP to a folder with them")  # fmt: skip


def build_tools(dest: Path, progress: Progress, timeout: float) -> None:
    """Download the sdist, build the tools, and rename the finished folder to `dest` (DEST/bin/TOOL).

    Everything happens in a temporary folder beside `dest` that is renamed only when complete, so an
    interrupted or failed build leaves nothing half-written; its log is kept beside `dest` on failure.
    """
    check_build_tools()
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    log = work / "build.log"
    try:
        progress(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (sdist)")
        sdist = download_sdist(work, log, timeout)
        progress(f"extracting {sdist.name}")
        source = extract_sdist(sdist, work / "src") / "vendor" / "llama.cpp"
        sdist.unlink()
        progress(f"building {', '.join(TOOLS)} with cmake (about 5 min on 2 cores)")
        built = cmake_build(source, work / "build", log, timeout)
        staged = work / dest.name
        (staged / "bin").mkdir(parents=True)
        for name in TOOLS:
            shutil.copy2(built / name, staged / "bin" / name)
        info = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "llama_cpp_commit": vendored_commit(source),
                "cmake_flags": list(cmake_flags())}  # fmt: skip
        (staged / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists() and missing_tools(dest / "bin"):
            shutil.rmtree(dest)  # an incomplete folder of ours (a tool deleted by hand): replaced
        with contextlib.suppress(OSError):  # another process may have finished the same build first
            staged.rename(dest)
        if missing_tools(dest / "bin"):
            raise ToolsUnavailable(f"cannot move the built tools to {dest}")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        kept = dest.with_name(dest.name + ".build.log")
        shutil.copyfile(log, kept)
        raise ToolsUnavailable(f"building llama.cpp's tools failed ({_command_name(e.cmd)}): see {kept}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _command_name(cmd: Any) -> str:
    parts = [str(c) for c in (cmd if isinstance(cmd, list | tuple) else [cmd])]
    return " ".join(Path(p).name if i == 0 else p for i, p in enumerate(parts[:4]))


def _logged(cmd: list[str], log: Path, timeout: float, cwd: Path | None = None) -> None:
    """Run a build step with its output appended to the log (a failure names the log, not 1000 lines)."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=True, cwd=cwd)


def download_sdist(folder: Path, log: Path, timeout: float) -> Path:
    """The pinned llama-cpp-python sdist, by pip (the registry's ordinary client), without building it."""
    _logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(folder)], log, timeout)  # fmt: skip
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise ToolsUnavailable(f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} gave no sdist")
    return found[0]


def extract_sdist(sdist: Path, dest: Path) -> Path:
    """Its single top folder, extracted with tarfile's "data" filter: no absolute paths, no `..`, no links
    leaving the folder, no device files (a hostile archive is refused, not written)."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        tops = {Path(m.name).parts[0] for m in tar.getmembers() if m.name not in ("", ".")}
        if len(tops) != 1:
            raise ToolsUnavailable(f"{sdist.name}: expected one top folder, found {len(tops)}")
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as e:
            raise ToolsUnavailable(f"{sdist.name}: refused to extract it ({e})") from None
    return dest / tops.pop()


def cmake_build(source: Path, build: Path, log: Path, timeout: float) -> Path:
    """Configure and build only the tools (not llama.cpp's examples, tests or server); their folder."""
    _logged(["cmake", "-S", str(source), "-B", str(build), *cmake_flags()], log, timeout)
    _logged(["cmake", "--build", str(build), "--config", "Release", "-j", str(BUILD_JOBS), "--target", *TOOLS],
            log, timeout)  # fmt: skip
    return build / "bin"


def vendored_commit(source: Path) -> str | None:
    """The llama.cpp commit the sdist vendors (its .git HEAD, when the sdist ships one)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=30)  # fmt: skip
        return done.stdout.strip() or None
    return None


# ---------------------------------------------------------------------------------------------------------
# GGUF files: their type, and an F32 conversion of the same tensors
# ---------------------------------------------------------------------------------------------------------


def gguf_file_type(path: Path) -> str | None:
    """The GGUF's type ("Q4_K_M", "F32", ...) from its header's general.file_type (llama.h's llama_ftype, as the
    `gguf` package names it); None when it has none. The header is read and checked by gguf_checkpoint (a file
    that is not GGUF is its one-line error)."""
    import gguf

    from gemma_export.checkpoint.gguf import read_header

    value = read_header(path).metadata.get("general.file_type")
    if not isinstance(value, int):
        return None
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"ftype {value}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def to_f32(gguf: Path, out: Path | None = None, threads: int = 0, progress: Progress | None = None) -> Path:
    """An F32 GGUF of the same tensors (`llama-quantize --allow-requantize IN OUT F32` dequantizes each one).

    Kept, when `out` is not given, in the cache as gguf/STEM-F32-SHA12.gguf, keyed by the input's sha256 (its
    size and time would miss a file rewritten in place), and made only once; written to a temporary name and
    renamed when complete.
    """
    if out is None:
        out = cache_root() / "gguf" / f"{gguf.stem}-F32-{file_sha256(gguf)[:12]}.gguf"
    return quantize(gguf, out, "F32", threads, progress)


def quantize(gguf: Path, out: Path, file_type: str, threads: int = 0, progress: Progress | None = None) -> Path:
    """`llama-quantize --allow-requantize GGUF OUT TYPE [THREADS]`, unless OUT exists; written to a temporary
    name beside OUT and renamed when complete."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    if progress:
        progress(f"llama-quantize {gguf.name} -> {out.name} ({file_type})")
    cmd = [str(tool("llama-quantize")), "--allow-requantize", str(gguf), str(partial), file_type]
    try:
        _run_tool(cmd + ([str(threads)] if threads else []), timeout=3600.0)
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Hugging Face folders -> GGUF: llama.cpp's own converter, from the same sdist
# ---------------------------------------------------------------------------------------------------------

# What convert_hf_to_gguf.py needs, under the sdist's vendor/llama.cpp: the script, its model classes (conversion/,
# where gemma.py maps Gemma4ForCausalLM / Gemma4ForConditionalGeneration to Gemma4Model) and the gguf-py package
# of the same commit (the venv's `gguf` may be another version; the vendored one goes first on PYTHONPATH).
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
CONVERTER = "convert_hf_to_gguf.py"
# The types --from-hf makes. The converter writes BF16 (F16 when asked for F16) from the folder's tensors, and
# llama-quantize makes the others from that file; both are kept in the cache.
HF_TYPES = ("Q4_K_M", "Q8_0", "F16", "BF16")


def converter_dir() -> Path:
    """Where the converter is extracted, beside the tools' cache (also when GEMMA_EXPORT_LLAMA_CPP names them)."""
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "convert"


def ensure_converter(progress: Progress | None = None, timeout: float = 3600.0) -> Path:
    """The converter's folder (CONVERTER_PATHS), extracted once from the pinned sdist (downloaded by pip): into
    a temporary folder beside it, renamed when complete."""
    dest = converter_dir()
    if all((dest / p).exists() for p in CONVERTER_PATHS):
        return dest
    progress = progress or (lambda _: None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        progress(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (sdist) for {CONVERTER}")
        try:
            sdist = download_sdist(work, work / "download.log", timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            tail = (work / "download.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise ToolsUnavailable(f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed: "
                                   f"{tail[0]}") from None  # fmt: skip
        staged = extract_converter(sdist, work / dest.name)
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete folder of ours: replaced
        with contextlib.suppress(OSError):  # another process may have finished the same extraction first
            staged.rename(dest)
        if not all((dest / p).exists() for p in CONVERTER_PATHS):
            raise ToolsUnavailable(f"cannot move the extracted converter to {dest}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def extract_converter(sdist: Path, dest: Path) -> Path:
    """CONVERTER_PATHS out of the sdist's vendor/llama.cpp into `dest` (tarfile's "data" filter, as
    extract_sdist); `dest`."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in CONVERTER_PATHS:
                members.append(m)
        found = {Path(m.name).parts[3] for m in members}
        if missing := [p for p in CONVERTER_PATHS if p not in found]:
            raise ToolsUnavailable(f"{sdist.name} has no vendor/llama.cpp/{', '.join(missing)}")
        try:
            tar.extractall(dest / "src", members=members, filter="data")
        except tarfile.FilterError as e:
            raise ToolsUnavailable(f"{sdist.name}: refused to extract it ({e})") from None
    (vendored,) = (dest / "src").glob("*/vendor/llama.cpp")
    for name in CONVERTER_PATHS:
        (vendored / name).rename(dest / name)
    shutil.rmtree(dest / "src")
    return dest


def hf_folder_key(folder: Path) -> str:
    """A sha256 of what decides the converter's output, read cheaply (never the weights): the llama.cpp
    version, the bytes of every .json file (config, safetensors index, tokenizer) and of tokenizer.model, and
    each .safetensors file's name, size and modification time. Symlinks are followed."""
    if not (folder / "config.json").is_file():
        raise BadInput(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    h = hashlib.sha256(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}\n".encode())
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".safetensors"):
            st = path.stat()
            h.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
        elif path.suffix == ".json" or path.name == "tokenizer.model":
            h.update(f"{path.name} {file_sha256(path)}\n".encode())
    return h.hexdigest()


def from_hf(
    folder: Path, file_type: str = "Q4_K_M", threads: int = 0, progress: Progress | None = None,
    timeout: float = 4 * 3600.0,
) -> Path:  # fmt: skip
    """A GGUF of a Hugging Face folder, made by llama.cpp's converter and llama-quantize, and its path.

    Kept in the cache as gguf/NAME-KEY12-TYPE.gguf (NAME: the folder's name, KEY12: `hf_folder_key`), made only
    once: the converter writes NAME-KEY12-BF16.gguf (F16 for F16), which stays in the cache for the other types,
    and llama-quantize makes TYPE from it. Each file is written to a temporary name and renamed when complete.
    """
    file_type = file_type.upper()
    if file_type not in HF_TYPES:
        raise BadInput(f"--type {file_type}: expected one of {', '.join(HF_TYPES)}")
    folder = folder.absolute()
    if not folder.is_dir():
        raise BadInput(f"{folder}: no such folder")
    stem = f"{folder.name}-{hf_folder_key(folder)[:12]}"
    out = cache_root() / "gguf" / f"{stem}-{file_type}.gguf"
    if out.is_file():
        return out
    base_type = "F16" if file_type == "F16" else "BF16"
    base = out.with_name(f"{stem}-{base_type}.gguf")
    if not base.is_file():
        convert_hf(folder, base, base_type.lower(), progress, timeout)
    if file_type != base_type:
        start = time.monotonic()
        quantize(base, out, file_type, threads, progress)
        if progress:
            progress(f"{out.name}: {out.stat().st_size / 1e9:.2f} GB in {time.monotonic() - start:.0f} s")
    return out


def convert_hf(folder: Path, out: Path, outtype: str, progress: Progress | None = None, timeout: float = 14400.0):
    """`convert_hf_to_gguf.py FOLDER --outtype OUTTYPE` to a temporary name beside OUT, renamed when complete;
    a failure is a ToolFailed with its last stderr line."""
    converter = ensure_converter(progress, timeout)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # it would make the converter skip its own gguf-py
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(converter / "gguf-py"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(converter / CONVERTER), str(folder), "--outtype", outtype, "--outfile", str(partial)]
    if progress:
        progress(f"{CONVERTER} {folder} -> {out.name} ({outtype})")
    start = time.monotonic()
    try:
        _, _, peak = _run_tool(cmd, timeout, name=CONVERTER, env=env)
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    if progress:
        rss = f", peak RSS {peak / 1e9:.1f} GB (its memory-mapped weights included)" if peak else ""
        progress(f"{out.name}: {out.stat().st_size / 1e9:.2f} GB in {time.monotonic() - start:.0f} s{rss}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Running the tools
# ---------------------------------------------------------------------------------------------------------


def _run_tool(
    cmd: list[str], timeout: float, *, name: str | None = None, env: dict[str, str] | None = None
) -> tuple[str, str, int | None]:
    """Run a tool; its stdout, stderr and peak RSS (VmHWM polled from /proc, None off Linux).

    Output goes to temporary files (a pipe that fills would stall the tool between polls). `name` is the tool's
    name in errors (default: the command's file name).
    """
    name = name or Path(cmd[0]).name
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        peak, deadline = None, time.monotonic() + timeout
        try:
            while proc.poll() is None:
                peak = max(peak or 0, vm_hwm(proc.pid) or 0) or None
                if time.monotonic() > deadline:
                    raise ToolFailed(f"{name} timed out after {timeout:.0f} s")
                time.sleep(POLL_SECONDS)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise ToolFailed(f"{name} failed: {_last_error_line(stderr, proc.returncode)}")
    return stdout, stderr, peak


def _last_error_line(stderr: str, returncode: int) -> str:
    """A failed tool's last stderr line; for a Python traceback ending in a bare exception name (a failed
    `assert` prints only "AssertionError"), that name with the source line that raised it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()] or [f"exit code {returncode}"]
    last = lines[-1]
    if len(lines) >= 2 and re.fullmatch(r"[\w.]+(Error|Exception)", last) and "Traceback" in stderr:
        return f"{last} at `{lines[-2]}`"
    return last


def vm_hwm(pid: int) -> int | None:
    """A process's peak resident memory (VmHWM), None when it has exited (or off Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def bench_command(gguf: Path, threads: int, *, prompt: int = 0, gen: int = 0, depth: int = 0, repeat: int = 1) -> list:
    """One llama-bench test: the prompt alone (-p P -n 0) or generation at a depth (-p 0 -n N -d D)."""
    return [str(tool("llama-bench")), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-d", str(depth),
            "-t", str(threads or os.cpu_count() or 1), "-r", str(repeat), "--no-warmup", "-o", "json"]  # fmt: skip


def parse_bench_json(text: str) -> list[dict[str, Any]]:
    """llama-bench's `-o json` output: one entry per test, with n_prompt, n_gen, n_depth, samples_ns,
    avg_ts and model_type; anything else on stdout (it prints nothing else there) is an error."""
    start = text.find("[")
    if start < 0:
        raise ToolFailed(f"llama-bench printed no JSON: {text.strip()[:200]!r}")
    try:
        tests = json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise ToolFailed(f"llama-bench's JSON does not parse ({e})") from None
    for t in tests:
        missing = [k for k in ("n_prompt", "n_gen", "n_depth", "samples_ns", "avg_ts") if k not in t]
        if missing:
            raise ToolFailed(f"llama-bench's JSON lacks {', '.join(missing)}")
    return tests


def bench(
    gguf: Path, prompt_tokens: int, new_tokens: int, threads: int, repeat: int = 1, timeout: float = 3600.0
) -> dict[str, Any]:
    """Prefill and decode speed of llama.cpp on one GGUF at one (prompt, new tokens) cell, and its peak RSS.

    Two llama-bench processes (see the module docstring): `-p P -n 0` times the prompt, `-p 0 -n N-1 -d P` the
    N - 1 decode steps after a P-token context, each run `repeat` times in its process. Returns prefill_s and
    decode_s (the medians), their samples, prefill_tok_s, decode_tok_s, peak_rss_bytes (the larger of the two
    processes') and model_type as llama-bench names it. `timeout` applies to each process.
    """
    if new_tokens < 2:
        raise BadInput("--new-tokens must be >= 2 (the first token is the prefill's)")
    if not gguf.is_file():
        raise BadInput(f"{gguf}: no such GGUF file")
    out_p, _, rss_p = _run_tool(bench_command(gguf, threads, prompt=prompt_tokens, repeat=repeat), timeout)
    out_g, _, rss_g = _run_tool(bench_command(gguf, threads, gen=new_tokens - 1, depth=prompt_tokens, repeat=repeat),
                                timeout)  # fmt: skip
    (pp,), (tg,) = parse_bench_json(out_p), parse_bench_json(out_g)
    return summarise_tests(pp, tg) | {"peak_rss_bytes": max(rss_p or 0, rss_g or 0) or None}


def summarise_tests(pp: dict[str, Any], tg: dict[str, Any]) -> dict[str, Any]:
    """A prefill test and a generation test of llama-bench -> our row's numbers (median of the samples)."""
    prefill = [ns / 1e9 for ns in pp["samples_ns"]]
    decode = [ns / 1e9 for ns in tg["samples_ns"]]
    prefill_s, decode_s = _median(prefill), _median(decode)
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_samples_s": prefill,
        "decode_samples_s": decode,
        "prefill_tok_s": pp["n_prompt"] / prefill_s,
        "decode_tok_s": tg["n_gen"] / decode_s,
        "depth": tg["n_depth"],
        "model_type": pp.get("model_type"),
    }


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+(?:e[+-]?\d+)?|nan|inf) \+/- ([0-9.]+(?:e[+-]?\d+)?|nan|inf)")


def parse_perplexity(text: str) -> tuple[float, float]:
    """llama-perplexity's final estimate (PPL, its +/-) from its output; a one-line error when absent (the
    text too short for two windows of the context, for one)."""
    found = _FINAL.findall(text)
    if not found:
        errors = [line.strip() for line in text.splitlines() if "error" in line.lower() or "need at least" in line]
        raise ToolFailed("llama-perplexity gave no final estimate" + (f": {errors[-1]}" if errors else ""))
    ppl, plus_minus = found[-1]
    return float(ppl), float(plus_minus)


def perplexity(gguf: Path, text_file: Path, ctx: int, threads: int = 0, chunks: int | None = None) -> float:
    """Perplexity of a GGUF on a text file, llama-perplexity's way: non-overlapping windows of `ctx` tokens,
    each scored on its second half (its final estimate: exp of the mean negative log-likelihood); `chunks`
    stops after that many windows (all of the text by default)."""
    return perplexity_with_error(gguf, text_file, ctx, threads, chunks)[0]


def perplexity_with_error(
    gguf: Path, text_file: Path, ctx: int, threads: int = 0, chunks: int | None = None
) -> tuple[float, float]:
    """llama-perplexity's final estimate and its +/- (the standard error it reports)."""
    for path, what in ((gguf, "GGUF file"), (text_file, "text file")):
        if not path.is_file():
            raise BadInput(f"{path}: no such {what}")
    cmd = [str(tool("llama-perplexity")), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx),
           "-t", str(threads or os.cpu_count() or 1), *(["--chunks", str(chunks)] if chunks else [])]  # fmt: skip
    stdout, stderr, _ = _run_tool(cmd, timeout=7200)
    return parse_perplexity(stdout + "\n" + stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m gemma_export.bench.llamacpp`: build the tools when missing and print their folder; or, with them,
    print an F32 conversion's path (--f32 GGUF) or a perplexity (--perplexity GGUF --text FILE --ctx N)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gemma_export.bench.llamacpp", description=main.__doc__)
    parser.add_argument("--print-tools-dir", action="store_true", help="only print where the tools are (or go)")
    parser.add_argument("--f32", type=Path, metavar="GGUF", help="convert GGUF to F32 (cached); print its path")
    parser.add_argument(
        "--from-hf",
        type=Path,
        metavar="FOLDER",
        help="convert a Hugging Face folder to a GGUF with llama.cpp's converter (cached); print its path",
    )
    parser.add_argument(
        "--type",
        default="Q4_K_M",
        choices=HF_TYPES,
        type=str.upper,
        help="with --from-hf: the GGUF's type (default Q4_K_M)",
    )
    parser.add_argument("--perplexity", type=Path, metavar="GGUF", help="print llama-perplexity's final estimate")
    parser.add_argument("--text", type=Path, help="with --perplexity: the text file")
    parser.add_argument("--ctx", type=int, default=1024, help="with --perplexity: context (default 1024)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.print_tools_dir:
        print(tools_dir())
        return 0
    report = lambda line: print(f"[gemma-export] llama.cpp: {line}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        folder = ensure_tools(report)
        if args.f32 is not None:
            print(to_f32(args.f32, threads=args.threads, progress=report))
        elif args.from_hf is not None:
            print(from_hf(args.from_hf, args.type, threads=args.threads, progress=report))
        elif args.perplexity is not None:
            if args.text is None:
                raise BadInput("--perplexity needs --text FILE")
            ppl, plus_minus = perplexity_with_error(args.perplexity, args.text, args.ctx, args.threads)
            print(f"{ppl:.4f} +/- {plus_minus:.5f}")
        else:
            print(folder)
    except BadInput as e:
        print(f"gemma-export: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
