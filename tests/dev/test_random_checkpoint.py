"""Tests of the random checkpoint generator against its two consumers' oracles.

transformers must load every file exactly as it loads a hub checkpoint (no missing, unexpected or
mismatched tensor), and onnxruntime-genai's tokenizer must agree with transformers' on ids and text:
that is what makes these checkpoints stand in for real Gemma weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gemma_export.checkpoint import load
from gemma_export.config.model_config import (
    GEMMA4_LIKE,
    GLOBAL,
    SLIDING,
    GriffinConfig,
    load_config,
    parse_config,
    parse_griffin_config,
)
from gemma_export.dev import random_checkpoint
from gemma_export.dev.random_checkpoint import (
    EMBEDDINGGEMMA_PROMPTS,
    PUBLISHED_CONFIGS,
    SPECIAL_TOKENS,
    TINY_CONFIGS,
    TOKENIZER_VOCAB_SIZE,
    is_embedding_config,
    tensor_specs,
    write_published,
    write_random_checkpoint,
    write_random_embedding_folder,
)
from gemma_export.errors import BadInput
from gemma_export.runtime import embed as embedding
from gemma_export.runtime.generation import load_tokenizer
from gemma_export.runtime.session import left_pad, positions
from gemma_export.verify.reference import TorchDecoder, TorchEncoder
from tests.support import ROOT

transformers = pytest.importorskip("transformers")

MODEL_TYPES = sorted(TINY_CONFIGS)

PROMPT = torch.tensor([[2, 300, 301, 302, 303, 304, 305, 306]])

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading, trailing and  double  spaces ",
    "Ünïcödé, 日本語 and an emoji 🤖!",
    "tabs\tand\nnewlines\r\n",
    "def add(a, b):\n    return a + b",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "literal <0x41> is text, not a byte token",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random_checkpoints")
    return {mt: write_random_checkpoint(root / mt, TINY_CONFIGS[mt]) for mt in MODEL_TYPES}


def _load(path: Path) -> tuple[torch.nn.Module, dict]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def _files(path: Path) -> dict[str, bytes]:
    """Every file under path (recursively), by its relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_transformers_loads_every_tensor(checkpoints: dict[str, Path], model_type: str) -> None:
    model, info = _load(checkpoints[model_type])
    assert type(model).__name__ == TINY_CONFIGS[model_type]["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.tie_word_embeddings
    logits = _logits(model)
    assert logits.shape == (1, PROMPT.shape[1], 512)
    assert torch.isfinite(logits).all()
    # Unit-scale activations: the distribution is neither flat nor saturated.
    assert 0.3 < logits.std().item() < 10


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_configs_keep_each_generations_traits(checkpoints: dict[str, Path], model_type: str) -> None:
    """Both transformers and our own parser read the written config.json as intended."""
    path = checkpoints[model_type]
    ours = load_config(path)
    theirs = transformers.AutoConfig.from_pretrained(path)
    assert ours.model_type == theirs.model_type == model_type
    assert ours.vocab_size == theirs.vocab_size >= TOKENIZER_VOCAB_SIZE
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    if model_type == "gemma":
        assert ours.num_key_value_heads == 1 and ours.sliding_window == 0
    if model_type == "gemma2":
        assert ours.layer_types == tuple(theirs.layer_types) == (SLIDING, GLOBAL) * 3
        assert (ours.attn_logit_softcapping, ours.final_logit_softcapping) == (50.0, 30.0)
        assert ours.query_pre_attn_scalar != ours.head_dim
    if model_type == "gemma3_text":
        assert ours.layer_types == tuple(theirs.layer_types) == (SLIDING,) * 5 + (GLOBAL,)
        assert ours.rope[GLOBAL].factor == theirs.rope_parameters[GLOBAL]["factor"] == 8.0
        assert ours.rope[SLIDING].theta == 10000.0 and ours.rope[GLOBAL].theta == 1e6
        assert ours.family.qk_norm
    if model_type == "recurrent_gemma":
        assert ours.block_types == ("recurrent", "recurrent", "attention") * 2
        assert theirs.layers_block_type == ["linear_attention", "linear_attention", "sliding_attention"] * 2
        assert ours.attention_window_size == theirs.attention_window_size == 8
        assert (
            (ours.num_key_value_heads, ours.lru_width, ours.head_dim)
            == (1, 64, 16)
            == (
                theirs.num_key_value_heads,
                theirs.lru_width,
                theirs.head_dim,
            )
        )
        assert ours.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"] == 0.5


def test_recurrent_gemma_matches_transformers(checkpoints: dict[str, Path]) -> None:
    """Our loader reads the RecurrentGemma checkpoint as transformers does (same logits), and the RG-LRU
    decays are in the trained range: a = exp(-softplus(recurrent_param)) in [0.9, 0.999]."""
    path = checkpoints["recurrent_gemma"]
    hf, _ = _load(path)
    cfg, model = load.load_model(path)
    assert isinstance(cfg, GriffinConfig)
    mask = np.ones(PROMPT.shape, np.int64)
    decoder = TorchDecoder(model)
    ours, _ = decoder.step(PROMPT.numpy(), mask, positions(mask), decoder.empty_cache(1))
    assert np.abs(ours - _logits(hf).numpy()).max() < 1e-4

    a = torch.exp(-torch.nn.functional.softplus(hf.model.layers[0].temporal_block.rg_lru.recurrent_param))
    assert a.min().item() >= 0.9 - 1e-6 and a.max().item() <= 0.999 + 1e-6 and a.std().item() > 0.01
    biases = [p for name, p in hf.named_parameters() if name.endswith("bias")]
    assert biases and all(0 < p.abs().max().item() < 0.2 for p in biases)  # small, but there to be exported


@pytest.mark.parametrize("model_type", ["gemma3_text", "recurrent_gemma"])
def test_same_seed_same_bytes_in_another_process(checkpoints: dict[str, Path], tmp_path: Path, model_type: str) -> None:
    """Byte-identical files from a fresh interpreter with another hash seed; another seed changes weights."""
    again = tmp_path / "again"
    code = (
        "import sys; from pathlib import Path; from gemma_export.dev.random_checkpoint import *; "
        "write_random_checkpoint(Path(sys.argv[1]), TINY_CONFIGS[sys.argv[2]])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(again), model_type], check=True, env=env, timeout=120)
    assert _files(again) == _files(checkpoints[model_type])

    other = write_random_checkpoint(tmp_path / "other", TINY_CONFIGS[model_type], seed=1)
    a, b = _files(other), _files(again)
    assert a.pop("model.safetensors") != b.pop("model.safetensors")
    assert a == b  # config and tokenizer do not depend on the seed


def test_sharded_bfloat16_holds_the_same_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = write_random_checkpoint(
        tmp_path / "sharded", TINY_CONFIGS["gemma3_text"], dtype="bfloat16", max_shard_bytes=100_000
    )
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))

    single = checkpoints["gemma3_text"] / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        reference = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    sharded: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                assert index["weight_map"][name] == shard
                sharded[name] = f.get_tensor(name)
    assert sharded.keys() == reference.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in sharded.values())
    for name, tensor in sharded.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name

    model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(_logits(model)).all()

    # Rewriting unsharded into the same folder leaves no stale shard or index behind.
    write_random_checkpoint(out, TINY_CONFIGS["gemma3_text"])
    assert _files(out) == _files(checkpoints["gemma3_text"])


