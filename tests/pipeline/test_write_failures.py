"""The output side of a build: an OUT_DIR that cannot be written, a disk that fills up, Ctrl-C.

The contract (README, "Exit codes"): an OUT_DIR that cannot be created, or a write that fails for want of space
or on a read-only or failing disk (ENOSPC, EDQUOT, EFBIG, EROFS, EIO), is exit 2 with one line
`gemma-export: error: cannot write OUT/...: No space left on device`; SIGINT is exit 130 and one line
`gemma-export: interrupted`. Either way neither OUT_DIR nor a `.OUT.*` staging sibling is left, and nothing is
written into the checkpoint folder.

The trace stage is the slow one, so the module traces its one-layer checkpoint once: in-process cases reuse
that graph, and so do the subprocesses that need a later stage (SIGINT during verify, the tmpfs) through a
wrapper that runs `gemma_export.cli.main.main` with the trace stage replaced by loading it. SIGINT during trace runs
the real `gemma-export` console script.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx_ir as ir
import pytest

from gemma_export.dev.random_checkpoint import TINY_CONFIGS, write_random_checkpoint
from gemma_export.manifest import MANIFEST
from gemma_export.pipeline import optimize, package, trace
from gemma_export.targets.genai_config import GENAI_CONFIG
from tests.support.cli import assert_no_output, error_line, run

CONFIG = {**TINY_CONFIGS["gemma"], "num_hidden_layers": 1}  # the smallest decoder: its trace takes ~3 s


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("write_failures") / "ckpt", CONFIG)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())  # hidden (temporary) files included


# `python -c WRAPPER TRACED_ONNX build ...`: the CLI with the trace stage replaced by loading TRACED_ONNX.
WRAPPER = """
import sys
import onnx_ir as ir
from gemma_export.cli import main as cli
from gemma_export.pipeline import optimize
from gemma_export.pipeline import trace
traced = sys.argv.pop(1)
trace.export_decoder = lambda model: ir.load(traced)
optimize.optimize = lambda graph: graph
optimize.attach_functions = lambda graph, opset: graph
sys.exit(cli.main(sys.argv[1:]))
"""


def console_script() -> str:
    for bin_dir in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        script = shutil.which("gemma-export", path=str(bin_dir))
        if script:
            return script
    pytest.fail(f"gemma-export is not installed beside {sys.executable}")


# ---- an OUT_DIR that cannot be created: refused before the slow stages --------------------------------------


# Each case: (OUT_DIR, what stands in the way: the nearest existing ancestor of OUT_DIR).
def _under_a_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "notes.txt").write_text("a file, not a folder")
    return tmp / "notes.txt" / "out", tmp / "notes.txt"


def _read_only_parent(tmp: Path) -> tuple[Path, Path]:
    parent = tmp / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        (parent / "probe").mkdir()
    except PermissionError:
        return parent / "sub" / "out", parent
    (parent / "probe").rmdir()
    parent.chmod(0o755)
    pytest.skip("file modes do not stop this user (root): the /proc and under-a-file cases are the real test here")


def _proc(tmp: Path) -> tuple[Path, Path]:
    """/proc refuses new folders whoever asks, root included (os.access says it is writable)."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    return Path("/proc") / f"gemma-export-test-{os.getpid()}" / "out", Path("/proc")


