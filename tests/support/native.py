"""The C++ and Java runtimes in tests: built once per session (`make cpp java`, incremental), run as processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
ERROR_PREFIX = "gemma-run: error: "


def ort_library() -> Path:
    """The pinned onnxruntime wheel's library: what the Python client runs too."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so.1*"))
    assert found, f"no libonnxruntime.so.1.x in {capi}"
    return found[0]


@dataclass(frozen=True)
class Native:
    gemma_run: Path
    java_dir: Path
    env: dict[str, str]

    def run(self, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.gemma_run), *map(str, args)], capture_output=True, text=True, env=env or self.env, timeout=600
        )

    def java(self, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        command = ["java", f"-Djava.library.path={self.java_dir}", "-cp", str(self.java_dir / "gemma-runtime.jar")]
        return subprocess.run(
            [*command, "ai.gemma.runtime.Generate", *map(str, args)],
            capture_output=True,
            text=True,
            env=env or self.env,
            timeout=600,
        )


def build() -> Native:
    """`make cpp java` once (cmake and make skip what is up to date); skips only when a toolchain is absent."""
    missing = [
        tool for tool in ("g++", "cmake", "javac", "java", "jar", "apt-get", "dpkg-deb") if not shutil.which(tool)
    ]
    if missing:
        pytest.skip(f"C++/Java toolchain absent: {', '.join(missing)} not on PATH")
    env = {**os.environ, "GEMMA_ORT_LIBRARY": str(ort_library())}
    (ROOT / "build").mkdir(exist_ok=True)
    with FileLock(ROOT / "build" / ".native-build.lock"):  # pytest-xdist: one worker builds, the other waits
        make = subprocess.run(["make", "-s", "cpp", "java"], cwd=ROOT, capture_output=True, text=True)
    if make.returncode != 0:
        tail = "\n".join((make.stdout + make.stderr).splitlines()[-30:])
        if "fetch_deps" in tail and not (ROOT / "build/deps/usr/include/onnxruntime").is_dir():
            pytest.skip(f"ONNX Runtime headers could not be fetched (offline?):\n{tail}")
        pytest.fail(f"make cpp java failed:\n{tail}")
    return Native(ROOT / "build/cpp/gemma-run", ROOT / "build/java", env)


def error_message(stderr: str, prefix: str) -> str:
    """The message of the one error line (what follows `prefix`)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line on stderr: {stderr!r}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]
