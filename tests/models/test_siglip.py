"""The SigLIP tower + Gemma 3 projector (models/siglip.py) against transformers' `get_image_features`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma_export.checkpoint import load
from gemma_export.errors import BadInput
from tests.support.vision import save_gemma3_vision_checkpoint

TOL = 1e-4  # the spine tolerance of tests/models/test_gemma.py


def hf_features(folder, pixels: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        return model.model.get_image_features(pixels).pooler_output


@pytest.mark.parametrize("overrides", [{}, {"vision_image_size": 84, "mm_tokens_per_image": 9}],
                         ids=["56px-4tokens", "84px-9tokens"])  # fmt: skip
def test_vision_features_match_transformers(tmp_path, overrides) -> None:
    folder = save_gemma3_vision_checkpoint(tmp_path / "ckpt", **overrides)
    cfg, model = load.load_vision(folder)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(pixels)
    ref = hf_features(folder, pixels)
    assert ours.shape == ref.shape == (2, cfg.mm_tokens_per_image, cfg.text_hidden_size)
    assert (ours - ref).abs().max().item() <= TOL
    assert ref.abs().max().item() > 0.1  # the features are not trivially small


def test_published_layout_with_vision_model_level_loads(tmp_path) -> None:
    """Published Gemma 3 files nest the tower as `vision_tower.vision_model.`; both layouts load the same."""
    folder = save_gemma3_vision_checkpoint(tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    nested = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in tensors.items()}
    save_file(nested, folder / "model.safetensors", metadata={"format": "pt"})
    _, model = load.load_vision(folder)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert (model(pixels) - hf_features(folder, pixels)).abs().max().item() <= TOL


def test_a_missing_tower_tensor_is_named(tmp_path) -> None:
    folder = save_gemma3_vision_checkpoint(tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["vision_tower.post_layernorm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match=r"post_layernorm\.weight"):
        load.load_vision(folder)
