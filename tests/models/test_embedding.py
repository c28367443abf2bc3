"""EmbeddingGemma: the artifact against sentence-transformers' own encode, per --dim and task prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.cli.main import main
from gemma_export.dev import random_checkpoint
from gemma_export.manifest import Manifest
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime import embed as embedding
from tests.support.checkpoints import hf_config

PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
HIDDEN, WINDOW = 64, 16  # tiny gemma3_text: the bidirectional window is 16 // 2 + 1 = 9 keys each way
TEXTS = [
    "hello world",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 6),  # > 2x the bidirectional window
    "a short one",
]


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory) -> Path:
    """A sentence-transformers folder laid out as EmbeddingGemma's: Transformer, Pooling, 2 Dense, Normalize."""
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    root = tmp_path_factory.mktemp("embeddinggemma")
    config = hf_config("gemma3_text", use_bidirectional_attention=True)
    torch.manual_seed(0)
    backbone = transformers.AutoModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(backbone.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.05))
    backbone.save_pretrained(root / "hf")
    random_checkpoint.write_tokenizer(root / "hf")
    _without_chat_template(root / "hf")  # ST 6 routes prompts through a chat template when there is one
    modules = [
        models.Transformer(str(root / "hf")),
        models.Pooling(HIDDEN, pooling_mode="mean"),
        models.Dense(HIDDEN, 4 * HIDDEN, bias=False, activation_function=torch.nn.Identity()),
        models.Dense(4 * HIDDEN, HIDDEN, bias=False, activation_function=torch.nn.Identity()),
        models.Normalize(),
    ]
    with torch.no_grad():
        for dense in modules[2:4]:
            dense.linear.weight.copy_(torch.randn(dense.linear.weight.shape, generator=gen) * 0.1)
    SentenceTransformer(modules=modules, prompts=PROMPTS).save(str(root / "st"))
    return root / "st"


def _without_chat_template(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def st_model(st_folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(st_folder), device="cpu")


@pytest.fixture(scope="module")
def artifacts(st_folder, tmp_path_factory) -> dict[int, Path]:
    out = {}
    for dim in (HIDDEN, 32, 16):
        out[dim] = tmp_path_factory.mktemp("embedding-artifact") / f"dim{dim}"
        build(st_folder, out[dim], BuildOptions(dim=dim), Stages(quiet=True))
    return out


def ours(artifact: Path, texts: list[str], task: str | None) -> np.ndarray:
    result = embedding.run(artifact, texts=texts, task=task)
    return np.array([r["embedding"] for r in result["outputs"]], dtype=np.float32)


@pytest.mark.parametrize("dim", [HIDDEN, 32, 16])
@pytest.mark.parametrize("task", ["query", "document"])
def test_artifact_matches_sentence_transformers(st_model, artifacts, dim, task) -> None:
    expected = st_model.encode(TEXTS, prompt_name=task, truncate_dim=dim, normalize_embeddings=True)
    got = ours(artifacts[dim], TEXTS, task)
    assert got.shape == (len(TEXTS), dim)
    assert np.abs(got - expected).max() <= 1e-5
    cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosine.min() >= 0.99999
    assert np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)  # re-normalised after truncation


def test_longest_row_exceeds_twice_the_bidirectional_window(st_model) -> None:
    lengths = [len(ids) for ids in st_model.tokenize([PROMPTS["query"] + t for t in TEXTS])["attention_mask"]]
    token_counts = [int(sum(m)) for m in st_model.tokenize([PROMPTS["query"] + t for t in TEXTS])["attention_mask"]]
    assert max(token_counts) > 2 * WINDOW and min(token_counts) < max(lengths)  # a padded batch


def test_prompts_matter_and_are_applied(st_model, artifacts) -> None:
    """The task prompt changes the embedding exactly as sentence-transformers' prompt_name does."""
    query, document = ours(artifacts[HIDDEN], TEXTS, "query"), ours(artifacts[HIDDEN], TEXTS, "document")
    assert np.abs(query - document).max() > 1e-2
    plain = st_model.encode(TEXTS, normalize_embeddings=True)
    assert np.abs(ours(artifacts[HIDDEN], TEXTS, None) - plain).max() <= 1e-5


def test_build_records_parity_and_prompts(artifacts, st_folder) -> None:
    manifest = Manifest.read(artifacts[32])
    assert manifest.model.task == "sentence-embedding" and manifest.model.dim == 32
    assert manifest.model.head.prompts == PROMPTS
    parity = manifest.parity
    assert parity.passed and parity.sentence_max_abs_error <= 1e-5
    assert max(parity.prompt_lengths) > 2 * 2 * (WINDOW // 2 + 1)
    outputs = {v.name: v for v in manifest.outputs}
    assert outputs["sentence_embedding"].shape == ["batch", 32]
    assert outputs["token_embeddings"].shape == ["batch", "sequence_length", HIDDEN]
    cfg, _, _ = load.load_embedding(st_folder)
    assert cfg.sliding_window == WINDOW // 2 + 1  # transformers' bidirectional window


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp16"], "'fp16' is refused"),
        (["--dim", "65"], "--dim 65 must be between 1 and 64"),
        (["--quant", "int4"], "--quant int4 applies to decoders"),
    ],
)
def test_bad_build_options(st_folder, tmp_path, capsys, args, message) -> None:
    out = tmp_path / "out"
    assert main(["build", str(st_folder), "-o", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_task_is_refused(artifacts, capsys) -> None:
    assert main(["embed", str(artifacts[HIDDEN]), "--text", "hi", "--task", "poem"]) == 2
    err = capsys.readouterr().err
    assert "not one of this model's prompts: document, query" in err and len(err.strip().splitlines()) == 1


def test_inspect_an_embedding_artifact(artifacts, capsys) -> None:
    assert main(["inspect", str(artifacts[32])]) == 0
    text = capsys.readouterr().out
    assert "sentence_embedding" in text and "dim 32" in text and "prompts document, query" in text
