"""`gemma-export bench` end to end on tiny random models, through the command line's --json output.

Each system runs in its own worker process, as in a real run; the tiny models are registered as published
sizes so that `--random` writes and builds them (once, under one workdir) as it does the real ones. Speed is
never asserted: the tests check that the numbers exist, are consistent with each other, and that the systems
computed the same tokens.
"""

from __future__ import annotations

import inspect
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from gemma_export.bench import genai_builder
from gemma_export.bench import run as bench
from gemma_export.bench.workers import GENAI
from gemma_export.cli.build import build as build_command
from gemma_export.cli.main import main
from gemma_export.dev import random_checkpoint
from tests.support.bench import TINY_DECODER

DECODER, EMBEDDER = "tiny-gemma3", "tiny-embeddinggemma"
TINY_EMBEDDING = {**random_checkpoint.TINY_CONFIGS["gemma3_text"], "use_bidirectional_attention": True}
ROW_KEYS = {"system", "precision", "batch", "prompt_tokens", "new_tokens", "runs", "first_token_s", "prefill_tok_s",
            "decode_tok_s", "peak_rss_bytes", "end_rss_bytes", "state_bytes", "samples", "prefill_ratio",
            "decode_ratio", "same_tokens"}  # fmt: skip
RESULT_KEYS = {"ok", "task", "model", "config", "precision", "threads", "repeat", "systems", "rows", "notes", "build"}


@pytest.fixture(autouse=True)
def tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(random_checkpoint.PUBLISHED_CONFIGS, DECODER, TINY_DECODER)
    monkeypatch.setitem(random_checkpoint.PUBLISHED_CONFIGS, EMBEDDER, TINY_EMBEDDING)
    monkeypatch.setattr(bench, "MIN_CELL_SECONDS", 0.05)  # a test measures that the numbers exist, not speed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


