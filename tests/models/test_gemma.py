"""Our PyTorch reference against transformers (the oracle), for each Gemma generation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.models.gemma import GemmaModel
from gemma_export.runtime.session import generate, left_pad, positions
from gemma_export.verify.reference import TorchDecoder
from tests.support.transformers_oracle import hf_greedy, hf_logits, long_and_padded

TOL = 1e-4


def our_logits(model: GemmaModel, prompts: list[list[int]], pad_id: int = 0) -> np.ndarray:
    ids, mask = left_pad(prompts, pad_id)
    decoder = TorchDecoder(model)
    logits, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(len(prompts)))
    return logits


def test_reference_matches_transformers(checkpoint, hf_model) -> None:
    cfg, model = load.load_model(checkpoint)
    prompts = long_and_padded(cfg)
    assert len(prompts[0]) > 2 * cfg.max_window >= 0
    ref, mask = hf_logits(hf_model, prompts)
    ours = our_logits(model, prompts)
    real = mask.astype(bool)
    assert np.abs(ref[real] - ours[real]).max() <= TOL


def test_greedy_tokens_match_transformers_generate(checkpoint, hf_model) -> None:
    cfg, model = load.load_model(checkpoint)
    prompts = long_and_padded(cfg)
    expected = hf_greedy(hf_model, prompts, 20, cfg.pad_token_id)
    assert generate(TorchDecoder(model), prompts, 20, eos_ids=(), pad_id=cfg.pad_token_id) == expected


def test_embedding_scale_is_rounded_to_compute_dtype() -> None:
    """HF multiplies by sqrt(hidden) cast to the compute dtype: in bf16 sqrt(3072) is 55.5, not 55.4256."""
    assert torch.tensor(3072**0.5, dtype=torch.bfloat16).item() == 55.5
    cfg = _tiny_cfg("gemma3_text")
    model = GemmaModel(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.embed_tokens.weight.fill_(1.0)
        x = model.embed_tokens(torch.tensor([[5]])) * torch.tensor(cfg.hidden_size**0.5, dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16
    assert x[0, 0, 0].item() == torch.tensor(cfg.hidden_size**0.5, dtype=torch.bfloat16).item()


def _tiny_cfg(model_type: str):
    from gemma_export.config.model_config import parse_config
    from gemma_export.dev import random_checkpoint

    return parse_config(random_checkpoint.TINY_CONFIGS[model_type])


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"attn_logit_softcapping": 0.0}, id="no-attention-softcap"),
        pytest.param({"final_logit_softcapping": 0.0}, id="no-final-softcap"),
        pytest.param(
            {"layer_types": tuple("full_attention" if i % 2 == 0 else "sliding_attention" for i in range(6))},
            id="local-global-swapped",
        ),
        pytest.param({"sliding_window": 0, "layer_types": ("full_attention",) * 6}, id="no-window"),
    ],
)
def test_gemma2_traits_matter(checkpoints, broken) -> None:
    """Each Gemma 2 trait changes the logits far beyond the parity tolerance: the parity test can catch it."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["gemma2"], dtype=torch.float32).eval()
    cfg, model = load.load_model(checkpoints["gemma2"])
    variant = GemmaModel(dataclasses.replace(cfg, **broken))
    variant.load_state_dict(model.state_dict())
    prompts = long_and_padded(cfg)
    ref, mask = hf_logits(hf, prompts)
    real = mask.astype(bool)
    assert np.abs(ref[real] - our_logits(model, prompts)[real]).max() <= TOL
    assert np.abs(ref[real] - our_logits(variant, prompts)[real]).max() > 10 * TOL


def test_gemma3_multimodal_checkpoint_text_part(tmp_path) -> None:
    """A Gemma3ForConditionalGeneration checkpoint: we export its language model, as HF runs it on text."""
    import transformers

    from gemma_export.dev import random_checkpoint
    from tests.support.checkpoints import hf_config, randomize

    text = hf_config("gemma3_text")
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    random_checkpoint.write_tokenizer(tmp_path)

    cfg, model = load.load_model(tmp_path)
    assert cfg.source_model_type == "gemma3" and cfg.model_type == "gemma3_text"
    prompts = long_and_padded(cfg)
    ref, mask = hf_logits(hf, prompts)
    real = mask.astype(bool)
    assert np.abs(ref[real] - our_logits(model, prompts)[real]).max() <= TOL
