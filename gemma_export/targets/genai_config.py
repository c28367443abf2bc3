"""onnxruntime-genai's `genai_config.json`, written beside the graph by the ONNX Runtime targets (onnx, ort-cpu)
for decoders genai can run: `og.Model(artifact)` then loads the artifact as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma_export.config.model_config import GEMMA4_DECODERS, GemmaConfig, GriffinConfig
from gemma_export.pipeline import package

GENAI_CONFIG = "genai_config.json"


def write(folder: Path, cfg: GemmaConfig | GriffinConfig, cache_layout: str | None, max_length: int) -> dict[str, str]:
    """Writes the file when genai can run the decoder; returns its role ({} when not)."""
    if not genai_supports(cfg, cache_layout):
        return {}
    package.write_json(folder / GENAI_CONFIG, genai_config(cfg, max_length))  # the package stage's one writer
    return {"genai_config": GENAI_CONFIG}


def genai_supports(cfg: GemmaConfig | GriffinConfig, cache_layout: str | None = "full") -> bool:
    """onnxruntime-genai 0.18 runs decoders with a growing KV cache; it has no RecurrentGemma model type.

    Its own sliding-window cache (`decoder.sliding_window`) is GroupQueryAttention's `sliding_window_cache`
    layout (the resident positions first, a capacity of window + slack), not our windowed layout (the last
    window - 1 positions, right-aligned, with the attention mask spanning the whole past): a windowed artifact
    gets no genai_config.json rather than a wrong one.

    Gemma 4 neither: genai sizes every layer's cache from one `head_size` / `num_key_value_heads` and names the
    caches 0..n-1, while a Gemma 4 artifact has per-layer head dims and KV heads and, on the E-models, no cache
    for its KV-shared layers (0.18 knows "gemma4" only as its multimodal pipeline).
    """
    return isinstance(cfg, GemmaConfig) and cache_layout in (None, "full") and cfg.model_type not in GEMMA4_DECODERS


def genai_config(cfg: GemmaConfig, max_length: int) -> dict[str, Any]:
    """onnxruntime-genai's description of the decoder: it feeds the growing cache back, unshared.

    The type is our (text) model type: genai reads "gemma3" as the multimodal pipeline and then looks for
    vision and embedding sessions the artifact does not have.
    """
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": package.MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0],
            "pad_token_id": cfg.pad_token_id,
            "type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
