"""Gemma 4 "unified" (the 12B; transformers' gemma4_unified): the Gemma 4 decoder as configuration
(tests/support/gemma4.py's UNIFIED: per_layer_config overrides, k = v, KV sharing, double-wide MLPs), checked
against transformers' Gemma4UnifiedForCausalLM and the text part of Gemma4UnifiedForConditionalGeneration, whose
image-patch and audio-frame embedders a text artifact leaves out (and says so)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.config.model_config import GLOBAL, SLIDING, parse_config
from gemma_export.errors import BadInput
from gemma_export.models.layers import MLP
from gemma_export.runtime.session import generate
from gemma_export.verify.reference import TorchDecoder
from tests.models.test_gemma4 import _error
from tests.support import gemma4
from tests.support.transformers_oracle import hf_greedy, long_and_padded

TOL = 1e-4


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    """(folder, transformers model) of the text-only and the multimodal checkpoint."""
    import transformers

    root = tmp_path_factory.mktemp("gemma4-unified")
    text = gemma4.save_unified(root / "text")
    mm = gemma4.save_unified(root / "multimodal", multimodal=True)
    return {
        "text": (text, transformers.AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32).eval()),
        "multimodal": (mm, transformers.AutoModelForImageTextToText.from_pretrained(mm, dtype=torch.float32).eval()),
    }


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_reference_matches_transformers(unified, kind) -> None:
    folder, hf = unified[kind]
    cfg, model = load.load_model(folder)
    assert cfg.model_type == "gemma4_unified_text"
    assert cfg.source_model_type == ("gemma4_unified" if kind == "multimodal" else "gemma4_unified_text")
    assert _error(hf, model, cfg) <= TOL  # a prompt past 2 x the window and a left-padded batch of 2


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_greedy_tokens_match_transformers_generate(unified, kind) -> None:
    folder, hf = unified[kind]
    cfg, model = load.load_model(folder)
    prompts = long_and_padded(cfg)
    expected = hf_greedy(hf, prompts, 20, cfg.pad_token_id)
    assert generate(TorchDecoder(model), prompts, 20, eos_ids=(), pad_id=cfg.pad_token_id) == expected


def test_config_traits(unified) -> None:
    cfg, _ = load.load_model(unified["text"][0])
    assert [cfg.head_dim_of(i) for i in range(8)] == [16, 16, 16, 32, 16, 16, 16, 32]
    assert [cfg.kv_heads_of(i) for i in range(8)] == [2, 2, 2, 1, 2, 2, 2, 1]
    assert [cfg.kv_source(i) for i in range(8)] == [0, 1, 2, 3, 4, 4, 4, 3]
    assert cfg.use_double_wide_mlp and cfg.attention_k_eq_v and not cfg.use_bidirectional_attention
    assert cfg.hidden_size_per_layer_input == 0 and cfg.num_experts == 0 and cfg.final_logit_softcapping == 0


def test_only_the_multimodal_checkpoint_has_unexported_parts(unified) -> None:
    assert load.unexported_parts(unified["multimodal"][0]) == ["vision", "audio"]
    assert load.unexported_parts(unified["text"][0]) == []


# ---- each new trait matters -------------------------------------------------------------------------------


def _single_wide_mlp(model) -> None:
    """The KV-shared layers' MLP at intermediate_size: the first half of each double-wide projection."""
    inter = model.cfg.intermediate_size
    for i, layer in enumerate(model.layers):
        if model.cfg.produces_kv(i):
            continue
        narrow = MLP(model.cfg.hidden_size, inter, bias=False)
        with torch.no_grad():
            narrow.gate_proj.weight.copy_(layer.mlp.gate_proj.weight[:inter])
            narrow.up_proj.weight.copy_(layer.mlp.up_proj.weight[:inter])
            narrow.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, :inter])
        layer.mlp = narrow


