"""Tiny random Gemma 4 text checkpoints written by transformers (the oracle), one per shape of the family:

* `e`:     an E-model (E2B / E4B): per-layer embeddings, the last 3 of 8 layers reading an earlier layer's keys and
           values (two sliding layers share layer 4's, the last global layer layer 3's), double-wide MLPs on
           those layers, one KV head, global layers twice as wide (head_dim 32) with proportional RoPE.
* `dense`: the 31B shape: global layers with keys = values, fewer KV heads (1 against 2) and a wider head_dim,
           proportional RoPE on a quarter of their channels; no per-layer embeddings.
* `moe`:   the 26B-A4B shape: `dense` plus a routed expert block (4 experts, top 2) in every layer.

Written as transformers 5.25 writes them (`per_layer_config`); `hub_spelling` rewrites a config.json in the
published files' spelling (`global_head_dim`, `num_global_key_value_heads`), which must load the same.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from gemma_export.dev import random_checkpoint

S, F = "sliding_attention", "full_attention"
SHAPES = ("e", "dense", "moe")

_BASE: dict[str, Any] = {
    "model_type": "gemma4_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "head_dim": 16,
    "global_head_dim": 32,
    "sliding_window": 8,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    # 30 (the published cap) never binds in a tiny random model; 3 makes the soft-cap decide the logits
    "final_logit_softcapping": 3.0,
    "rope_parameters": {
        S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "dtype": "float32",
}
CONFIGS: dict[str, dict[str, Any]] = {
    "e": {
        **_BASE,
        "num_hidden_layers": 8,
        "num_key_value_heads": 1,
        "layer_types": [S, S, S, F, S, S, S, F],
        "num_kv_shared_layers": 3,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 512,
        "use_double_wide_mlp": True,
        "attention_k_eq_v": False,
    },
    "dense": {
        **_BASE,
        "num_hidden_layers": 6,
        "num_key_value_heads": 2,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "layer_types": [S, S, F, S, S, F],
        "hidden_size_per_layer_input": 0,
    },
}
CONFIGS["moe"] = {
    **CONFIGS["dense"],
    "enable_moe_block": True,
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
}


def hf_text_config(shape: str, **overrides):
    import transformers

    raw = copy.deepcopy(CONFIGS[shape])
    raw.update(overrides)
    raw.pop("model_type")
    return transformers.Gemma4TextConfig(**raw)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every term matters. Gemma 4's norms scale by w (not 1 + w): their weights
    are drawn around 1; each layer's scalar (a buffer) too, so that a model that drops it is caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            if p.ndim == 1:  # norms, the router's scales
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def save_checkpoint(out: Path, shape: str, seed: int = 0, **overrides) -> Path:
    import transformers

    model = transformers.Gemma4ForCausalLM(hf_text_config(shape, **overrides)).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    random_checkpoint.write_tokenizer(out)
    return out


def hub_spelling(folder: Path) -> None:
    """Rewrite config.json as the published Gemma 4 files spell it: `global_head_dim` and
    `num_global_key_value_heads` instead of transformers 5.25's `per_layer_config`."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    overrides = raw.pop("per_layer_config")
    dims = {o["head_dim"] for o in overrides.values()}
    kv = {o.get("num_key_value_heads") for o in overrides.values()}
    assert len(dims) == 1 and len(kv) == 1
    raw["global_head_dim"] = dims.pop()
    raw["num_global_key_value_heads"] = kv.pop()
    path.write_text(json.dumps(raw, indent=2))


# Gemma 4 "unified" (the 12B; transformers' Gemma4UnifiedTextConfig): no per-layer embeddings or experts. Its traits
# here: per_layer_config overrides (the global layers' head_dim 32 and 1 KV head, against 16 and 2), k = v on global
# layers, the last 3 of 8 layers reading layers 4 (local) and 3 (global), double-wide MLPs on those 3.
UNIFIED: dict[str, Any] = {
    **{k: v for k, v in _BASE.items() if k not in ("model_type", "global_head_dim", "final_logit_softcapping")},
    "num_hidden_layers": 8,
    "num_key_value_heads": 2,
    "layer_types": [S, S, S, F, S, S, S, F],
    "per_layer_config": {
        "3": {"head_dim": 32, "num_key_value_heads": 1},
        "7": {"head_dim": 32, "num_key_value_heads": 1},
    },
    "attention_k_eq_v": True,
    "num_kv_shared_layers": 3,
    "use_double_wide_mlp": True,
    "use_bidirectional_attention": "vision",
}


def hf_unified_text_config(**overrides):
    import transformers

    return transformers.Gemma4UnifiedTextConfig(**{**copy.deepcopy(UNIFIED), **overrides})


def save_unified(out: Path, *, multimodal: bool = False, seed: int = 0, **overrides) -> Path:
    """A Gemma4UnifiedForCausalLM checkpoint, or (multimodal) a Gemma4UnifiedForConditionalGeneration one with its
    image-patch and audio-frame embedders (`model.embed_vision.`, `model.embed_audio.`) beside the language model."""
    import transformers

    text = hf_unified_text_config(**overrides)
    if multimodal:
        vision = transformers.Gemma4UnifiedVisionConfig(
            patch_size=2, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=64
        )
        audio = transformers.Gemma4UnifiedAudioConfig(audio_embed_dim=16)
        config = transformers.Gemma4UnifiedConfig(
            text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict()
        )
        model = transformers.Gemma4UnifiedForConditionalGeneration(config).eval()
    else:
        model = transformers.Gemma4UnifiedForCausalLM(text).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    random_checkpoint.write_tokenizer(out)
    return out