UNWRITABLE = {"under a regular file": _under_a_file, "read-only parent (chmod)": _read_only_parent, "/proc": _proc}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_unwritable_out_dir_is_refused_before_loading(
    case: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, blocker = UNWRITABLE[case](tmp_path)
    try:
        code, stdout, stderr = run(capsys, "build", ckpt, "-o", out)
        mine = blocker if blocker.is_dir() and blocker.is_relative_to(tmp_path) else tmp_path
        leftovers = [p.name for p in mine.iterdir() if p.name.startswith(".")]
    finally:
        if case.startswith("read-only"):
            blocker.chmod(0o755)
    assert code == 2, stderr
    assert stderr.count("\n") == 1, f"not refused before the load stage:\n{stderr}"
    error_line(stderr, str(out), "cannot create the output directory", f"({blocker} is not a writable folder")
    assert stdout == ""
    assert not out.exists()
    assert out.parent == blocker or not out.parent.exists()  # no intermediate folder made either
    assert leftovers == []  # the probe folder, where one could be made, is gone


# ---- a write that fails mid-package (injected): one line, exit 2, nothing left ------------------------------------


@pytest.fixture(scope="module")
def traced_file(ckpt: Path) -> Path:
    """The checkpoint's traced and optimized graph, made once (weights inline: it is small)."""
    from gemma_export.checkpoint import load

    _, model = load.load_model(ckpt)
    graph = optimize.attach_functions(optimize.optimize(trace.export_decoder(model)), trace.OPSET)
    path = ckpt.parent / "traced.onnx"
    ir.save(graph, path)
    return path


@pytest.fixture
def traced(traced_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "export_decoder", lambda model: ir.load(traced_file))
    monkeypatch.setattr(optimize, "optimize", lambda graph: graph)
    monkeypatch.setattr(optimize, "attach_functions", lambda graph, opset: graph)


NUMPY_SHORT_WRITE = 0  # "errno" of the failure numpy's tofile raises on a full disk: it carries none


def inject_write_failure(monkeypatch: pytest.MonkeyPatch, where: str, code: int) -> list[Path]:
    """Make the write of `where` fail with OSError(code) once part of it is on disk; returns what the staging
    folder held at that moment (so a test can show the failure came mid-write)."""
    seen: list[Path] = []
    failure = OSError(code, os.strerror(code))
    if code == NUMPY_SHORT_WRITE:  # what a full disk looks like through numpy (see the tmpfs test)
        failure = OSError("problem writing element 1024 to file")
        monkeypatch.setattr(package.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 20, 1 << 20, 0))
    if where == package.WEIGHTS_FILE:
        real_write_model = package.write_model

        def write_model(model: ir.Model, folder: Path, progress: object = None) -> None:
            tensors = 0

            def fail_on_second_tensor(written: int) -> None:
                nonlocal tensors
                tensors += 1
                if tensors == 2:  # the first tensor is in onnx_ir's temporary data file by now
                    seen.extend(sorted(folder.rglob("*")))
                    raise failure

            real_write_model(model, folder, progress=fail_on_second_tensor)

        monkeypatch.setattr(package, "write_model", write_model)
    else:
        real_write_json = package.write_json

        def write_json(path: Path, data: dict) -> None:
            if path.name != where:
                return real_write_json(path, data)
            text = json.dumps(data)
            path.write_text(text[: len(text) // 2])  # half of it made it to disk
            seen.extend(sorted(path.parent.iterdir()))
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(package, "write_json", write_json)
    return seen


WRITE_FAILURES = {
    "no space, mid-weights": (package.WEIGHTS_FILE, errno.ENOSPC),
    "no space, numpy's short write": (package.WEIGHTS_FILE, NUMPY_SHORT_WRITE),
    "no space, genai_config": (GENAI_CONFIG, errno.ENOSPC),
    "no space, manifest (after verify)": (MANIFEST, errno.ENOSPC),
    "quota exceeded": (MANIFEST, errno.EDQUOT),
    "read-only filesystem": (package.WEIGHTS_FILE, errno.EROFS),
    "I/O error": (GENAI_CONFIG, errno.EIO),
}


@pytest.mark.parametrize(
    ("case", "force"),
    [(case, False) for case in WRITE_FAILURES]
    # --force: the last write fails, after the old OUT_DIR would have been replaced had it succeeded
    + [("no space, manifest (after verify)", True)],
    ids=[*WRITE_FAILURES, "no space, manifest (after verify), --force over an old OUT_DIR"],
)
def test_write_failure_is_one_line_and_leaves_nothing(
    case: str,
    force: bool,
    ckpt: Path,
    traced: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    where, code = WRITE_FAILURES[case]
    seen = inject_write_failure(monkeypatch, where, code)
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "keep.txt").write_text("the previous artifact")
    before = listing(ckpt)
    rc, stdout, stderr = run(capsys, "build", ckpt, "-o", out, *(["--force"] if force else []))
    assert rc == 2, stderr
    # the file, in OUT_DIR's terms (an injected OSError of the weights' writer names none)
    named = out if where == package.WEIGHTS_FILE and code != NUMPY_SHORT_WRITE else out / where
    error_line(stderr, f"cannot write {named}: {os.strerror(code or errno.ENOSPC)}")
    assert stdout == ""
    assert seen, "the failure was not injected"
    assert seen[0].parent.name.startswith(".out.partial-") or seen[0].parent.parent.name.startswith(".out.partial-")
    if force:
        assert listing(out) == ["keep.txt"]
        assert listing(tmp_path) == ["out"]
    else:
        assert_no_output(out)
        assert listing(tmp_path) == []
    assert listing(ckpt) == before


def test_other_os_errors_stay_internal_errors(
    ckpt: Path, traced: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a failing disk is the user's to fix (exit 2); another OSError is ours (exit 3), still cleaned up."""
    monkeypatch.delenv("GEMMA_EXPORT_DEBUG", raising=False)
    inject_write_failure(monkeypatch, GENAI_CONFIG, errno.EINVAL)
    out = tmp_path / "out"
    rc, _, stderr = run(capsys, "build", ckpt, "-o", out)
    assert rc == 3, stderr
    error_line(stderr, "OSError", "Invalid argument", prefix="gemma-export: internal error:")
    assert_no_output(out)
    assert listing(tmp_path) == []


# ---- a real full disk: a tiny tmpfs in a private mount namespace ------------------------------------------------


def mount_namespace() -> list[str]:
    """A command prefix running in a private mount namespace where a tmpfs can be mounted (it vanishes with the
    process, so nothing stays mounted whatever happens) and this Python runs, or skip: root may unshare
    directly, anyone else through a user namespace; containers often allow neither."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("mount") is None:
        pytest.skip("no unshare/mount here; the injected-ENOSPC tests cover the same path")
    prefixes = [[unshare, "--mount", "--propagation", "private"]] if os.geteuid() == 0 else []
    prefixes.append([unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"])
    errors = []
    with tempfile.TemporaryDirectory() as probe:
        for prefix in prefixes:
            try:
                # the interpreter must run in there too: files of unmapped owners may be out of reach
                check = 'mount -t tmpfs -o size=64k tmpfs "$1" && "$2" -c pass'
                proc = subprocess.run(
                    [*prefix, "sh", "-c", check, "sh", probe, sys.executable],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            except OSError as e:
                errors.append(str(e))
                continue
            if proc.returncode == 0:
                return prefix
            errors.append(proc.stderr.strip() or f"exit {proc.returncode}")
    pytest.skip(f"cannot mount a tmpfs here ({'; '.join(errors)}); the injected-ENOSPC tests cover the same path")


def test_full_tmpfs_is_one_line_and_leaves_nothing(ckpt: Path, traced_file: Path, tmp_path: Path) -> None:
    """OUT_DIR on a 128 KiB tmpfs: the ~270 KiB of weights do not fit."""
    prefix = mount_namespace()
    disk = tmp_path / "disk"
    disk.mkdir()
    before = listing(ckpt)
    script = (
        'mount -t tmpfs -o size=128k tmpfs "$1" || exit 97\n'
        '"$2" -c "$3" "$4" build "$5" -o "$1/out"\n'
        "rc=$?\n"
        'echo "left on the disk: [$(ls -A "$1" | tr "\\n" " ")]"\n'
        "exit $rc\n"
    )
    proc = subprocess.run(
        [*prefix, "sh", "-c", script, "sh", str(disk), sys.executable, WRAPPER, str(traced_file), str(ckpt)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 97, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert "[gemma-export] package: started" in proc.stderr  # it failed writing, not in a check before
    # OUT_DIR, or the file in it when the failed write named one (numpy's short write is named after the fact)
    line = error_line(proc.stderr, f"cannot write {disk / 'out'}", ": No space left on device")
    assert f"cannot write {disk / 'out'}: " in line or f"cannot write {disk / 'out' / package.WEIGHTS_FILE}: " in line
    assert proc.stdout.splitlines() == ["left on the disk: []"]
    assert listing(disk) == []  # the tmpfs is gone with the namespace; nothing was written beneath it
    assert listing(ckpt) == before


# ---- Ctrl-C: a real SIGINT to a running `gemma-export build` -----------------------------------------------------


def _default_sigint() -> None:
    """In the build's process, before it starts: SIGINT as a terminal leaves it. A runner started in the background
    by a shell without job control (`sh -c 'pytest &'`) ignores SIGINT, and children inherit that: Python would
    then never raise KeyboardInterrupt, and these tests would measure the runner, not the build."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stage", ["trace", "verify"])
def test_sigint_mid_build_leaves_nothing(stage: str, ckpt: Path, traced_file: Path, tmp_path: Path) -> None:
    """SIGINT once the stage has started (its plain "[gemma-export] STAGE: started" log line): in trace (the
    console script, a real trace) before any output exists; in verify (the wrapper, the traced graph reused)
    while the complete staging folder is beside OUT_DIR."""
    out = tmp_path / "out"
    before = listing(ckpt)
    command = [console_script()] if stage == "trace" else [sys.executable, "-c", WRAPPER, str(traced_file)]
    proc = subprocess.Popen(
        [*command, "build", str(ckpt), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=_default_sigint,
    )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines: list[str] = []
    staging: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if lines[-1] == f"[gemma-export] {stage}: started":
                staging = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
                proc.send_signal(signal.SIGINT)
                break
        stdout, rest = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    stderr = "\n".join(lines) + "\n" + rest
    assert f"[gemma-export] {stage}: started" in lines, stderr
    assert proc.returncode == 130, f"exit {proc.returncode} (the build may have ended before the signal):\n{stderr}"
    assert stderr.count("gemma-export: interrupted") == 1
    error_line(stderr, prefix="gemma-export: interrupted")
    assert stdout == ""
    assert len(staging) == (1 if stage == "verify" else 0)  # the interrupt came with the staging folder in place
    assert_no_output(out)
    assert listing(tmp_path) == []  # no staging, probe or replaced folder beside OUT_DIR
    assert listing(ckpt) == before  # nothing written into the checkpoint


# The WRAPPER, with the verify stage's ONNX Runtime child made slow: it writes its pid to the file named by
# argv[1] once it has its request, then sleeps; the test interrupts the build while the child runs.
SLOW_CHILD = """
import os, sys, time
from gemma_export.verify import child as verify_worker
ready = sys.argv.pop(1)
def slow(request):
    with open(ready + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(ready + ".tmp", ready)
    time.sleep(300)
verify_worker.measure_passes = slow
sys.exit(verify_worker.main(sys.argv[1:]))
"""
WRAPPER_SLOW_CHILD = WRAPPER.replace(
    "traced = sys.argv.pop(1)\n",
    "traced = sys.argv.pop(1)\nready = sys.argv.pop(1)\nfrom gemma_export.verify import child as verify_worker\n"
    "verify_worker.command = lambda: [sys.executable, '-c', " + repr(SLOW_CHILD) + ", ready, str(os.getpid())]\n",
).replace("import sys\n", "import os, sys\n", 1)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_while_the_onnx_runtime_child_runs(ckpt: Path, traced_file: Path, tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it (SIGINT to the build's process group) while verify's child process runs:
    exit 130, one line, nothing left beside OUT_DIR, and the child is gone with the build (no orphan)."""
    work = tmp_path / "work"
    work.mkdir()
    out, ready = work / "out", tmp_path / "child.pid"
    before = listing(ckpt)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER_SLOW_CHILD, str(traced_file), str(ready), "build", str(ckpt), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=work,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        child = int(ready.read_text())
        assert _running(child)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.count("gemma-export: interrupted") == 1
    error_line(stderr, prefix="gemma-export: interrupted")
    assert stdout == ""
    assert not _running(child), f"the ONNX Runtime child {child} outlived the build"
    assert_no_output(out)
    assert listing(work) == []  # no staging, probe or replaced folder beside OUT_DIR
    assert listing(ckpt) == before
