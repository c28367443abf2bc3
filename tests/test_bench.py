"""`gemma-export bench` end to end on tiny random models, through the command line's --json output.

Each system runs in its own worker process, as in a real run; the tiny models are registered as published
sizes so that `--random` writes and builds them (once, under one workdir) as it does the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma_export import bench, random_checkpoint
from gemma_export.cli import main

DECODER, EMBEDDER = "tiny-gemma3", "tiny-embeddinggemma"
TINY_EMBEDDING = {**random_checkpoint.TINY_CONFIGS["gemma3_text"], "use_bidirectional_attention": True}


@pytest.fixture(autouse=True)
def tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(random_checkpoint.PUBLISHED_CONFIGS, DECODER, random_checkpoint.TINY_CONFIGS["gemma3_text"])
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


def test_decoder_bench(capsys, workdir: Path) -> None:
    result = _bench(capsys, workdir, "--random", DECODER, "--new-tokens", "4,8", "--prompt-tokens", "4")
    assert result["task"] == "generation" and result["prompt_tokens"] == 4
    rows = {(r["system"], r["new_tokens"]): r for r in result["rows"]}
    assert sorted(rows) == [(s, n) for s in ("gemma-export", "transformers") for n in (4, 8)]
    for row in rows.values():
        assert "error" not in row, row
        assert row["decode_tok_s"] > 0 and row["prefill_s"] >= 0 and row["speedup_vs_this"] > 0
        assert row["peak_rss_bytes"] > 10 << 20 and row["state_bytes"] > 0
    assert rows["gemma-export", 8]["state_bytes"] == rows["transformers", 8]["state_bytes"]  # same KV cache


def test_embedding_bench(capsys, workdir: Path) -> None:
    args = ("--random", EMBEDDER, "--batch-sizes", "1,2", "--seq-lengths", "8")
    result = _bench(capsys, workdir, *args)
    assert result["task"] == "sentence-embedding" and result["dim"] == 64
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--random", "gemma-4-1b"], "is not a published size; choose one of: gemma-2b"),
        (["--random", DECODER, "--new-tokens", "1"], "--new-tokens must list counts >= 2"),
        (["--random", DECODER, "--new-tokens", "4,many"], "--new-tokens must be comma-separated integers"),
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
    """Checked against the artifact's maximum length (reuses the artifact built above, or builds it)."""
    assert main(["bench", "--random", EMBEDDER, "--seq-lengths", "8,4096", "--workdir", str(workdir)]) == 2
    assert "--seq-lengths 4096 exceeds the model's maximum length of 1024" in capsys.readouterr().err
