"""Gemma 4 text decoders: our reference against transformers (the oracle) for each shape of the family
(tests/support/gemma4.py: E-model with per-layer embeddings and KV sharing, dense with k = v and partial RoPE,
mixture of experts), and each trait shown to matter: a variant without it misses the oracle by far more than
the tolerance, so the parity tests can catch its absence."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from gemma_export.checkpoint import load
from gemma_export.config.model_config import GLOBAL, GemmaConfig, Rope, parse_config
from gemma_export.errors import BadInput
from gemma_export.models.gemma import GemmaModel, kv_cache_bytes
from gemma_export.runtime.session import generate
from gemma_export.verify.reference import TorchDecoder
from tests.models.test_gemma import our_logits
from tests.support import gemma4
from tests.support.transformers_oracle import hf_greedy, hf_logits, long_and_padded

TOL = 1e-4


@pytest.fixture(scope="module")
def g4_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    return {shape: gemma4.save_checkpoint(root / shape, shape) for shape in gemma4.SHAPES}


@pytest.fixture(scope="module")
def g4_hf(g4_checkpoints):
    import transformers

    return {
        shape: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for shape, path in g4_checkpoints.items()
    }


def _error(hf_model, model: GemmaModel, cfg: GemmaConfig) -> float:
    prompts = long_and_padded(cfg)
    assert len(prompts[0]) > 2 * cfg.max_window
    ref, mask = hf_logits(hf_model, prompts)
    real = mask.astype(bool)
    return float(np.abs(ref[real] - our_logits(model, prompts)[real]).max())


@pytest.mark.parametrize("shape", gemma4.SHAPES)
def test_reference_matches_transformers(g4_checkpoints, g4_hf, shape) -> None:
    cfg, model = load.load_model(g4_checkpoints[shape])
    assert cfg.model_type == "gemma4_text"
    assert _error(g4_hf[shape], model, cfg) <= TOL


@pytest.mark.parametrize("shape", gemma4.SHAPES)
def test_greedy_tokens_match_transformers_generate(g4_checkpoints, g4_hf, shape) -> None:
    cfg, model = load.load_model(g4_checkpoints[shape])
    prompts = long_and_padded(cfg)
    expected = hf_greedy(g4_hf[shape], prompts, 20, cfg.pad_token_id)
    assert generate(TorchDecoder(model), prompts, 20, eos_ids=(), pad_id=cfg.pad_token_id) == expected


def test_config_traits_of_each_shape(g4_checkpoints) -> None:
    e, _ = load.load_model(g4_checkpoints["e"])
    assert [e.kv_source(i) for i in range(8)] == [0, 1, 2, 3, 4, 4, 4, 3]  # the last 3 read layers 4 and 3
    assert [e.head_dim_of(i) for i in range(8)] == [16, 16, 16, 32, 16, 16, 16, 32]
    assert e.hidden_size_per_layer_input == 8 and e.use_double_wide_mlp and not e.attention_k_eq_v
    assert e.rope[GLOBAL] == Rope(theta=1e6, fraction=0.25) and e.attention_scale == 1.0
    dense, _ = load.load_model(g4_checkpoints["dense"])
    assert [dense.kv_heads_of(i) for i in range(6)] == [2, 2, 1, 2, 2, 1]
    assert [dense.k_is_v(i) for i in range(6)] == [False, False, True, False, False, True]
    assert dense.num_kv_shared_layers == 0 and dense.hidden_size_per_layer_input == 0
    moe, _ = load.load_model(g4_checkpoints["moe"])
    assert (moe.num_experts, moe.top_k_experts, moe.moe_intermediate_size) == (4, 2, 32)


def test_hub_spelling_loads_the_same(g4_checkpoints, g4_hf, tmp_path) -> None:
    """The published config.json files write global_head_dim / num_global_key_value_heads, not per_layer_config."""
    import shutil

    for shape in ("e", "dense"):
        folder = tmp_path / shape
        shutil.copytree(g4_checkpoints[shape], folder)
        gemma4.hub_spelling(folder)
        assert "per_layer_config" not in json.loads((folder / "config.json").read_text())
        cfg, model = load.load_model(folder)
        assert cfg == load.load_model(g4_checkpoints[shape])[0]
        assert _error(g4_hf[shape], model, cfg) <= TOL


def test_multimodal_checkpoint_text_part(tmp_path) -> None:
    """A Gemma4ForConditionalGeneration checkpoint (model_type gemma4: text under text_config, weights under
    model.language_model., a vision tower beside): we export its language model, as HF runs it on text."""
    import transformers

    from gemma_export.dev import random_checkpoint

    vision = transformers.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16
    )
    config = transformers.Gemma4Config(
        text_config=gemma4.hf_text_config("e").to_dict(), vision_config=vision.to_dict(), audio_config=None
    )
    hf = transformers.Gemma4ForConditionalGeneration(config).eval()
    gemma4.randomize(hf)
    hf.save_pretrained(tmp_path)
    random_checkpoint.write_tokenizer(tmp_path)

    cfg, model = load.load_model(tmp_path)
    assert cfg.source_model_type == "gemma4" and cfg.model_type == "gemma4_text"
    assert _error(hf, model, cfg) <= TOL
    assert load.unexported_parts(tmp_path) == ["vision"]  # what the build logs and model.not_exported records


# ---- each trait matters -------------------------------------------------------------------------------


def _set_norm_offsets(model: nn.Module) -> None:
    from gemma_export.models.layers import RMSNorm

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.offset = 1.0


def _no_value_norm(model: nn.Module) -> None:
    for layer in model.layers:
        if hasattr(layer.self_attn, "v_norm"):
            layer.self_attn.v_norm = nn.Identity()


def _no_per_layer_inputs(model: nn.Module) -> None:
    for layer in model.layers:
        layer.per_layer_input = None


def _no_layer_scalar(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in model.layers:
            layer.layer_scalar.fill_(1.0)


def _scaled_scores(model: nn.Module) -> None:
    for layer in model.layers:
        layer.self_attn.scale = layer.self_attn.head_dim**-0.5


def _no_experts(model: nn.Module) -> None:
    for layer in model.layers:
        layer.experts = None


def _flat_expert_scale(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in model.layers:
            layer.router.per_expert_scale.fill_(1.0)


def _all_experts(model: nn.Module) -> None:
    for layer in model.layers:
        layer.router.top_k = layer.router.proj.out_features


def _config(**changes) -> Callable[[GemmaConfig], GemmaConfig]:
    return lambda cfg: dataclasses.replace(cfg, **changes)


def _full_rotary(cfg: GemmaConfig) -> GemmaConfig:
    return dataclasses.replace(cfg, rope={kind: dataclasses.replace(r, fraction=1.0) for kind, r in cfg.rope.items()})


class _FirstSource(GemmaConfig):
    """KV sharing from the wrong layer: the first of the type instead of the last before the shared ones."""

    def kv_source(self, layer: int) -> int:
        source = super().kv_source(layer)
        return source if source == layer else self.layer_types.index(self.layer_types[layer])


def _wrong_kv_source(cfg: GemmaConfig) -> GemmaConfig:
    return _FirstSource(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


TRAITS = [
    pytest.param("e", _set_norm_offsets, None, id="e-norms-scale-by-1+w"),
    pytest.param("e", _no_per_layer_inputs, None, id="e-no-per-layer-embeddings"),
    pytest.param("e", _no_layer_scalar, None, id="e-no-layer-scalar"),
    pytest.param("e", None, _wrong_kv_source, id="e-kv-shared-from-another-layer"),
    pytest.param("e", None, _config(final_logit_softcapping=0.0), id="e-no-final-softcap"),
    pytest.param("dense", _no_value_norm, None, id="dense-no-value-norm"),
    pytest.param("dense", _scaled_scores, None, id="dense-scores-scaled-by-head-dim"),
    pytest.param("dense", None, _full_rotary, id="dense-rope-on-every-channel"),
    pytest.param("moe", _no_experts, None, id="moe-no-experts"),
    pytest.param("moe", _all_experts, None, id="moe-every-expert-not-top-k"),
    pytest.param("moe", _flat_expert_scale, None, id="moe-no-per-expert-scale"),
]


@pytest.mark.parametrize(("shape", "mutate", "reconfigure"), TRAITS)
def test_gemma4_traits_matter(g4_checkpoints, g4_hf, shape, mutate, reconfigure) -> None:
    cfg, model = load.load_model(g4_checkpoints[shape])
    assert _error(g4_hf[shape], model, cfg) <= TOL
    if reconfigure is not None:
        variant = GemmaModel(reconfigure(cfg))
        variant.load_state_dict(model.state_dict())
    else:
        variant = copy.deepcopy(model)
        mutate(variant)
    assert _error(g4_hf[shape], variant, cfg) > 10 * TOL


def test_kv_sharing_halves_the_e2b_cache() -> None:
    """KV-cache bytes of the E2B shape (float32; bf16 halves them), as state_specs lays them out (a model on the
    meta device): 20 of its 35 layers store nothing; they read layers 13 (local) and 14 (global)."""
    import math

    from gemma_export.dev import random_checkpoint

    cfg = parse_config(random_checkpoint.PUBLISHED_CONFIGS["gemma-4-e2b"])
    assert cfg.num_kv_shared_layers == 20 and sum(map(cfg.produces_kv, range(35))) == 15
    assert {cfg.kv_source(i) for i in range(15, 35)} == {13, 14}
    with torch.device("meta"):
        model = GemmaModel(cfg)
    for context in (8192, 32768):
        laid_out = sum(
            math.prod(context if axis == s.grows else 1 if d == "batch" else d for axis, d in enumerate(s.shape)) * 4
            for s in model.state_specs()
        )
        shared, unshared = kv_cache_bytes(cfg, context), kv_cache_bytes(cfg, context, shared=False)
        assert shared == laid_out
        # per position: 12 local layers of 1 x 256 and 3 global of 1 x 512, against 28 and 7 unshared
        assert shared == 2 * 4 * context * (12 * 256 + 3 * 512)
        assert unshared == 2 * 4 * context * (28 * 256 + 7 * 512)
        assert kv_cache_bytes(cfg, context, layout="windowed") == 2 * 4 * (12 * 256 * 511 + 3 * 512 * context)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_kv_shared_layers": 8}, "'num_kv_shared_layers' must be in [0, 8)"),
        ({"use_bidirectional_attention": True}, "'use_bidirectional_attention' must be 'all', 'vision' or null"),
        ({"per_layer_config": {"9": {"head_dim": 32}}}, "must be a layer index below 8"),
        ({"per_layer_config": {"3": {"intermediate_size": 32}}}, "overrides unsupported fields"),
        ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 5, "moe_intermediate_size": 8}, "top_k"),
        ({"hidden_activation": "gelu"}, "'hidden_activation' must be gelu_pytorch_tanh"),
    ],
)
def test_bad_gemma4_config_is_one_line_error(change, message) -> None:
    raw = {**gemma4.CONFIGS["e"], **change}
    with pytest.raises(BadInput, match=None) as info:
        parse_config(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("shape", gemma4.SHAPES)
def test_random_checkpoint_is_what_transformers_loads(shape, tmp_path) -> None:
    """gemma_export.dev.random_checkpoint writes Gemma 4 checkpoints (what --random builds) that transformers
    loads tensor for tensor, and that compute the same logits in both."""
    import transformers

    from gemma_export.dev import random_checkpoint

    folder = random_checkpoint.write_random_checkpoint(tmp_path, gemma4.CONFIGS[shape])
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    cfg, model = load.load_model(folder)
    assert _error(hf.eval(), model, cfg) <= TOL


@pytest.mark.parametrize("name", ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-31b", "gemma-4-26b-a4b", "gemma-4-12b"])
@pytest.mark.parametrize("layers", [1, 2, 6, 10])  # 1: one global layer, no window left
def test_random_depth_cut_keeps_a_valid_gemma4(name, layers) -> None:
    """`--random NAME --layers N`: the first N layers of the published pattern, the last one global, KV sharing
    kept only where each shared layer still has an earlier producer of its type; the recipe accepts the cut."""
    from gemma_export.config import recipes
    from gemma_export.dev import random_checkpoint

    full = parse_config(random_checkpoint.PUBLISHED_CONFIGS[name])
    cut = parse_config(random_checkpoint.cut_depth(random_checkpoint.PUBLISHED_CONFIGS[name], layers, name))
    assert cut.layer_types[:-1] == full.layer_types[: layers - 1] and cut.layer_types[-1] == GLOBAL
    assert all(cut.layer_types[cut.kv_source(i)] == cut.layer_types[i] for i in range(layers))
    assert cut.num_kv_shared_layers <= full.num_kv_shared_layers
    recipes.check_checkpoint(recipes.load(name).recipe, cut, name, cut_depth=True)
