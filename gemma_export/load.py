"""Load stage: a checkpoint folder -> (config, reference PyTorch model with its weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from gemma_export.checkpoint import read_tensors, select_weights
from gemma_export.config import WEIGHT_PREFIXES, GemmaConfig, GriffinConfig, load_config
from gemma_export.models.gemma import CHECKPOINT_RENAMES, GemmaModel
from gemma_export.models.griffin import GriffinModel

Decoder = GemmaModel | GriffinModel

# Tensors a checkpoint may carry that the text decoder does not use: the (tied) LM head, and the vision
# tower and projector of a multimodal Gemma 3.
IGNORED_PREFIXES = ("lm_head.", "vision_tower.", "multi_modal_projector.")


def load_model(checkpoint_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[GemmaConfig | GriffinConfig, Decoder]:
    cfg = load_config(checkpoint_dir)
    tensors = read_tensors(checkpoint_dir)
    with torch.device("meta"):
        model = GriffinModel(cfg) if isinstance(cfg, GriffinConfig) else GemmaModel(cfg)
    renames = CHECKPOINT_RENAMES.get(cfg.model_type, {})
    to_checkpoint = {name: _rename(name, renames) for name, _ in model.named_parameters()}
    expected = {to_checkpoint[name]: (tuple(p.shape), None) for name, p in model.named_parameters()}
    found = select_weights(
        tensors, expected, WEIGHT_PREFIXES, source=str(checkpoint_dir), ignore_prefixes=IGNORED_PREFIXES
    )
    state = {name: found[ckpt].to(dtype) for name, ckpt in to_checkpoint.items()}
    model.load_state_dict(state, strict=True, assign=True)  # the meta model takes the tensors as they are
    model.init_rope()
    return cfg, model.eval()


def _rename(name: str, renames: dict[str, str]) -> str:
    for ours, theirs in renames.items():
        name = name.replace(f".{ours}.", f".{theirs}.")
    return name
