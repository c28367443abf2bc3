"""llama.cpp as a compared system of `gemma-export bench` (gemma_export/bench/llamacpp.py).

The default run never builds llama.cpp (5 minutes on 2 cores): it checks the parsing of llama-bench's JSON
and llama-perplexity's output on samples captured from real runs (the real Gemma 3 270M Q4_K_M GGUF, 2
threads), the GGUF header reader, the notes when llama.cpp cannot run, the options' one-line errors, and the
whole bench path with a stand-in llama-bench (a script printing captured JSON). The tests marked slow run the
built tools on the real GGUF; they skip, saying why, when the tools or the file are not here.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import tarfile
from pathlib import Path

import pytest

from gemma_export.bench import llamacpp
from gemma_export.bench import run as bench
from gemma_export.cli.main import main
from gemma_export.dev import random_checkpoint
from gemma_export.errors import BadInput
from gemma_export.pipeline.progress import Stages

# --- captured from llama.cpp 0c1e570 (vendored by llama-cpp-python 0.3.36) on the real Gemma 3 270M Q4_K_M GGUF,
# 2 threads (a busy machine: the speeds are not figures), the model's path shortened to its name:
# `llama-bench -m gemma-3-270m-q4_k_m.gguf -p 128 -n 0 -d 0 -t 2 -r 3 --no-warmup -o json`
PP_JSON = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "gemma-3-270m-q4_k_m.gguf",
    "model_type": "gemma3 270M Q4_K - Medium",
    "model_size": 246587904,
    "model_n_params": 268098176,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 128,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-12-06T16:00:17Z",
    "avg_ns": 2277022968,
    "stddev_ns": 255139773,
    "avg_ts": 56.659595,
    "stddev_ts": 5.968864,
    "samples_ns": [ 2571191975, 2143893693, 2115983237 ],
    "samples_ts": [ 49.7824, 59.7045, 60.492 ]
  }
]
"""
# `llama-bench -m gemma-3-270m-q4_k_m.gguf -p 0 -n 127 -d 128 -t 2 -r 3 --no-warmup -o json`
TG_JSON = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "gemma-3-270m-q4_k_m.gguf",
    "model_type": "gemma3 270M Q4_K - Medium",
    "model_size": 246587904,
    "model_n_params": 268098176,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 127,
    "n_depth": 128,
    "test_time": "2026-12-06T16:00:25Z",
    "avg_ns": 18640465504,
    "stddev_ns": 1962486529,
    "avg_ts": 7.395041,
    "stddev_ts": 2.302036,
    "samples_ns": [ 14422723836, 26801295109, 14697377568 ],
    "samples_ts": [ 8.80555, 4.73858, 8.641 ]
  }
]
"""
# `llama-perplexity -m gemma-3-270m-q4_k_m.gguf -f /usr/share/common-licenses/GPL-3 -c 1024 -t 2`: its stdout
# (the running estimate per chunk), then the last lines of its stderr (the final estimate lands on the ETA line).
PERPLEXITY_OUT = """2.20 minutes
[1]15.9178,[2]18.3020,[3]15.9535,[4]16.1578,[5]15.0593,[6]14.5683,[7]13.8630,
0.03.290.984 I perplexity: tokenizing the input ..
0.03.405.107 I perplexity: tokenization took 114.112 ms
0.03.405.126 I perplexity: calculating perplexity over 7 chunks, n_ctx=1024, batch_size=2048, n_seq=2
0.41.228.792 I perplexity: 37.82 seconds per pass - ETA 2.11.996.106 I Final estimate: PPL = 13.8630 +/- 0.66217
"""
REAL_GGUF = Path.home() / ".cache" / "gemma-export" / "real" / "gemma-3-270m-q4_k_m.gguf"
REAL_TEXT = Path("/usr/share/common-licenses/GPL-3")
DECODER = "tiny-gemma3-llamacpp"


def write_gguf(path: Path, file_type: int | None, version: int = 3) -> Path:
    """A GGUF header with no tensors: a string, an array of strings (as a tokenizer's), then general.file_type."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kvs = [string("general.architecture") + struct.pack("<I", 8) + string("gemma3"),
           string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(map(string, "abc")),
           string("gemma3.context_length") + struct.pack("<IQ", 10, 32768)]  # fmt: skip
    if file_type is not None:
        kvs.append(string("general.file_type") + struct.pack("<II", 4, file_type))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs)) + b"".join(kvs))
    return path


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def test_bench_json_gives_prefill_and_decode_speed() -> None:
    (pp,), (tg,) = llamacpp.parse_bench_json(PP_JSON), llamacpp.parse_bench_json(TG_JSON)
    row = llamacpp.summarise_tests(pp, tg)
    # The medians of the samples (llama-bench's own avg_ts is the mean of each sample's speed).
    assert row["prefill_s"] == pytest.approx(2.143893693) and row["prefill_tok_s"] == pytest.approx(128 / 2.143893693)
    assert row["decode_s"] == pytest.approx(14.697377568) and row["decode_tok_s"] == pytest.approx(127 / 14.697377568)
    assert row["prefill_samples_s"] == pytest.approx([2.571191975, 2.143893693, 2.115983237])
    assert row["depth"] == 128 and row["model_type"] == "gemma3 270M Q4_K - Medium"


