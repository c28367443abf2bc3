"""Tiny random-weight checkpoints written by transformers itself (the oracle's own on-disk format)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from gemma_export.dev import random_checkpoint

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


# Gemma 2's published caps (50 on attention scores, 30 on logits) never bind in a tiny random model, whose
# scores stay near 1; smaller caps make the soft-capping path decide the result, so parity tests see it.
FIXTURE_OVERRIDES = {"gemma2": {"attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.5}}


def hf_config(model_type: str, **overrides):
    import transformers

    raw = copy.deepcopy(random_checkpoint.TINY_CONFIGS[model_type])
    raw.update(overrides)
    raw.pop("architectures", None)
    return transformers.AutoConfig.for_model(**raw)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every term matters: norms' (1 + w) offset, softcaps, q/k norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            std = 0.1 if p.ndim == 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def save_hf_checkpoint(out: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    import transformers

    config = hf_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    random_checkpoint.write_tokenizer(out)
    return out
