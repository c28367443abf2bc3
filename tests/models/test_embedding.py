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


# ---- EmbeddingGemma 2: a Gemma 4-style encoder (transformers' EmbeddingGemma2TextModel as the oracle) --------

EG2_RADIUS, EG2_DIM = 4, 48  # |i - j| <= 4 on local layers; token states projected 64 -> 48


@pytest.fixture(scope="module")
def eg2_folder(tmp_path_factory) -> Path:
    """A tiny EmbeddingGemma 2 text checkpoint: 6 layers (5 local : 1 global, global head_dim 32 with 1 KV head),
    projection-only per-layer embeddings, an embedding projection, Gemma 4's w-scaled norms drawn around 1."""
    import transformers

    from tests.support import gemma4

    config = transformers.EmbeddingGemma2TextConfig(
        vocab_size=512, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        sliding_window=EG2_RADIUS, hidden_size_per_layer_input=8, embedding_dim=EG2_DIM, max_position_embeddings=1024,
    )  # fmt: skip
    model = transformers.AutoModel.from_config(config).eval()
    gemma4.randomize(model)
    folder = tmp_path_factory.mktemp("embeddinggemma2")
    model.save_pretrained(folder)
    random_checkpoint.write_tokenizer(folder)
    return folder


def _eg2_batch() -> tuple[np.ndarray, np.ndarray]:
    from gemma_export.runtime.session import left_pad

    rng = np.random.default_rng(0)
    prompts = [[2, *rng.integers(4, 512, 23).tolist()], [2, 5, 6, 7], [2, *rng.integers(4, 512, 9).tolist()]]
    assert len(prompts[0]) > 2 * 2 * (EG2_RADIUS + 1)  # past twice the window, both ways
    return left_pad(prompts, 0)


def _eg2_expected(folder: Path, ids: np.ndarray, mask: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' token states, then the model card's head: mean pooling, normalisation (Matryoshka: cut, again)."""
    import transformers

    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    m = mask[:, :, None].astype(np.float32)
    e = (tokens * m).sum(1) / m.sum(1)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    e = e[:, :dim] / np.linalg.norm(e[:, :dim], axis=-1, keepdims=True)
    return e, tokens


def _eg2_ours(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        e, tokens = model(torch.from_numpy(ids), torch.from_numpy(mask))
    return e.numpy(), tokens.numpy()


def test_embeddinggemma2_reference_matches_transformers(eg2_folder) -> None:
    cfg, head, model = load.load_embedding(eg2_folder)
    assert cfg.model_type == "embedding_gemma2_text" and cfg.sliding_window == EG2_RADIUS + 1
    assert head.normalize and not head.dense and model.dim == EG2_DIM
    ids, mask = _eg2_batch()
    expected, tokens = _eg2_expected(eg2_folder, ids, mask, EG2_DIM)
    got, got_tokens = _eg2_ours(model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got_tokens[real] - tokens[real]).max() <= 1e-4
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("trait", ["window-halved", "no-per-layer-embeddings", "final-norm-weight-ignored"])
def test_embeddinggemma2_traits_matter(eg2_folder, trait) -> None:
    """The window is a radius (not Gemma 3's width // 2 + 1), the per-layer embeddings count, and the projection
    uses the final norm's weight: a variant without each misses transformers by far more than the tolerance."""
    import dataclasses

    from gemma_export.models.embedding import EmbeddingGemma

    cfg, head, model = load.load_embedding(eg2_folder)
    ids, mask = _eg2_batch()
    expected, _ = _eg2_expected(eg2_folder, ids, mask, EG2_DIM)
    if trait == "window-halved":
        variant = EmbeddingGemma(dataclasses.replace(cfg, sliding_window=EG2_RADIUS // 2 + 1), head, EG2_DIM)
        variant.load_state_dict(model.state_dict())
    else:
        import copy

        variant = copy.deepcopy(model)
        if trait == "no-per-layer-embeddings":
            for layer in variant.backbone.layers:
                layer.per_layer_input = None
        else:
            variant.backbone.norm.weight.data.fill_(1.0)
    assert np.abs(_eg2_ours(variant, ids, mask)[0] - expected).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dim", [EG2_DIM, 16])
def test_embeddinggemma2_artifact_matches_transformers(eg2_folder, tmp_path, dim) -> None:
    from gemma_export.runtime.session import OrtEncoder

    out = tmp_path / f"eg2-{dim}"
    build(eg2_folder, out, BuildOptions(dim=dim), Stages(quiet=True))
    manifest = Manifest.read(out)
    assert manifest.model.task == "sentence-embedding" and manifest.model.dim == dim and manifest.parity.passed
    ids, mask = _eg2_batch()
    expected, _ = _eg2_expected(eg2_folder, ids, mask, dim)
    got, _ = OrtEncoder(out, manifest).embed(ids, mask)
    assert got.shape == (3, dim) and np.abs(got - expected).max() <= 1e-5


def test_embeddinggemma2_random_checkpoint_is_what_transformers_loads(eg2_folder, tmp_path) -> None:
    """random_checkpoint (what `--recipe embeddinggemma-2 --random` builds) writes EmbeddingGemma 2 folders that
    transformers' EmbeddingGemma2TextModel loads tensor for tensor, with the same token states as ours."""
    import json

    import transformers

    config = json.loads((eg2_folder / "config.json").read_text())
    folder = random_checkpoint.write_random_checkpoint(tmp_path, config)
    hf, info = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert type(hf).__name__ == "EmbeddingGemma2TextModel"
    _, _, model = load.load_embedding(folder)
    ids, mask = _eg2_batch()
    with torch.no_grad():
        tokens = hf.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    real = mask.astype(bool)
    assert np.abs(_eg2_ours(model, ids, mask)[1][real] - tokens.numpy()[real]).max() <= 1e-4
