"""--random with a recipe's [vision] table: an image + text Gemma 3 checkpoint that transformers itself loads
(and agrees with), and that builds into a vision artifact."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

from gemma_export.checkpoint import load
from gemma_export.cli.main import main
from gemma_export.config import recipes
from gemma_export.dev.random_checkpoint import TINY_CONFIGS, write_once

TINY_VISION = {"mm_tokens_per_image": 4, "image_size": 28, "patch_size": 7, "hidden_size": 32, "intermediate_size": 48,
               "num_hidden_layers": 2, "num_attention_heads": 2, "layer_norm_eps": 1e-6}  # fmt: skip


def test_shipped_gemma3_multimodal_recipes_carry_the_published_tower() -> None:
    for name in ("gemma-3-4b", "gemma-3-12b", "gemma-3-27b"):
        vision = recipes.load(name).recipe.vision
        assert vision is not None and (vision["image_size"], vision["mm_tokens_per_image"]) == (896, 256)
        assert (vision["hidden_size"], vision["num_hidden_layers"]) == (1152, 27)


def test_random_vision_checkpoint_is_read_by_transformers(tmp_path: Path) -> None:
    import transformers

    folder = write_once(tmp_path / "ckpt", TINY_CONFIGS["gemma3_text"], seed=2, vision=TINY_VISION)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    _, vision = load.load_vision(folder)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixels).pooler_output
        assert (vision(pixels) - ref).abs().max().item() <= 1e-4
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert processor.image_seq_length == 4 and processor.image_processor.size["height"] == 28


@pytest.mark.slow
def test_build_random_vision_recipe(tmp_path: Path) -> None:
    base = tomllib.loads(recipes.resolve("gemma-3-4b").read_text())
    arch = {k: v for k, v in TINY_CONFIGS["gemma3_text"].items() if v is not None}
    recipe = {**base, "name": "tinyvision", "description": "tiny Gemma 3 with a tower", "architecture": arch,
              "vision": TINY_VISION}  # fmt: skip
    recipe["build"]["quantizations"] = []
    file = tmp_path / "tinyvision.toml"
    file.write_text(tomli_w.dumps(recipe))
    out = tmp_path / "out"
    argv = ["build", "--recipe", str(file), "--random", "--layers", "2", "--random-dir", str(tmp_path), "-o", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vision"]["preprocessing"]["size"] == [28, 28]
    assert manifest["vision"]["parity"]["passed"] is True