def test_untied_embeddings_store_lm_head(tmp_path: Path) -> None:
    config = {**TINY_CONFIGS["gemma"], "tie_word_embeddings": False}
    model, info = _load(write_random_checkpoint(tmp_path, config))
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    ("change", "kwargs", "match"),
    [
        ({"model_type": "gemma3"}, {}, "text-only"),
        ({"vocab_size": 256}, {}, "vocab_size 256"),
        ({"model_type": "llama"}, {}, "unsupported model_type"),
        ({}, {"dtype": "float16"}, "dtype 'float16'"),
        ({}, {"max_shard_bytes": 0}, "max_shard_bytes"),
    ],
)
def test_rejects_what_it_cannot_write(tmp_path: Path, change: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        write_random_checkpoint(tmp_path, {**TINY_CONFIGS["gemma"], **change}, **kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_configs_match_transformers(name: str) -> None:
    """Each published config means the same architecture to us and to transformers, and the tensors written
    for it are exactly those of transformers' model of that size (built on the meta device: no memory)."""
    raw = PUBLISHED_CONFIGS[name]
    theirs = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    assert theirs.model_type == raw["model_type"]
    if raw["model_type"] == "recurrent_gemma":
        ours = parse_griffin_config(raw)
        assert list(ours.block_types) == [
            "recurrent" if t == "linear_attention" else "attention" for t in theirs.layers_block_type
        ]
        fields = ["lru_width", "attention_window_size", "conv1d_width", "logits_soft_cap"]
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
        assert ours.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"]
    else:
        ours = parse_config(raw)
        # Gemma 1's transformers config has no layer types, scalar or caps: every layer global, head_dim scaling.
        layer_types = getattr(theirs, "layer_types", None) or [GLOBAL] * ours.num_hidden_layers
        assert ours.layer_types == tuple(layer_types)
        if raw["model_type"] in GEMMA4_LIKE:  # scores unscaled; per-layer head dims and KV heads
            assert ours.attention_scale == 1.0
            per_layer = theirs.per_layer_config
            assert list(ours.layer_head_dims) == [c.head_dim for c in per_layer]
            assert list(ours.layer_kv_heads) == [c.num_key_value_heads for c in per_layer]
        else:
            assert ours.attention_scale == getattr(theirs, "query_pre_attn_scalar", theirs.head_dim) ** -0.5
        radius = raw["model_type"] == "embedding_gemma2_text"  # its window a radius: |i - j| <= sliding_window
        assert ours.sliding_window == (theirs.sliding_window + radius if SLIDING in layer_types else 0)
        caps = [getattr(theirs, f"{c}_logit_softcapping", None) or 0.0 for c in ("attn", "final")]
        assert [ours.attn_logit_softcapping, ours.final_logit_softcapping] == caps
        rope = theirs.rope_parameters
        for kind in (SLIDING, GLOBAL):
            params = rope.get(kind, rope)
            assert (ours.rope[kind].theta, ours.rope[kind].factor) == (params["rope_theta"], params.get("factor", 1))
            assert ours.rope[kind].fraction == params.get("partial_rotary_factor", 1.0)
        fields = ["max_position_embeddings"]
    fields += ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    if raw["model_type"] not in GEMMA4_LIKE:  # per layer on Gemma 4 (compared above)
        fields += ["num_key_value_heads", "head_dim"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}

    # a bare Gemma3TextModel / EmbeddingGemma2TextModel: AutoModel, tensors without "model."
    embedder = is_embedding_config(raw) or raw["model_type"] == "embedding_gemma2_text"
    with torch.device("meta"):
        auto = transformers.AutoModel if embedder else transformers.AutoModelForCausalLM
        model = auto.from_config(theirs)
    assert type(model).__name__ == raw["architectures"][0]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    specs = [(n.removeprefix("model.") if embedder else n, s, i) for n, s, i in tensor_specs(ours)]
    assert [(n, s) for n, s, _ in specs] == list(expected.items())  # same names, shapes and order
    assert sum(math.prod(s) for _, s, _ in specs) == sum(math.prod(s) for s in expected.values())


def test_write_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_published writes a hub-like sharded checkpoint (checked on a tiny stand-in: the real sizes
    are gigabytes) and names the known models when asked for another."""
    monkeypatch.setitem(random_checkpoint.PUBLISHED_CONFIGS, "tiny", TINY_CONFIGS["recurrent_gemma"])
    out = write_published(tmp_path / "tiny", "tiny", seed=3)
    assert (out / "model-00001-of-00001.safetensors").is_file() and (out / "model.safetensors.index.json").is_file()
    same = write_random_checkpoint(tmp_path / "same", TINY_CONFIGS["recurrent_gemma"], seed=3, max_shard_bytes=2**31)
    assert _files(out) == _files(same)
    with pytest.raises(BadInput, match="known: codegemma-7b, embeddinggemma-2, embeddinggemma-300m, gemma-2-27b"):
        write_published(tmp_path / "x", "gemma-4-1b")


def test_tokenizer_parity_with_onnxruntime_genai(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    src = checkpoints["gemma"]
    hf = transformers.AutoTokenizer.from_pretrained(src)
    assert type(hf).__name__ == "GemmaTokenizer" and len(hf) == TOKENIZER_VOCAB_SIZE
    assert [hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.padding_side == "left"

    # onnxruntime-genai makes a tokenizer from a model folder; it needs genai_config.json, not an ONNX file.
    folder = tmp_path / "genai"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    (folder / "genai_config.json").write_text(json.dumps(_genai_config(TINY_CONFIGS["gemma"])))
    plain = og.Tokenizer(str(folder))  # encode() adds no special tokens by default in onnxruntime-genai
    with_bos = og.Tokenizer(str(folder))
    with_bos.update_options(add_special_tokens="true")
    assert (plain.bos_token_id, plain.pad_token_id, list(plain.eos_token_ids)) == (2, 0, [1])

    for text in SENTENCES:
        ids = hf(text)["input_ids"]
        assert ids[0] == 2 and all(i < TOKENIZER_VOCAB_SIZE for i in ids)
        assert [int(i) for i in with_bos.encode(text)] == ids, text
        assert [int(i) for i in plain.encode(text)] == hf(text, add_special_tokens=False)["input_ids"], text
        if "<start_of_turn>" not in text:
            assert hf.decode(ids, skip_special_tokens=True) == plain.decode(ids) == text

    messages = [{"role": "user", "content": "Hi there"}]
    expected = "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert plain.apply_chat_template(json.dumps(messages), add_generation_prompt=True) == expected


def _genai_config(config: dict) -> dict:
    """The least genai_config.json that onnxruntime-genai 0.18 accepts to build a tokenizer."""
    return {
        "model": {
            "type": config["model_type"],
            "vocab_size": config["vocab_size"],
            "context_length": config["max_position_embeddings"],
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "decoder": {
                "filename": "model.onnx",  # never opened for a tokenizer
                "head_size": config["head_dim"],
                "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"],
                "num_hidden_layers": config["num_hidden_layers"],
                "num_key_value_heads": config["num_key_value_heads"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                "outputs": {"logits": "logits"},
            },
        },
        "search": {"do_sample": False, "max_length": config["max_position_embeddings"], "num_beams": 1},
    }


# ---------------------------------------------------------------------------------------------------------
# EmbeddingGemma folders
# ---------------------------------------------------------------------------------------------------------

TINY_EMBEDDING = {**TINY_CONFIGS["gemma3_text"], "use_bidirectional_attention": True}
EMBEDDING_TEXTS = [
    "hello world",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 6),  # > 2x the bidirectional window (9)
    "a short one",
]
ST_MODULES = ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]


@pytest.fixture(scope="module")
def embedding_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_embedding_folder(tmp_path_factory.mktemp("embedding") / "st", TINY_EMBEDDING, dense=(256,))


@pytest.fixture(scope="module")
def st_model(embedding_folder: Path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(embedding_folder), device="cpu")


def _ours(folder: Path, texts: list[str], prompt: str) -> np.ndarray:
    _, head, model = load.load_embedding(folder)
    ids = embedding.tokenize(load_tokenizer(folder), texts, prompt, head.max_seq_length)
    return TorchEncoder(model).embed(*left_pad(ids, 0))[0]


@pytest.mark.parametrize("task", ["query", "document", None])
def test_embedding_folder_agrees_with_sentence_transformers(embedding_folder: Path, st_model, task) -> None:
    """sentence-transformers loads the folder as the EmbeddingGemma pipeline it describes, and our loader
    reads the same model from it: same embeddings, task prompts applied alike."""
    assert [type(m).__name__ for m in st_model] == ST_MODULES
    assert st_model.prompts == EMBEDDINGGEMMA_PROMPTS and st_model.default_prompt_name is None
    assert st_model.max_seq_length == 1024 and st_model.similarity_fn_name == "cosine"
    assert [(m.in_features, m.out_features) for m in (st_model[2], st_model[3])] == [(64, 256), (256, 64)]
    assert st_model[0].auto_model.config.use_bidirectional_attention
    expected = st_model.encode(EMBEDDING_TEXTS, prompt_name=task, normalize_embeddings=True)
    got = _ours(embedding_folder, EMBEDDING_TEXTS, EMBEDDINGGEMMA_PROMPTS[task] if task else "")
    assert got.shape == (len(EMBEDDING_TEXTS), 64)
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(expected[0] - expected[2]).max() > 1e-2  # not a degenerate model: inputs matter


def test_embedding_folder_is_what_sentence_transformers_writes(embedding_folder: Path, st_model, tmp_path) -> None:
    """Saving the loaded model again with sentence-transformers 6.2 gives the same module files, and the
    backbone loads in transformers' AutoModel with every tensor used."""
    st_model.save(str(tmp_path))

    def read(folder: Path, name: str) -> object:
        return json.loads((folder / name).read_text())

    for name in ["modules.json", "1_Pooling/config.json", "2_Dense/config.json", "3_Dense/config.json",
                 "4_Normalize/config.json"]:  # fmt: skip
        assert read(embedding_folder, name) == read(tmp_path, name), name
    theirs = read(tmp_path, "config_sentence_transformers.json")
    theirs.pop("__version__")  # which versions wrote the file: not written (see the config.json convention)
    assert read(embedding_folder, "config_sentence_transformers.json") == theirs
    ours = read(embedding_folder, "sentence_bert_config.json")
    # sentence-transformers 6 keeps max_seq_length in the tokenizer; the hub's files (and our reader) have it here
    assert {k: v for k, v in ours.items() if k not in ("max_seq_length", "do_lower_case")} == read(
        tmp_path, "sentence_bert_config.json"
    )
    assert ours["max_seq_length"] == read(tmp_path, "tokenizer_config.json")["model_max_length"] == 1024
    tokenizer_config = read(embedding_folder, "tokenizer_config.json")
    assert "chat_template" not in tokenizer_config and not (embedding_folder / "chat_template.jinja").exists()
    for dense in ("2_Dense", "3_Dense"):
        with safe_open(str(embedding_folder / dense / "model.safetensors"), framework="pt") as f:
            assert list(f.keys()) == ["linear.weight"]

    model, info = transformers.AutoModel.from_pretrained(embedding_folder, output_loading_info=True)
    assert type(model).__name__ == "Gemma3TextModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert json.loads((embedding_folder / "config.json").read_text())["architectures"] == ["Gemma3TextModel"]


def test_embedding_folder_same_seed_same_bytes(embedding_folder: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    code = (
        "import sys; from pathlib import Path; from gemma_export.dev.random_checkpoint import *; "
        "write_random_embedding_folder(Path(sys.argv[1]), {**TINY_CONFIGS['gemma3_text'], "
        "'use_bidirectional_attention': True}, dense=(256,))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(again)], check=True, env=env, timeout=120)
    assert _files(again) == _files(embedding_folder)

    other = _files(write_random_embedding_folder(tmp_path / "other", TINY_EMBEDDING, dense=(256,), seed=1))
    same = _files(again)
    for weights in ("model.safetensors", "2_Dense/model.safetensors", "3_Dense/model.safetensors"):
        assert other.pop(weights) != same.pop(weights), weights
    assert other == same  # configs and tokenizer do not depend on the seed


def test_embeddinggemma_300m_config() -> None:
    """The published backbone and head: sizes as the hub's folder, ~300M parameters, written as an embedding
    folder by write_published."""
    raw = PUBLISHED_CONFIGS["embeddinggemma-300m"]
    assert is_embedding_config(raw) and raw["architectures"] == ["Gemma3TextModel"]
    cfg = parse_config(raw)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (768, 1152, 24)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (3, 1, 256, 262144)
    assert cfg.sliding_window == 512 // 2 + 1 and cfg.max_position_embeddings == 2048
    assert cfg.layer_types == ((SLIDING,) * 5 + (GLOBAL,)) * 4
    assert cfg.rope[SLIDING].theta == 10000.0 and cfg.rope[GLOBAL].theta == 1e6
    backbone = sum(math.prod(s) for _, s, _ in tensor_specs(cfg))
    head = 2 * 768 * 3072
    assert 300e6 < backbone + head < 310e6
    assert random_checkpoint.EMBEDDINGGEMMA_HEAD["dense"] == (3072,)
    assert EMBEDDINGGEMMA_PROMPTS["query"] == "task: search result | query: " and len(EMBEDDINGGEMMA_PROMPTS) == 14


def test_write_published_embedding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(random_checkpoint.PUBLISHED_CONFIGS, "tiny-embedding", TINY_EMBEDDING)
    out = write_published(tmp_path / "published", "tiny-embedding", seed=2)
    assert _files(out) == _files(write_random_embedding_folder(tmp_path / "direct", TINY_EMBEDDING, seed=2))
    assert json.loads((out / "3_Dense" / "config.json").read_text())["in_features"] == 3072


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        (TINY_CONFIGS["gemma3_text"], {}, "use_bidirectional_attention: true"),
        ({**TINY_CONFIGS["gemma2"], "use_bidirectional_attention": True}, {}, "gemma3_text backbone"),
        (TINY_EMBEDDING, {"dense": (0,)}, "positive integer widths"),
        (TINY_EMBEDDING, {"max_seq_length": 4096}, "max_seq_length must be between 1 and 1024"),
        (TINY_EMBEDDING, {"dtype": "float16"}, "dtype 'float16'"),
    ],
)
def test_embedding_folder_rejects(tmp_path: Path, config: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        write_random_embedding_folder(tmp_path, config, **kwargs)