@pytest.mark.parametrize(
    ("text", "message"),
    [("main: error: failed to load model", "printed no JSON"), ("[ {", "does not parse"),
     ('[{"n_prompt": 1}]', "lacks n_gen, n_depth, samples_ns, avg_ts")],
)  # fmt: skip
def test_bench_json_faults_are_one_line(text: str, message: str) -> None:
    with pytest.raises(llamacpp.ToolFailed, match=message) as e:
        llamacpp.parse_bench_json(text)
    assert "\n" not in str(e.value)


def test_perplexity_final_estimate() -> None:
    assert llamacpp.parse_perplexity(PERPLEXITY_OUT) == (13.863, 0.66217)


def test_perplexity_without_estimate_names_the_reason() -> None:
    short = "perplexity: you need at least 2048 tokens to evaluate perplexity with a context of 1024\n"
    with pytest.raises(llamacpp.ToolFailed, match="no final estimate: perplexity: you need at least 2048"):
        llamacpp.parse_perplexity(short)


# ---------------------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "name"), [(15, "Q4_K_M"), (0, "F32"), (1, "F16"), (99, "ftype 99")])
def test_gguf_file_type_from_header(tmp_path: Path, code: int, name: str) -> None:
    assert llamacpp.gguf_file_type(write_gguf(tmp_path / "m.gguf", code)) == name


def test_gguf_without_file_type(tmp_path: Path) -> None:
    assert llamacpp.gguf_file_type(write_gguf(tmp_path / "m.gguf", None)) is None


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf", b"GGUF\x03\x00\x00\x00\x00"])
def test_not_a_gguf_is_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=r"bad\.gguf: ") as e:
        llamacpp.gguf_file_type(path)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not REAL_GGUF.is_file(), reason=f"{REAL_GGUF} is not here (gemma_export.dev.real_checkpoint)")
def test_real_gguf_is_q4_k_m() -> None:
    assert llamacpp.gguf_file_type(REAL_GGUF) == "Q4_K_M"


# ---------------------------------------------------------------------------------------------------------
# The tools: where they are, and what happens when they are not
# ---------------------------------------------------------------------------------------------------------


def test_tools_dir_env_then_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path / "tools"))
    assert llamacpp.tools_dir() == tmp_path / "tools"
    monkeypatch.delenv(llamacpp.ENV)
    monkeypatch.delenv("GEMMA_EXPORT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = f"llama.cpp-{llamacpp.LLAMA_CPP_PYTHON_VERSION}-{llamacpp.BUILD_RECIPE}"
    assert llamacpp.tools_dir() == tmp_path / "xdg" / "gemma-export" / folder / "bin"


def test_amx_is_turned_off_on_x86_only() -> None:
    """llama.cpp's AMX matmul segfaults on this workplace's Sapphire Rapids CPUs (llamacpp.NO_AMX)."""
    x86 = llamacpp.cmake_flags("x86_64")
    assert f"-DCMAKE_C_FLAGS={llamacpp.NO_AMX}" in x86 and f"-DCMAKE_CXX_FLAGS={llamacpp.NO_AMX}" in x86
    assert "-mno-amx-int8" in llamacpp.NO_AMX and "-DGGML_NATIVE=ON" in x86
    assert llamacpp.cmake_flags("aarch64") == llamacpp.CMAKE_FLAGS


def test_env_folder_without_tools_is_never_built_into(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path))
    with pytest.raises(llamacpp.ToolsUnavailable, match="has no llama-bench, llama-perplexity, llama-quantize"):
        llamacpp.ensure_tools()
    assert not any(tmp_path.iterdir())


def test_no_cmake_is_one_line_and_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    monkeypatch.setenv("GEMMA_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(llamacpp.ToolsUnavailable, match="cmake is not installed") as e:
        llamacpp.ensure_tools()
    assert "\n" not in str(e.value) and not (tmp_path / "cache").exists()


def test_missing_tool_names_how_to_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path))
    with pytest.raises(llamacpp.ToolsUnavailable, match=r"run `python -m gemma_export\.bench\.llamacpp`"):
        llamacpp.bench(write_gguf(tmp_path / "m.gguf", 15), 8, 4, threads=1)


