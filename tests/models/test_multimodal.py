"""Gemma 3 with image prompts (models/multimodal.py + models/siglip.py) against transformers'
`Gemma3ForConditionalGeneration`, fed by the checkpoint's own processor: logits and greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.runtime.images import generate_with_images
from gemma_export.runtime.session import positions
from gemma_export.verify.reference import TorchDecoder
from tests.support.vision import random_image, save_gemma3_vision_checkpoint

TOL = 1e-4
# Row 0: two images and text longer than the window (8); row 1: one image, shorter (left-padded).
PROMPTS = ["Describe <start_of_image> and compare it with <start_of_image> please, in a few words",
           "What is in <start_of_image>?"]  # fmt: skip
SIZES = [(37, 23), (61, 90), (20, 20)]  # odd sizes: each is resized to the tower's 56 px


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_gemma3_vision_checkpoint(tmp_path_factory.mktemp("gemma3_vision"))


@pytest.fixture(scope="module")
def inputs(folder, tmp_path_factory):
    import transformers
    from PIL import Image

    tmp = tmp_path_factory.mktemp("images")
    images = [Image.open(random_image(tmp / f"{i}.png", w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]
    processor = transformers.AutoProcessor.from_pretrained(folder)
    return processor(text=PROMPTS, images=[images[:2], images[2:]], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def hf_model(folder):
    import transformers

    return transformers.Gemma3ForConditionalGeneration.from_pretrained(folder).eval()


def our_logits(folder, inputs, blocks: bool = True) -> np.ndarray:
    _, _, vision, decoder = load.load_multimodal(folder)
    with torch.no_grad():
        features = vision(inputs["pixel_values"]).reshape(-1, decoder.cfg.hidden_size)
    mask = inputs["attention_mask"].numpy()
    types = inputs["token_type_ids"].numpy() if blocks else np.zeros_like(mask)
    step = TorchDecoder(decoder).step
    ids = inputs["input_ids"].numpy()
    logits, _ = step(ids, mask, positions(mask), TorchDecoder(decoder).empty_cache(len(ids)),
                     token_type_ids=types, image_features=features.numpy())  # fmt: skip
    return logits


def test_logits_match_transformers(folder, inputs, hf_model) -> None:
    assert inputs["input_ids"].shape[1] > 2 * 8  # longer than the window, so the sliding layer's rule matters
    with torch.no_grad():
        ref = hf_model(**inputs).logits.numpy()
    real = inputs["attention_mask"].numpy().astype(bool)
    ours = our_logits(folder, inputs)
    assert np.abs(ours[real] - ref[real]).max() <= TOL
    # the trait that matters: a causal-only mask on the image tokens is measurably different
    causal = our_logits(folder, inputs, blocks=False)
    assert np.abs(causal[real] - ref[real]).max() > 100 * TOL


def test_greedy_tokens_match_transformers_generate(folder, inputs, hf_model) -> None:
    cfg, _, vision, decoder = load.load_multimodal(folder)
    with torch.no_grad():
        expected = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        features = vision(inputs["pixel_values"]).numpy()
    mask = inputs["attention_mask"].numpy()
    prompts = [list(row[m.astype(bool)]) for row, m in zip(inputs["input_ids"].numpy(), mask, strict=True)]
    got = generate_with_images(TorchDecoder(decoder), prompts, features, decoder.image_token_id, 12, eos_ids=[],
                               pad_id=cfg.pad_token_id)  # fmt: skip
    assert got == expected.tolist()
