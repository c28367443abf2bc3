"""Every bad input gets the Python CLI's one line from gemma-run (and from Java), with its exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.native import ERROR_PREFIX, error_message


def corrupt(artifact: Path, tmp_path: Path, edit) -> Path:
    """A copy of the artifact's manifest (the weights linked, not copied) with `edit` applied to its text."""
    out = tmp_path / "copy"
    out.mkdir()
    for f in artifact.iterdir():
        (out / f.name).symlink_to(f)
    (out / "manifest.json").unlink()
    (out / "manifest.json").write_text(edit((artifact / "manifest.json").read_text()))
    return out


def without_tokenizer(artifact: Path) -> Path:
    (artifact / "tokenizer.json").unlink()
    return artifact


def edited(change):
    """Where: a copy of the artifact whose manifest document went through `change`."""

    def edit(text: str) -> str:
        doc = json.loads(text)
        change(doc)
        return json.dumps(doc)

    return lambda artifact, tmp_path: corrupt(artifact, tmp_path, edit)


CASES = {
    "no artifact": (lambda a, t: t / "missing", ["--token-ids", "2,3"]),
    "no manifest": (lambda a, t: t, ["--token-ids", "2,3"]),
    "newer format": (edited(lambda d: d.update(format="gemma-export/manifest-v2.7")), ["--token-ids", "2"]),
    "older major": (edited(lambda d: d.update(format="gemma-export/manifest-v1.0")), ["--token-ids", "2"]),
    "missing field": (edited(lambda d: d["build"].pop("max_length")), ["--token-ids", "2"]),
    "unknown field": (edited(lambda d: d.update(extra=1)), ["--token-ids", "2"]),
    "token id out of vocabulary": (lambda a, t: a, ["--token-ids", "2,100000"]),
    "negative token id": (lambda a, t: a, ["--token-ids", "2,-1"]),
    "prompt past max length": (lambda a, t: a, ["--token-ids", "2,3", "--max-new-tokens", "5000"]),
    "not integers": (lambda a, t: a, ["--token-ids", "2,x"]),
    "both prompt and ids": (lambda a, t: a, ["--token-ids", "2", "--prompt", "hi"]),
    "neither prompt nor ids": (lambda a, t: a, []),
    "negative temperature": (lambda a, t: a, ["--token-ids", "2", "--temperature", "-1"]),
    "nan temperature": (lambda a, t: a, ["--token-ids", "2", "--temperature", "nan"]),
    "top-p of 0": (lambda a, t: a, ["--token-ids", "2", "--top-p", "0"]),
    "negative top-k": (lambda a, t: a, ["--token-ids", "2", "--top-k", "-3"]),
    "negative seed": (lambda a, t: a, ["--token-ids", "2", "--seed", "-1"]),
    "too many threads": (lambda a, t: a, ["--token-ids", "2", "--threads", "100000"]),
    "no tokenizer": (lambda a, t: without_tokenizer(corrupt(a, t, lambda s: s)), ["--prompt", "hi"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_one_line_error(cpp_runtime, gemma3_artifact, tmp_path, capsys, case) -> None:
    where, argv = CASES[case]
    artifact = where(gemma3_artifact, tmp_path)
    code, out, err = run(capsys, "generate", artifact, *argv, "--json")
    assert code == 2 and out == ""
    expected = error_message(err, "gemma-export: error: ")
    cpp = cpp_runtime.run(artifact, *argv, "--json")
    assert (cpp.returncode, cpp.stdout) == (2, "")
    assert error_message(cpp.stderr, ERROR_PREFIX) == expected
    if case in ("no artifact", "token id out of vocabulary", "top-p of 0", "missing field"):
        java = cpp_runtime.java(artifact, *argv, "--json")
        assert (java.returncode, java.stdout) == (2, "")
        assert error_message(java.stderr, ERROR_PREFIX) == expected


def test_corrupt_json_names_the_file(cpp_runtime, gemma3_artifact, tmp_path, capsys) -> None:
    artifact = corrupt(gemma3_artifact, tmp_path, lambda s: s[: len(s) // 2])
    code, _, err = run(capsys, "generate", artifact, "--token-ids", "2", "--json")
    python = error_message(err, "gemma-export: error: ")
    cpp = cpp_runtime.run(artifact, "--token-ids", "2")
    assert cpp.returncode == code == 2
    ours = error_message(cpp.stderr, ERROR_PREFIX)
    head = f"{artifact}/manifest.json: not valid JSON ("  # the parser's own words follow
    assert python.startswith(head) and ours.startswith(head)


def test_onnx_runtime_missing_or_unloadable(cpp_runtime, gemma3_artifact, tmp_path) -> None:
    env = {**cpp_runtime.env, "GEMMA_ORT_LIBRARY": str(tmp_path / "libonnxruntime.so.1.99.0")}
    done = cpp_runtime.run(gemma3_artifact, "--token-ids", "2,3", env=env)
    assert done.returncode == 2
    assert error_message(done.stderr, ERROR_PREFIX).startswith("ONNX Runtime library not found (")
    not_ort = {**cpp_runtime.env, "GEMMA_ORT_LIBRARY": "libm.so.6"}  # a library, but not ONNX Runtime
    done = cpp_runtime.run(gemma3_artifact, "--token-ids", "2,3", env=not_ort)
    assert done.returncode == 2
    assert "not an ONNX Runtime library" in error_message(done.stderr, ERROR_PREFIX)


def test_embed_refuses_a_decoder(cpp_runtime, gemma3_artifact, capsys) -> None:
    code, _, err = run(capsys, "embed", gemma3_artifact, "--text", "hi")
    cpp = cpp_runtime.run("embed", gemma3_artifact, "--text", "hi")
    assert cpp.returncode == code == 2
    assert error_message(cpp.stderr, ERROR_PREFIX) == error_message(err, "gemma-export: error: ")


def test_verify_files_names_a_changed_file(cpp_runtime, gemma3_artifact, tmp_path) -> None:
    """--verify-files re-hashes every file (sha256) against the manifest: an intact copy runs, a changed one not."""
    copy = tmp_path / "copy"
    shutil.copytree(gemma3_artifact, copy)
    done = cpp_runtime.run(copy, "--token-ids", "2,3", "--max-new-tokens", "2", "--verify-files")
    assert done.returncode == 0, done.stderr
    with (copy / "tokenizer.json").open("a") as f:
        f.write(" ")
    done = cpp_runtime.run(copy, "--token-ids", "2,3", "--max-new-tokens", "2", "--verify-files")
    assert done.returncode == 1
    assert error_message(done.stderr, ERROR_PREFIX).startswith(f"{copy}/tokenizer.json: file changed since the build")