def test_sdist_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    sdist = tmp_path / "llama_cpp_python-0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("llama_cpp_python-0/ok.txt", "llama_cpp_python-0/../../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(llamacpp.ToolsUnavailable, match="refused to extract it"):
        llamacpp.extract_sdist(sdist, tmp_path / "src")
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_bench_notes_when_llamacpp_cannot_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stages = Stages(quiet=True)
    gguf = write_gguf(tmp_path / "m.gguf", 15)
    # Not asked for and no GGUF: not run, no note (the default systems).
    assert bench.llamacpp_targets([], 60, stages) == ({}, "skipped: no GGUF file (give --gguf FILE)")
    ready, notes = bench.other_systems({}, None, None, tmp_path, 60, stages, ggufs=[])
    assert not any(n.startswith("llama.cpp") for n in notes) and "llama.cpp" not in ready
    # Asked for without a GGUF: one note.
    ready, notes = bench.other_systems({}, None, ["llama.cpp"], tmp_path, 60, stages, ggufs=[])
    assert ready == {} and notes == ["llama.cpp: skipped: no GGUF file (give --gguf FILE)"]
    # Its tools absent and not buildable here: one note naming why.
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path / "none"))
    ready, notes = bench.other_systems({}, None, ["llama.cpp"], tmp_path, 60, stages, ggufs=[gguf])
    assert ready == {} and len(notes) == 1
    assert notes[0].startswith(f"llama.cpp: skipped: {llamacpp.ENV}={tmp_path / 'none'} has no llama-bench")


