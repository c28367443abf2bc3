"""C++ (gemma-run) and Java (ai.gemma.runtime.Generate) against the Python client: the same JSON, byte for byte,
greedy and sampled, for every decoder kind (Gemma 1, 2, 3, a windowed cache, RecurrentGemma), on a left-padded
batch whose longest prompt runs past the sliding window; the last step's logits bit-identical with one thread;
EmbeddingGemma's embeddings equal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma_export.manifest import Manifest
from gemma_export.runtime import embed as python_embed
from gemma_export.runtime.generation import load_tokenizer
from gemma_export.runtime.session import GREEDY, OrtDecoder, OrtEncoder, Sampling, generate, left_pad
from tests.support.cli import run

# A left-padded batch: the first prompt is longer than twice every tiny window (8 or 16), the others shorter.
PROMPTS = [
    " ".join(["the quick brown fox jumps over the lazy dog"] * 5) + " and then",
    "hello world",
    "<start_of_turn>user\nWhat is 2 + 2? 😀<end_of_turn>\n<start_of_turn>model\n",
]
SAMPLINGS = {
    "greedy": [],
    "temperature": ["--temperature", "0.9", "--seed", "7"],
    "top-k-top-p": ["--temperature", "1.3", "--top-k", "40", "--top-p", "0.9", "--seed", "123"],
}


def args(artifact, sampling: str) -> list[str]:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return [str(artifact), *prompts, "--max-new-tokens", "24", "--threads", "1", "--json", *SAMPLINGS[sampling]]


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
def test_cpp_and_java_print_what_python_prints(cpp_runtime, decoder_artifact, capsys, sampling) -> None:
    kind, artifact = decoder_artifact
    code, python_out, err = run(capsys, "generate", *args(artifact, sampling))
    assert code == 0, err
    lengths = [len(o["prompt_ids"]) for o in json.loads(python_out)["outputs"]]
    assert max(lengths) > 32 > min(lengths), lengths  # past the windows, and padded
    cpp = cpp_runtime.run(*args(artifact, sampling))
    assert cpp.returncode == 0, cpp.stderr
    assert cpp.stdout == python_out, kind
    if kind == "gemma3_text" or sampling == "top-k-top-p":  # Java: every kind once, every sampling on Gemma 3
        java = cpp_runtime.java(*args(artifact, sampling))
        assert java.returncode == 0, java.stderr
        assert java.stdout == python_out, kind


def test_last_logits_are_bit_identical(cpp_runtime, decoder_artifact, tmp_path) -> None:
    """One thread on both sides: the same kernels on the same inputs in the same order give the same bits."""
    kind, artifact = decoder_artifact
    manifest = Manifest.read(artifact)
    tokenizer = load_tokenizer(artifact)
    batch = [enc.ids for enc in tokenizer.encode_batch(PROMPTS)]
    decoder = OrtDecoder(artifact, manifest, threads=1)
    seen: list[np.ndarray] = []
    step = decoder.step

    def recording(*a, **k):
        logits, cache = step(*a, **k)
        seen.append(logits[:, -1].copy())
        return logits, cache

    decoder.step = recording
    cfg = manifest.model.config
    generate(decoder, batch, 16, eos_ids=cfg.eos_token_ids, pad_id=cfg.pad_token_id, sampling=GREEDY)

    dump = tmp_path / "logits.f32"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    cpp = cpp_runtime.run(artifact, *prompts, "--max-new-tokens", "16", "--threads", "1", "--dump-logits", dump)
    assert cpp.returncode == 0, cpp.stderr
    ours = np.fromfile(dump, np.float32).reshape(len(PROMPTS), cfg.vocab_size)
    np.testing.assert_array_equal(ours, seen[-1], err_msg=kind)  # the logits the last tokens were picked from
    assert np.abs(ours).max() > 0


def test_embeddings_are_equal(cpp_runtime, embedding_artifact, capsys) -> None:
    texts = ["hello world", " ".join(["the quick brown fox jumps over the lazy dog"] * 6), "émoji 😀 中文"]
    argv = [a for t in texts for a in ("--text", t)]
    cpp = cpp_runtime.run("embed", embedding_artifact, *argv, "--threads", "1", "--json")
    assert cpp.returncode == 0, cpp.stderr
    ours = json.loads(cpp.stdout)
    code, out, err = run(capsys, "embed", embedding_artifact, *argv, "--threads", "1", "--json")
    assert code == 0, err
    theirs = json.loads(out)
    assert {k: v for k, v in ours.items() if k != "outputs"} == {k: v for k, v in theirs.items() if k != "outputs"}
    assert [(o["text"], o["tokens"]) for o in ours["outputs"]] == [(o["text"], o["tokens"]) for o in theirs["outputs"]]

    # The unrounded embeddings: the encoder on the same ids, in Python, one thread
    manifest = Manifest.read(embedding_artifact)
    tokenizer = load_tokenizer(embedding_artifact)
    batch = python_embed.tokenize(tokenizer, texts, theirs["prompt"], manifest.build.max_length)
    ids, mask = left_pad(batch, manifest.model.config.pad_token_id)
    expected, _ = OrtEncoder(embedding_artifact, manifest, threads=1).embed(ids, mask)
    got = np.array([o["embedding"] for o in ours["outputs"]], np.float32)
    np.testing.assert_array_equal(got, expected)


def test_sampling_depends_on_the_seed(cpp_runtime, gemma3_artifact) -> None:
    """The cross-language equality above would hold for a sampler that ignored its seed: it does not."""
    artifact = gemma3_artifact
    outs = set()
    for seed in range(4):
        done = cpp_runtime.run(artifact, "--token-ids", "2,10,11", "--temperature", "2", "--seed", seed, "--json")
        assert done.returncode == 0, done.stderr
        outs.add(tuple(json.loads(done.stdout)["outputs"][0]["new_ids"]))
    assert len(outs) > 1
    assert Sampling(temperature=2, seed=1) != Sampling(temperature=2, seed=2)
