"""Shared fixtures: tiny random-weight checkpoints written by transformers itself (the oracle), and the
artifacts built from them (built once per test session: an export takes seconds)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session", params=MODEL_TYPES)
def model_type(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {t: save_hf_checkpoint(root / t, t, **FIXTURE_OVERRIDES.get(t, {})) for t in MODEL_TYPES}


@pytest.fixture(scope="session")
def checkpoint(checkpoints, model_type) -> Path:
    return checkpoints[model_type]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Built lazily, once per model type."""
    return {}


@pytest.fixture(scope="session")
def artifact(artifacts, checkpoint, model_type, tmp_path_factory) -> Path:
    from gemma_export.pipeline.build import BuildOptions, build
    from gemma_export.pipeline.progress import Stages

    if model_type not in artifacts:
        out = tmp_path_factory.mktemp("artifacts") / model_type
        build(checkpoint, out, BuildOptions(), Stages(quiet=True))
        artifacts[model_type] = out
    return artifacts[model_type]


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
