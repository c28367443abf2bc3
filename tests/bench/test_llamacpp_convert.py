"""Hugging Face folders -> GGUF by llama.cpp's converter (gemma_export/bench/llamacpp.py `from_hf`).

No real conversion: a stand-in convert_hf_to_gguf.py (records its command line and PYTHONPATH, writes its
--outfile, or fails as a Python traceback does) and a stand-in llama-quantize (copies its input, tagged with the
type) check the cache key, the cached second call, the temporary names, the converter's extraction from an sdist
and the one-line errors.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from gemma_export.bench import llamacpp
from gemma_export.errors import BadInput

FAKE_CONVERTER = """import json, os, sys
args = sys.argv[1:]
out = args[args.index("--outfile") + 1]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"tool": "convert", "args": args, "pythonpath": os.environ["PYTHONPATH"]}) + "\\n")
with open(out, "w") as f:
    f.write("GGUF " + args[args.index("--outtype") + 1])
if os.environ.get("FAKE_FAIL"):
    print("INFO:hf-to-gguf:Set model tokenizer", file=sys.stderr)
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "conversion/gemma.py", line 657, in set_vocab', file=sys.stderr)
    print("    assert len(tokens) == vocab.vocab_size", file=sys.stderr)
    print("AssertionError", file=sys.stderr)
    sys.exit(1)
"""

FAKE_QUANTIZE = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"tool": "quantize", "args": args}}) + "\\n")
src, dst, ftype = args[1:4]
with open(dst, "w") as f:
    f.write(open(src).read() + " -> " + ftype)
"""


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A cache with a stand-in converter, a tools folder with a stand-in llama-quantize; the log both append to."""
    monkeypatch.setenv("GEMMA_EXPORT_CACHE", str(tmp_path / "cache"))
    converter = llamacpp.converter_dir()
    (converter / "conversion").mkdir(parents=True)
    (converter / "gguf-py").mkdir()
    (converter / llamacpp.CONVERTER).write_text(FAKE_CONVERTER)
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in llamacpp.TOOLS:
        (tools / name).write_text(FAKE_QUANTIZE.format(python=sys.executable))
        (tools / name).chmod(0o755)
    monkeypatch.setenv(llamacpp.ENV, str(tools))
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return log


def hf_folder(path: Path, vocab: int = 262144) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["Gemma4ForCausalLM"], "vocab_size": vocab}))
    (path / "tokenizer.json").write_text("{}")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    (path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 32)
    (path / "model.safetensors.index.json").write_text("{}")
    return path


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_converts_then_quantizes_once_into_the_cache(fakes: Path, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "e2b")
    out = llamacpp.from_hf(folder, "q4_k_m", threads=2)
    key = llamacpp.hf_folder_key(folder)[:12]
    assert out == tmp_path / "cache" / "gguf" / f"e2b-{key}-Q4_K_M.gguf"
    assert out.read_text() == "GGUF bf16 -> Q4_K_M"
    assert (out.parent / f"e2b-{key}-BF16.gguf").read_text() == "GGUF bf16"  # kept for the other types
    convert, quantize = calls(fakes)
    assert convert["args"][:3] == [str(folder), "--outtype", "bf16"]
    assert convert["pythonpath"].split(":")[0] == str(llamacpp.converter_dir() / "gguf-py")  # the vendored gguf
    assert quantize["args"][-2:] == ["Q4_K_M", "2"]
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert llamacpp.from_hf(folder, "Q4_K_M") == out and len(calls(fakes)) == 2  # cached: nothing runs
    llamacpp.from_hf(folder, "Q8_0")
    assert [c["tool"] for c in calls(fakes)] == ["convert", "quantize", "quantize"]  # BF16 reused
    assert llamacpp.from_hf(folder, "F16").read_text() == "GGUF f16"  # the converter's own type, unquantized


def test_key_reads_metadata_not_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "m")
    key = llamacpp.hf_folder_key(folder)
    assert llamacpp.hf_folder_key(folder) == key
    hashed: list[str] = []
    monkeypatch.setattr(llamacpp, "file_sha256", lambda p: hashed.append(p.name) or "x")
    llamacpp.hf_folder_key(folder)
    assert sorted(hashed) == ["config.json", "model.safetensors.index.json", "tokenizer.json"]
    monkeypatch.undo()
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 33)  # a shard of another size
    assert llamacpp.hf_folder_key(folder) != key
    key = llamacpp.hf_folder_key(folder)
    (folder / "tokenizer.json").write_text('{"model": 1}')  # another tokenizer
    assert llamacpp.hf_folder_key(folder) != key
    linked = tmp_path / "linked"
    linked.mkdir()
    for path in folder.iterdir():
        (linked / path.name).symlink_to(path)
    assert llamacpp.hf_folder_key(linked) == llamacpp.hf_folder_key(folder)  # symlinks followed


def test_converter_failure_is_one_line_and_leaves_nothing(fakes: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    folder = hf_folder(tmp_path / "e2b")
    with pytest.raises(llamacpp.ToolFailed) as e:
        llamacpp.from_hf(folder)
    assert str(e.value) == ("convert_hf_to_gguf.py failed: AssertionError at `assert len(tokens) == vocab.vocab_size`")
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # the partial file the converter wrote is gone
    assert [c["tool"] for c in calls(fakes)] == ["convert"]


def test_bad_inputs_are_one_line(fakes: Path, capsys, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="--type Q5_0: expected one of Q4_K_M, Q8_0, F16, BF16"):
        llamacpp.from_hf(hf_folder(tmp_path / "m"), "Q5_0")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert llamacpp.main(["--from-hf", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"gemma-export: error: {empty}: no config.json (not a Hugging Face checkpoint folder)"
    ]
    assert calls(fakes) == []


def write_sdist(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(f"llama_cpp_python-0/{name}")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    return path


def test_converter_extracted_alone_from_the_sdist(tmp_path: Path) -> None:
    sdist = write_sdist(tmp_path / "s.tar.gz", [
        "vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/gemma.py",
        "vendor/llama.cpp/gguf-py/gguf/__init__.py", "vendor/llama.cpp/src/llama.cpp", "llama_cpp/__init__.py",
    ])  # fmt: skip
    dest = llamacpp.extract_converter(sdist, tmp_path / "convert")
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == ["conversion/gemma.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    without = write_sdist(tmp_path / "w.tar.gz", ["vendor/llama.cpp/convert_hf_to_gguf.py"])
    with pytest.raises(llamacpp.ToolsUnavailable, match=r"has no vendor/llama\.cpp/conversion, gguf-py"):
        llamacpp.extract_converter(without, tmp_path / "other")
