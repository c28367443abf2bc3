"""Real bugs the fp32 gate must catch (GEMMA.md's list of where exporters go wrong), as model variants."""

from __future__ import annotations

import dataclasses

import torch

from gemma_export.config.model_config import GemmaConfig
from gemma_export.models.gemma import GemmaModel


def bugs(model: GemmaModel) -> dict[str, GemmaModel]:
    cfg = model.cfg
    found = {"norm-offset": without_norm_offset(model, 0)}
    if cfg.sliding_window:
        found["local-global-swapped"] = variant(model, layer_types=swapped_layer_types(cfg))
        found["window-off-by-one"] = variant(model, sliding_window=cfg.sliding_window - 1)
    if cfg.attn_logit_softcapping:
        found["no-attention-softcap"] = variant(model, attn_logit_softcapping=0.0)
    if cfg.final_logit_softcapping:
        found["no-final-softcap"] = variant(model, final_logit_softcapping=0.0)
    return found


def variant(model: GemmaModel, **changes) -> GemmaModel:
    """The same weights under a changed config."""
    broken = GemmaModel(dataclasses.replace(model.cfg, **changes))
    broken.load_state_dict(model.state_dict())
    return broken.eval()


def without_norm_offset(model: GemmaModel, layer: int) -> GemmaModel:
    """A norm computed as x * w instead of x * (1 + w), in one layer's input norm."""
    broken = variant(model)
    with torch.no_grad():
        broken.layers[layer].input_layernorm.weight -= 1.0
    return broken


def swapped_layer_types(cfg: GemmaConfig) -> tuple[str, ...]:
    return tuple("full_attention" if t == "sliding_attention" else "sliding_attention" for t in cfg.layer_types)