def _bench(capsys: pytest.CaptureFixture[str], workdir: Path, *args: str) -> dict:
    assert main(["bench", *args, "--workdir", str(workdir), "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["threads"] == 1
    return result


def _stored_fp32_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*.safetensors"):
        with safe_open(path, "np") as f:
            names = f.keys()  # a safe_open handle is not iterable
            total += sum(4 * int(np.prod(f.get_slice(k).get_shape())) for k in names)
    return total


def test_decoder_bench_compares_every_system(capsys, workdir: Path) -> None:
    args = ("--random", DECODER, "--batch-sizes", "1,2", "--prompt-tokens", "5", "--new-tokens", "4")
    result = _bench(capsys, workdir, *args)
    assert set(result) == RESULT_KEYS and result["task"] == "generation" and result["repeat"] == 1
    others = ["transformers", *([GENAI] if bench.genai_installed() else [])]
    assert result["systems"] == ["gemma-export", *others]
    missing = f"{GENAI}: skipped: onnxruntime_genai is not installed (pip install onnxruntime-genai)"
    assert result["notes"] == ([] if bench.genai_installed() else [missing])
    rows = {(r["system"], r["batch"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((s, b) for s in result["systems"] for b in (1, 2))
    for (system, batch), row in rows.items():
        assert "error" not in row, row
        assert set(row) == ROW_KEYS and row["precision"] == "fp32" and row["runs"] == 1
        assert (row["prompt_tokens"], row["new_tokens"]) == (5, 4)
        # The figures are what the documented formulas make of the measured times.
        assert row["prefill_tok_s"] == pytest.approx(batch * 5 / row["first_token_s"], rel=2e-3)
        assert row["decode_tok_s"] == statistics.median(row["samples"]["decode_tok_s"]) > 0
        assert row["samples"]["first_token_s"] == [row["first_token_s"]]
        ours = rows["gemma-export", batch]
        assert row["prefill_ratio"] == pytest.approx(ours["prefill_tok_s"] / row["prefill_tok_s"], rel=2e-3)
        assert row["decode_ratio"] == pytest.approx(ours["decode_tok_s"] / row["decode_tok_s"], rel=2e-3)
        # The same model computed by each system: the same greedy tokens (genai: through our builder shim).
        assert row["same_tokens"] == 4
        assert row["peak_rss_bytes"] > 10 << 20
        assert 10 << 20 < row["end_rss_bytes"] <= row["peak_rss_bytes"]  # after the run, within its peak
        assert (row["state_bytes"] is None) == (system == GENAI)
    assert rows["gemma-export", 1]["state_bytes"] * 2 == rows["gemma-export", 2]["state_bytes"]

    # The build was measured in its own process, beside the weights' fp32 bytes.
    build = result["build"]
    checkpoint = workdir / DECODER / "checkpoint"
    assert build["fp32_weight_bytes"] == _stored_fp32_bytes(checkpoint)
    assert build["rss_over_fp32_weights"] == pytest.approx(build["peak_rss_bytes"] / build["fp32_weight_bytes"], 1e-3)
    assert build["peak_rss_bytes"] > 10 << 20 and not build["cached"]


def test_reruns_reuse_the_builds(capsys, workdir: Path) -> None:
    """Our artifact and genai's model of the checkpoint are built once per workdir (any order of the tests)."""
    if not bench.genai_installed():
        pytest.skip("onnxruntime-genai is not installed")
    args = ("--random", DECODER, "--prompt-tokens", "3", "--new-tokens", "2", "--systems", "genai")
    first = _bench(capsys, workdir, *args)
    genai_config = next((workdir / "genai").glob("*/fp32*/genai_config.json"))
    artifact = workdir / DECODER / "artifact" / "manifest.json"
    stamps = genai_config.stat().st_mtime_ns, artifact.stat().st_mtime_ns
    again = _bench(capsys, workdir, *args)
    assert (genai_config.stat().st_mtime_ns, artifact.stat().st_mtime_ns) == stamps
    assert again["build"]["cached"] and again["build"]["peak_rss_bytes"] == first["build"]["peak_rss_bytes"]
    assert [r["system"] for r in again["rows"]] == ["gemma-export", GENAI]
    assert len(list((workdir / "genai").iterdir())) == 1  # one checkpoint key
    rebuilt = _bench(capsys, workdir, "--rebuild", "--no-compare", *args[:-2])
    assert not rebuilt["build"]["cached"] and artifact.stat().st_mtime_ns != stamps[1]


def test_quantized_artifact_is_compared_at_its_precision(capsys, workdir: Path) -> None:
    """An int4 artifact: onnxruntime-genai's model is built at int4 with our block size and accuracy level."""
    if "quant" not in inspect.signature(build_command).parameters:
        pytest.skip("gemma-export build has no --quant yet")
    if not bench.genai_installed():
        pytest.skip("onnxruntime-genai is not installed")
    args = ("--random", DECODER, "--quant", "int4", "--prompt-tokens", "5", "--new-tokens", "3", "--systems", "genai")
    result = _bench(capsys, workdir, *args)
    manifest = json.loads((workdir / DECODER / "artifact-int4" / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["bits"] == 4 and result["precision"] == f"int4 b{q['block_size']}"
    assert [(r["system"], r["precision"]) for r in result["rows"]] == [("gemma-export", result["precision"]),
                                                                      (GENAI, result["precision"])]  # fmt: skip
    assert all("error" not in r and r["decode_tok_s"] > 0 for r in result["rows"]), result["rows"]
    built = {p.name for p in (workdir / "genai").glob("*/int4*")}
    assert built == {f"int4-block_size{q['block_size']}-accuracy_level{q['accuracy_level']}"}
    assert "--quant int4" in result["build"]["command"]


def test_missing_genai_is_reported(capsys, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "genai_installed", lambda: False)
    args = ("--random", DECODER, "--prompt-tokens", "3", "--new-tokens", "2", "--systems", "genai")
    assert main(["bench", *args, "--workdir", str(workdir), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{GENAI}: skipped: onnxruntime_genai is not installed (pip install onnxruntime-genai)" in out
    result = _bench(capsys, workdir, *args)
    assert [r["system"] for r in result["rows"]] == ["gemma-export"] and len(result["notes"]) == 1


def test_median_of_runs_and_ratios() -> None:
    """Repeated runs: the median of each time, the largest peak RSS; ratios from the medians."""
    cell = {"batch": 2, "prompt_tokens": 10, "new_tokens": 5}

    def run(prefill: float, decode: float, rss: int) -> dict:
        return {"prefill_s": prefill, "decode_s": decode, "peak_rss_bytes": rss, "state_bytes": 7, "tokens": [1, 2]}

    ours = bench.summarise("gemma-export", "fp32", cell, [run(0.5, 2.0, 3), run(0.1, 1.0, 9), run(0.3, 4.0, 5)])
    theirs = bench.summarise("transformers", "fp32", cell, [run(0.9, 8.0, 1)])
    theirs_tokens = [1, 3]
    theirs["tokens"] = theirs_tokens
    assert ours["first_token_s"] == 0.3 and ours["peak_rss_bytes"] == 9 and ours["runs"] == 3
    assert ours["prefill_tok_s"] == pytest.approx(2 * 10 / 0.3, rel=1e-3)
    assert ours["decode_tok_s"] == pytest.approx(2 * 4 / 2.0, rel=1e-3)
    assert ours["samples"]["first_token_s"] == [0.5, 0.1, 0.3]
    rows = [ours, theirs]
    bench.add_ratios(rows)
    assert theirs["prefill_ratio"] == pytest.approx(ours["prefill_tok_s"] / theirs["prefill_tok_s"], rel=1e-3)
    assert theirs["decode_ratio"] == pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"], rel=1e-3)
    assert ours["prefill_ratio"] == ours["decode_ratio"] == 1.0
    assert (ours["same_tokens"], theirs["same_tokens"]) == (2, 1) and "tokens" not in theirs
    failed = bench.summarise("transformers", "fp32", cell, [{"error": "boom"}])
    assert failed["error"] == "boom" and "decode_tok_s" not in failed


def test_genai_shim_flattens_transformers_5_rope(tmp_path: Path) -> None:
    """transformers 5 nests Gemma 3's rope per layer type; the builder is given the flat form it reads."""
    from transformers import AutoConfig

    random_checkpoint.write_random_checkpoint(tmp_path, random_checkpoint.TINY_CONFIGS["gemma3_text"])
    config = AutoConfig.from_pretrained(tmp_path)
    assert "rope_type" not in config.rope_parameters  # the nested form the builder trips on
    assert genai_builder.flatten_rope(config)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    assert (config.rope_theta, config.rope_local_base_freq) == (1000000.0, 10000.0)
    assert not genai_builder.flatten_rope(config)  # already flat: untouched


def test_embedding_bench(capsys, workdir: Path) -> None:
    args = ("--random", EMBEDDER, "--batch-sizes", "1,2", "--seq-lengths", "8")
    result = _bench(capsys, workdir, *args)
    assert result["task"] == "sentence-embedding" and result["dim"] == 64 and result["notes"] == []
    rows = {(r["system"], r["batch"], r["seq_length"]): r for r in result["rows"]}
    assert sorted(rows) == [(s, b, 8) for s in ("gemma-export", "sentence-transformers") for b in (1, 2)]
    for (system, batch, _), row in rows.items():
        assert "error" not in row, row
        assert row["sentences_s"] > 0 and row["batch_ms"] > 0 and row["repetitions"] >= 1
        assert row["peak_rss_bytes"] > 10 << 20 and row["speedup_vs_this"] > 0
        assert row["sentences_s"] == pytest.approx(batch * 1000 / row["batch_ms"], rel=1e-2)
        if system == "sentence-transformers":  # both systems embedded the same ids to the same vectors
            assert row["max_abs_diff"] <= 1e-5
            assert rows["gemma-export", batch, 8]["speedup_vs_this"] == 1.0

    # The random folder and its artifact were made once, and are reused: no second build.
    folder, artifact = workdir / EMBEDDER / "checkpoint", workdir / EMBEDDER / "artifact"
    assert (folder / "modules.json").is_file() and (folder / "2_Dense" / "model.safetensors").is_file()
    built = (artifact / "manifest.json").stat().st_mtime_ns
    again = _bench(capsys, workdir, "--random", EMBEDDER, "--batch-sizes", "1", "--seq-lengths", "8", "--no-compare")
    assert [r["system"] for r in again["rows"]] == ["gemma-export"]
    assert (artifact / "manifest.json").stat().st_mtime_ns == built
    assert again["build"]["cached"] and again["build"]["fp32_weight_bytes"] == _stored_fp32_bytes(folder)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--random", "gemma-4-1b"], "is not a published size; choose one of: "),
        (["--random", DECODER, "--new-tokens", "1"], "--new-tokens must list counts >= 2"),
        (["--random", DECODER, "--new-tokens", "4,many"], "--new-tokens must be comma-separated integers"),
        (["--random", DECODER, "--prompt-tokens", "128,0"], "--prompt-tokens must list integers >= 1"),
        (["--random", DECODER, "--systems", "vllm"], "--systems: unknown system 'vllm'; choose from: transformers"),
        (["--random", DECODER, "--systems", "genai", "--no-compare"], "--systems and --no-compare contradict"),
        (["--random", DECODER, "--repeat", "0"], "--repeat"),
        (["--quant", "int4"], "--quant applies to --random"),
        (["--random", EMBEDDER, "--batch-sizes", "0"], "--batch-sizes must list integers >= 1"),
        (["--random", EMBEDDER, "--seq-lengths", "8,x"], "--seq-lengths must be comma-separated integers"),
        (["--threads", "-1"], "--threads"),
        ([], "give an ARTIFACT folder or --random NAME"),
    ],
)
def test_bad_input_is_exit_code_2(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    assert main(["bench", *args, "--workdir", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1 and not captured.out
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_bad_random_name_lists_the_embedding_model(capsys, tmp_path: Path) -> None:
    assert main(["bench", "--random", "embeddinggemma-3b", "--workdir", str(tmp_path)]) == 2
    assert "embeddinggemma-300m" in capsys.readouterr().err


def test_too_long_sequence_is_refused(capsys, workdir: Path) -> None:
    """Checked against the artifact's maximum length (reuses the artifacts built above, or builds them)."""
    assert main(["bench", "--random", EMBEDDER, "--seq-lengths", "8,4096", "--workdir", str(workdir)]) == 2
    assert "--seq-lengths 4096 exceeds the model's maximum length of 1024" in capsys.readouterr().err
    args = ["--prompt-tokens", "1000", "--new-tokens", "25"]
    assert main(["bench", "--random", DECODER, *args, "--workdir", str(workdir), "--json"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-tokens 1000 + --new-tokens 25 exceeds the model's maximum length of 1024" in err