# ---------------------------------------------------------------------------------------------------------
# `gemma-export bench` options
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--systems", "vllm"], "--systems: unknown system 'vllm'; choose from: transformers, genai, llama.cpp"),
        (["--gguf", "{tmp}/absent.gguf"], "--gguf {tmp}/absent.gguf: no such file"),
        (["--gguf", "{tmp}/text.gguf"], "{tmp}/text.gguf: not a GGUF file"),
        (["--gguf", "{tmp}/m.gguf,{tmp}/absent.gguf"], "--gguf {tmp}/absent.gguf: no such file"),
        (["--gguf", "{tmp}/m.gguf", "--systems", "transformers"], "--gguf gives llama.cpp's model: add llama.cpp"),
    ],
)
def test_bad_options_are_exit_code_2(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_gguf(inputs / "m.gguf", 15)
    (inputs / "text.gguf").write_text("not a model, only text long enough to hold a header")
    workdir = tmp_path / "work"
    args = [a.replace("{tmp}", str(inputs)) for a in args]
    assert main(["bench", "--random", "gemma-3-270m", *args, "--workdir", str(workdir), "--json"]) == 2
    captured = capsys.readouterr()
    assert message.replace("{tmp}", str(inputs)) in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out
    assert not workdir.exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------------
# The whole bench path, with a stand-in llama-bench
# ---------------------------------------------------------------------------------------------------------

FAKE_BENCH = """#!{python}
# A stand-in llama-bench: prints the captured JSON of a prompt test (-n 0) or a generation test, with the
# counts it was asked for, after holding some memory for a moment (its peak RSS is polled meanwhile).
import json, sys, time
args = sys.argv[1:]
get = lambda flag: int(args[args.index(flag) + 1])
assert "--no-warmup" in args and args[args.index("-o") + 1] == "json", args
test = json.loads({pp!r} if get("-n") == 0 else {tg!r})[0]
test.update(n_prompt=get("-p"), n_gen=get("-n"), n_depth=get("-d"), n_threads=get("-t"))
test["samples_ns"] = [int(1e8 + 1e6 * (test["n_prompt"] + test["n_gen"]))] * get("-r")
held = bytearray(64 << 20)
time.sleep(0.3)
print(json.dumps([test], indent=2))
"""


@pytest.fixture
def fake_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    folder = tmp_path / "tools"
    folder.mkdir()
    for name in llamacpp.TOOLS:
        script = folder / name
        script.write_text(FAKE_BENCH.format(python=sys.executable, pp=PP_JSON, tg=TG_JSON))
        script.chmod(0o755)
    monkeypatch.setenv(llamacpp.ENV, str(folder))
    return folder


def test_bench_runs_two_processes_and_polls_their_peak(fake_tools: Path, tmp_path: Path) -> None:
    result = llamacpp.bench(write_gguf(tmp_path / "m.gguf", 15), 16, 5, threads=2, repeat=3)
    assert result["prefill_s"] == pytest.approx(0.116) and result["prefill_tok_s"] == pytest.approx(16 / 0.116)
    assert result["decode_s"] == pytest.approx(0.104) and result["decode_tok_s"] == pytest.approx(4 / 0.104)
    assert result["depth"] == 16 and len(result["decode_samples_s"]) == 3
    assert result["peak_rss_bytes"] > 64 << 20  # the stand-in's bytearray, seen while it ran


def test_bench_command_measures_decode_at_the_prompt_depth(fake_tools: Path) -> None:
    cmd = llamacpp.bench_command(Path("m.gguf"), 2, gen=127, depth=1024)
    assert cmd[1:] == ["-m", "m.gguf", "-p", "0", "-n", "127", "-d", "1024", "-t", "2", "-r", "1", "--no-warmup",
                       "-o", "json"]  # fmt: skip


@pytest.mark.slow
def test_decoder_bench_with_llamacpp_rows(capsys, monkeypatch: pytest.MonkeyPatch, fake_tools, tmp_path) -> None:
    """--gguf twice (a Q4_K_M and an F32 file): a row each, labelled with its type, ratios ours / it, no
    same-tokens check, one note; batch 2 is an error row (llama-bench runs one sequence)."""
    from tests.support.bench import TINY_DECODER

    monkeypatch.setitem(random_checkpoint.PUBLISHED_CONFIGS, DECODER, TINY_DECODER)
    q4, f32 = write_gguf(tmp_path / "q4.gguf", 15), write_gguf(tmp_path / "f32.gguf", 0)
    work = str(tmp_path / "w")
    args = ["bench", "--random", DECODER, "--systems", "llama.cpp", "--gguf", f"{q4},{f32}", "--batch-sizes", "1,2",
            "--prompt-tokens", "6", "--new-tokens", "3", "--threads", "1", "--workdir", work]  # fmt: skip
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["systems"] == ["gemma-export", "llama.cpp"]
    assert len(result["notes"]) == 1 and "same_tokens is None" in result["notes"][0]
    rows = {(r["system"], r["precision"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(s, p, b) for s, p in [("gemma-export", "fp32"), ("llama.cpp", "Q4_K_M"),
                                                ("llama.cpp", "F32")] for b in (1, 2)}  # fmt: skip
    for precision in ("Q4_K_M", "F32"):
        row, ours = rows["llama.cpp", precision, 1], rows["gemma-export", "fp32", 1]
        assert row["same_tokens"] is None and row["state_bytes"] is None
        assert row["first_token_s"] == pytest.approx(0.106)  # the stand-in's sample times, as the bench rounds them
        assert row["decode_tok_s"] == pytest.approx(2 / 0.102, rel=1e-3)
        assert row["decode_ratio"] == pytest.approx(ours["decode_tok_s"] / row["decode_tok_s"], rel=2e-3)
        assert row["peak_rss_bytes"] > 64 << 20
        assert rows["llama.cpp", precision, 2]["error"] == "llama-bench runs one sequence: batch 1 only"


# ---------------------------------------------------------------------------------------------------------
# The built tools on the real weights (slow; skipped when either is not here)
# ---------------------------------------------------------------------------------------------------------


def _real_tools_or_skip() -> None:
    missing = llamacpp.missing_tools(llamacpp.tools_dir())
    if missing:
        pytest.skip(f"llama.cpp's tools are not built ({', '.join(missing)}): make llama-cpp")
    if not REAL_GGUF.is_file():
        pytest.skip(f"{REAL_GGUF} is not here: python -m gemma_export.dev.real_checkpoint --print-gguf")


@pytest.mark.slow
def test_real_llama_bench() -> None:
    _real_tools_or_skip()
    result = llamacpp.bench(REAL_GGUF, 32, 8, threads=min(2, os.cpu_count() or 1))
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0 and result["depth"] == 32
    assert result["model_type"].startswith("gemma3") and "Q4_K" in result["model_type"]
    assert result["peak_rss_bytes"] > 100 << 20  # the weights it touched are resident


@pytest.mark.slow
def test_real_perplexity_is_sane() -> None:
    _real_tools_or_skip()
    if not REAL_TEXT.is_file():
        pytest.skip(f"{REAL_TEXT} is not here")
    ppl = llamacpp.perplexity(REAL_GGUF, REAL_TEXT, ctx=256, threads=2, chunks=2)
    assert 1.0 < ppl < 100.0  # a pretrained 270M model on English legal prose
