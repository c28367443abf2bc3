"""An image + text artifact (Gemma 3 with its SigLIP tower) against transformers and the reference: the
preprocessing and prompt tokens against the checkpoint's own AutoProcessor (PIL backend), the vision graph's
features against models/siglip.py, and generation token for token against `generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemma_export import manifest as manifest_module
from gemma_export.checkpoint import load
from gemma_export.manifest import Manifest
from gemma_export.runtime import images
from gemma_export.runtime.generation import load_tokenizer
from gemma_export.runtime.session import GREEDY, OrtDecoder, positions
from tests.support.vision import random_images

# Row 0: two images and text longer than the window (8); row 1: one image, shorter (left-padded).
PROMPTS = ["Describe <start_of_image> and compare it with <start_of_image> please, in a few words",
           "What is in <start_of_image>?"]  # fmt: skip
SIZES = [(37, 23), (61, 90), (20, 20)]  # odd sizes, each resized to the tower's 56 px
FORMATS = ["png", "jpg", "png"]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    return random_images(tmp_path_factory.mktemp("images"), SIZES, FORMATS)


@pytest.fixture(scope="module")
def processor(vision_checkpoint):
    import transformers

    return transformers.AutoProcessor.from_pretrained(vision_checkpoint)


@pytest.fixture(scope="module")
def hf_inputs(processor, image_files):
    from PIL import Image

    pictures = [Image.open(p) for p in image_files]
    return processor(text=PROMPTS, images=[pictures[:2], pictures[2:]], return_tensors="pt", padding=True)


def test_manifest_describes_the_vision_graph_and_preprocessing(vision_artifact) -> None:
    manifest = Manifest.read(vision_artifact)
    assert manifest.vision is not None and manifest.vision.quant == "none"
    pre = manifest.vision.preprocessing
    assert pre.size == [56, 56] and pre.image_mean == [0.5, 0.4, 0.3] and pre.image_std == [0.5, 0.6, 0.7]
    assert pre.resample == "bilinear" and pre.mm_tokens_per_image == 4 and pre.image_marker == "<start_of_image>"
    assert [t.name for t in manifest.vision.inputs] == ["pixel_values"]
    assert manifest.vision.outputs[0].shape[1:] == [4, 64]
    names = [t.name for t in manifest.inputs]
    assert names[3:5] == ["token_type_ids", "image_features"]
    assert manifest.vision.parity is not None and manifest.vision.parity.max_abs_error <= 1e-4
    assert (vision_artifact / manifest.files["vision_model"].path).is_file()
    written = json.loads((vision_artifact / "manifest.json").read_text())["format"]
    assert written == manifest_module.FORMAT and manifest_module.VERSION >= (2, 2)  # `vision` came with 2.2


def test_pixels_and_prompt_tokens_match_the_processor(vision_artifact, hf_inputs, image_files) -> None:
    manifest = Manifest.read(vision_artifact)
    pre = manifest.vision.preprocessing.model_dump()
    ids, pixels = images.image_prompts(load_tokenizer(vision_artifact), PROMPTS, image_files, pre)
    np.testing.assert_allclose(pixels, hf_inputs["pixel_values"].numpy(), rtol=0, atol=1e-6)
    mask = hf_inputs["attention_mask"].numpy().astype(bool)
    assert ids == [list(row[m]) for row, m in zip(hf_inputs["input_ids"].numpy(), mask, strict=True)]


def test_vision_graph_matches_the_reference(vision_artifact, vision_checkpoint, hf_inputs) -> None:
    manifest = Manifest.read(vision_artifact)
    got = images.OrtVision(vision_artifact, manifest).encode(hf_inputs["pixel_values"].numpy())
    _, model = load.load_vision(vision_checkpoint)
    with torch.no_grad():
        expected = model(hf_inputs["pixel_values"]).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_generation_matches_transformers_generate(vision_artifact, vision_checkpoint, hf_inputs, image_files) -> None:
    import transformers

    assert hf_inputs["input_ids"].shape[1] > 2 * 8  # longer than the window
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(vision_checkpoint).eval()
    new = 12
    with torch.no_grad():
        expected = hf.generate(**hf_inputs, max_new_tokens=new, do_sample=False)[:, hf_inputs["input_ids"].shape[1] :]
    eos = set(Manifest.read(vision_artifact).model.config.eos_token_ids)
    result = images.run(vision_artifact, prompts=PROMPTS, images=image_files, max_new_tokens=new, sampling=GREEDY)
    for row, out in zip(expected.tolist(), result["outputs"], strict=True):
        stop = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert out["new_ids"] == row[:stop]


def test_image_blocks_matter_in_the_artifact(vision_artifact, hf_inputs) -> None:
    """The same prefill with the image tokens typed as text (a causal-only mask) gives other logits."""
    manifest = Manifest.read(vision_artifact)
    features = images.OrtVision(vision_artifact, manifest).encode(hf_inputs["pixel_values"].numpy())
    decoder = OrtDecoder(vision_artifact, manifest)
    ids, mask = hf_inputs["input_ids"].numpy(), hf_inputs["attention_mask"].numpy()
    rows = features.reshape(-1, features.shape[-1])

    def logits(types: np.ndarray) -> np.ndarray:
        out, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(len(ids)),
                              token_type_ids=types, image_features=rows)  # fmt: skip
        return out[mask.astype(bool)]

    with_blocks, causal_only = logits(hf_inputs["token_type_ids"].numpy()), logits(np.zeros_like(mask))
    assert np.abs(with_blocks - causal_only).max() > 1e-2


def test_prefill_logits_match_transformers(vision_artifact, vision_checkpoint, hf_inputs) -> None:
    import transformers

    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(vision_checkpoint).eval()
    with torch.no_grad():
        expected = hf(**hf_inputs).logits.numpy()
    manifest = Manifest.read(vision_artifact)
    features = images.OrtVision(vision_artifact, manifest).encode(hf_inputs["pixel_values"].numpy())
    decoder = OrtDecoder(vision_artifact, manifest)
    ids, mask = hf_inputs["input_ids"].numpy(), hf_inputs["attention_mask"].numpy()
    got, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(len(ids)),
                          token_type_ids=hf_inputs["token_type_ids"].numpy(),
                          image_features=features.reshape(-1, features.shape[-1]))  # fmt: skip
    real = mask.astype(bool)
    error = np.abs(got[real] - expected[real]).max()
    print(f"image prompt prefill: max abs logit error {error:.3g} (logit scale {np.abs(expected[real]).max():.3g})")
    assert error <= 1e-4