def test_double_wide_mlp_matters(unified) -> None:
    folder, hf = unified["text"]
    cfg, model = load.load_model(folder)
    assert _error(hf, model, cfg) <= TOL
    assert model.layers[5].mlp.gate_proj.out_features == 2 * cfg.intermediate_size
    variant = copy.deepcopy(model)
    _single_wide_mlp(variant)
    assert _error(hf, variant, cfg) > 10 * TOL


def test_per_layer_overrides_matter(unified, tmp_path) -> None:
    """Without its per_layer_config the checkpoint's global layers (head_dim 32, 1 KV head) do not fit: the
    load is refused in one line naming a tensor, not run with the wrong heads."""
    folder = tmp_path / "no-overrides"
    shutil.copytree(unified["text"][0], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["per_layer_config"] = {}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(BadInput) as info:
        load.load_model(folder)
    assert "layers.3.self_attn" in str(info.value) and "\n" not in str(info.value)


def test_per_layer_kv_heads_override_matters(tmp_path) -> None:
    """Two checkpoints that differ only in the global layers' KV-head override (1 against 2 heads of 32): each
    loads with its own K projection width and matches its own transformers model."""
    import transformers

    overrides = {"3": {"head_dim": 32, "num_key_value_heads": 2}, "7": {"head_dim": 32, "num_key_value_heads": 2}}
    folder = gemma4.save_unified(tmp_path / "kv2", per_layer_config=overrides)
    cfg, model = load.load_model(folder)
    assert cfg.kv_heads_of(3) == 2 and model.layers[3].self_attn.k_proj.out_features == 64
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert _error(hf, model, cfg) <= TOL


# ---- configuration ------------------------------------------------------------------------------------------


def test_bidirectional_all_is_an_encoder_with_the_converted_window() -> None:
    raw = {"model_type": "gemma4_unified_text", **gemma4.UNIFIED, "use_bidirectional_attention": "all"}
    cfg = parse_config(raw)
    assert cfg.use_bidirectional_attention and cfg.sliding_window == 8 // 2 + 1  # as Gemma4UnifiedTextConfig
    for mode in ("vision", None):
        assert not parse_config({**raw, "use_bidirectional_attention": mode}).use_bidirectional_attention
    with pytest.raises(BadInput, match="'use_bidirectional_attention' must be 'all', 'vision' or null"):
        parse_config({**raw, "use_bidirectional_attention": True})


def test_defaults_are_transformers_defaults() -> None:
    """A config.json that omits fields means Gemma4UnifiedTextConfig's defaults (its global_head_dim 512, window
    1024, per-type RoPE, pattern 5 local : 1 global)."""
    import transformers

    ours = parse_config({"model_type": "gemma4_unified_text", "num_hidden_layers": 12})
    theirs = transformers.Gemma4UnifiedTextConfig(num_hidden_layers=12)
    assert ours.hidden_size == theirs.hidden_size and ours.sliding_window == theirs.sliding_window
    assert list(ours.layer_types) == theirs.layer_types
    assert [ours.head_dim_of(i) for i in range(12)] == [theirs.per_layer_config[i].head_dim for i in range(12)]
    assert [ours.kv_heads_of(i) for i in range(12)] == [theirs.per_layer_config[i].num_key_value_heads
                                                        for i in range(12)]  # fmt: skip
    assert ours.rope[GLOBAL].fraction == 0.25 and ours.rope[SLIDING].theta == 10_000.0


def test_random_checkpoint_is_what_transformers_loads(tmp_path) -> None:
    """random_checkpoint (what --random builds) writes unified checkpoints transformers loads tensor for tensor."""
    import transformers

    from gemma_export.dev import random_checkpoint

    config = {"model_type": "gemma4_unified_text", **gemma4.UNIFIED}
    folder = random_checkpoint.write_random_checkpoint(tmp_path, config)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    cfg, model = load.load_model(folder)
    assert _error(hf.eval(), model, cfg) <= TOL
