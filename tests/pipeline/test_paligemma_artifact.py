"""A PaliGemma 2 image + text artifact against transformers and the reference: the preprocessing and the prompt
tokens (images, bos, prompt, "\\n") against the checkpoint's own PaliGemmaProcessor, the vision graph against
models/siglip.py, the prefix-LM prefill logits and `generate --image` token for token against `generate`, on
prompts that fit in the sliding window and on one longer than it (the op's `blocks` 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.runtime import images
from gemma_export.runtime.generation import load_tokenizer
from gemma_export.runtime.session import GREEDY, OrtDecoder, positions
from tests.support.cli import error_line, run
from tests.support.vision import random_images, save_paligemma_checkpoint

pytestmark = pytest.mark.slow  # the module builds an artifact

WINDOW = 8
# The prompts (4 image tokens, bos, text, "\n") fit in the window; prompt + answer run past it. Row 1 is
# shorter (left-padded).
PROMPTS = ["<image>cap", "<image>is"]
SIZES = [(37, 23), (61, 90)]  # odd sizes, each resized to the tower's 28 px
FORMATS = ["png", "jpg"]
# Row 0's prompt is longer than the window (4 times), row 1's fits (left-padded).
LONG_PROMPTS = ["<image>describe the picture in a few words please", "<image>is"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_paligemma_checkpoint(tmp_path_factory.mktemp("checkpoints") / "paligemma")


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    from gemma_export.pipeline.build import BuildOptions, build
    from gemma_export.pipeline.progress import Stages

    out = tmp_path_factory.mktemp("artifacts") / "paligemma"
    build(checkpoint, out, BuildOptions(), Stages(quiet=True))
    return out


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    return random_images(tmp_path_factory.mktemp("images"), SIZES, FORMATS)


@pytest.fixture(scope="module")
def hf_inputs(checkpoint, image_files):
    import transformers
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    return processor(text=PROMPTS, images=[Image.open(p) for p in image_files], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    import transformers

    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(checkpoint).eval()


def test_manifest_describes_the_paligemma_layout(artifact) -> None:
    manifest = Manifest.read(artifact)
    assert manifest.model.source_model_type == "paligemma"
    pre = manifest.vision.preprocessing
    assert pre.prompt_layout == "paligemma" and pre.image_marker == "<image>" and pre.bos_token == "<bos>"
    assert pre.size == [28, 28] and pre.resample == "bicubic" and pre.mm_tokens_per_image == 4
    assert pre.prefix_window == 0  # a prompt of any length: the prefix sees itself past the window (blocks 2)
    assert manifest.vision.outputs[0].shape[1:] == [4, 64]
    assert manifest.vision.parity is not None and manifest.vision.parity.max_abs_error <= 1e-4


def test_pixels_and_prompt_tokens_match_the_processor(artifact, hf_inputs, image_files) -> None:
    pre = Manifest.read(artifact).vision.preprocessing.model_dump()
    ids, pixels = images.image_prompts(load_tokenizer(artifact), PROMPTS, image_files, pre)
    np.testing.assert_allclose(pixels, hf_inputs["pixel_values"].numpy(), rtol=0, atol=1e-6)
    mask = hf_inputs["attention_mask"].numpy().astype(bool)
    assert ids == [list(row[m]) for row, m in zip(hf_inputs["input_ids"].numpy(), mask, strict=True)]


def test_vision_graph_matches_the_reference(artifact, checkpoint, hf_inputs) -> None:
    got = images.OrtVision(artifact, Manifest.read(artifact)).encode(hf_inputs["pixel_values"].numpy())
    _, model = load.load_vision(checkpoint)
    with torch.no_grad():
        expected = model(hf_inputs["pixel_values"]).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_prefill_logits_match_transformers(artifact, hf_inputs, hf_model) -> None:
    manifest = Manifest.read(artifact)
    features = images.OrtVision(artifact, manifest).encode(hf_inputs["pixel_values"].numpy())
    decoder = OrtDecoder(artifact, manifest)
    rows = features.reshape(-1, features.shape[-1])
    ids, mask = hf_inputs["input_ids"].numpy(), hf_inputs["attention_mask"].numpy()
    with torch.no_grad():  # generate's positions: 1-indexed over the real tokens
        expected = hf_model(**hf_inputs, position_ids=torch.from_numpy(positions(mask)) + 1).logits.numpy()

    def logits(types: np.ndarray) -> np.ndarray:
        out, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(len(ids)),
                              token_type_ids=types, image_features=rows)  # fmt: skip
        return out

    real = mask.astype(bool)
    prefix = ((hf_inputs["token_type_ids"].numpy() == 0) & real).astype(np.int64)  # ours: 1 = bidirectional
    error = np.abs(logits(prefix)[real] - expected[real]).max()
    print(f"paligemma image prompt prefill: max abs logit error {error:.3g}")
    assert error <= 1e-4
    assert np.abs(logits(np.zeros_like(mask))[real] - expected[real]).max() > 1e-2  # the prefix-LM trait matters


NEW = 12  # the prompt plus the answer runs past the window


@pytest.fixture(scope="module")
def expected_tokens(artifact, hf_inputs, hf_model) -> list[list[int]]:
    """transformers' greedy answers, each cut after its first eos (where generation stops)."""
    assert hf_inputs["input_ids"].shape[1] <= WINDOW < hf_inputs["input_ids"].shape[1] + NEW
    with torch.no_grad():
        out = hf_model.generate(**hf_inputs, max_new_tokens=NEW, do_sample=False)
    eos = set(Manifest.read(artifact).model.config.eos_token_ids)
    rows = out[:, hf_inputs["input_ids"].shape[1] :].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def test_generation_matches_transformers_generate(artifact, image_files, expected_tokens) -> None:
    result = images.run(artifact, prompts=PROMPTS, images=image_files, max_new_tokens=NEW, sampling=GREEDY)
    assert [out["new_ids"] for out in result["outputs"]] == expected_tokens
    assert sum(len(row) for row in expected_tokens) > 2


def test_cli_generate_image_matches_transformers_generate(capsys, artifact, image_files, expected_tokens) -> None:
    args = [
        a for prompt, image in zip(PROMPTS, image_files, strict=True) for a in ("--prompt", prompt, "--image", image)
    ]
    code, out, _ = run(capsys, "generate", artifact, *args, "--max-new-tokens", str(NEW), "--json")
    assert code == 0
    assert [row["new_ids"] for row in json.loads(out)["outputs"]] == expected_tokens


@pytest.fixture(scope="module")
def long_inputs(checkpoint, image_files):
    import transformers
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    inputs = processor(text=LONG_PROMPTS, images=[Image.open(p) for p in image_files], return_tensors="pt",
                       padding=True)  # fmt: skip
    real = inputs["attention_mask"].numpy().astype(bool)
    lengths = real.sum(1)
    assert lengths[0] > 3 * WINDOW and lengths[1] <= WINDOW and not real[1, 0]  # row 1 left-padded
    return inputs


def test_a_prompt_longer_than_the_window_matches_transformers(artifact, checkpoint, long_inputs, hf_model) -> None:
    """The ort-cpu artifact and the PyTorch reference both, against transformers' prefix-LM mask, whose sliding
    layers let the prefix see all of itself (OR(AND(window, causal), block))."""
    from gemma_export.verify.reference import TorchDecoder

    manifest = Manifest.read(artifact)
    features = images.OrtVision(artifact, manifest).encode(long_inputs["pixel_values"].numpy())
    rows = features.reshape(-1, features.shape[-1])
    ids, mask = long_inputs["input_ids"].numpy(), long_inputs["attention_mask"].numpy()
    real = mask.astype(bool)
    types = ((long_inputs["token_type_ids"].numpy() == 0) & real).astype(np.int64)  # ours: 1 = bidirectional
    with torch.no_grad():
        expected = hf_model(**long_inputs, position_ids=torch.from_numpy(positions(mask)) + 1).logits.numpy()
    _, _, _, model = load.load_multimodal(checkpoint)
    errors = {}
    for name, decoder in (("ort-cpu artifact", OrtDecoder(artifact, manifest)), ("reference", TorchDecoder(model))):
        out, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(len(ids)), token_type_ids=types,
                              image_features=rows)  # fmt: skip
        errors[name] = float(np.abs(out[real] - expected[real]).max())
    print(f"paligemma prompt of {real.sum(1)[0]} tokens, window {WINDOW}: max abs logit error {errors}")
    assert max(errors.values()) <= 1e-4


def test_the_onnx_target_emits_blocks_2_and_matches_transformers(checkpoint, long_inputs, hf_model,
                                                                 tmp_path) -> None:  # fmt: skip
    """--target onnx keeps one `ai.gemma::Attention` node per layer, run by its function body: every node says
    `blocks = 2`, and the body computes transformers' logits on the long prompt."""
    from onnx import helper

    from gemma_export.pipeline import package
    from gemma_export.pipeline.build import BuildOptions, build
    from gemma_export.pipeline.progress import Stages

    out = tmp_path / "onnx"
    build(checkpoint, out, BuildOptions(target="onnx"), Stages(quiet=True))
    manifest = Manifest.read(out)
    nodes = [n for n in package.graph_proto(out).graph.node if n.domain == "ai.gemma" and n.op_type == "Attention"]
    assert len(nodes) == manifest.model.config.num_hidden_layers
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}.get("blocks") == 2 for n in nodes)
    features = images.OrtVision(out, manifest).encode(long_inputs["pixel_values"].numpy())
    ids, mask = long_inputs["input_ids"].numpy(), long_inputs["attention_mask"].numpy()
    real = mask.astype(bool)
    types = ((long_inputs["token_type_ids"].numpy() == 0) & real).astype(np.int64)
    decoder = OrtDecoder(out, manifest)
    logits, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(len(ids)), token_type_ids=types,
                             image_features=features.reshape(-1, features.shape[-1]))  # fmt: skip
    with torch.no_grad():
        expected = hf_model(**long_inputs, position_ids=torch.from_numpy(positions(mask)) + 1).logits.numpy()
    error = float(np.abs(logits[real] - expected[real]).max())
    print(f"paligemma --target onnx, prompt of {real.sum(1)[0]} tokens: max abs logit error {error:.3g}")
    assert error <= 1e-4


def test_generation_of_a_prompt_longer_than_the_window_matches_transformers(artifact, image_files, long_inputs,
                                                                          hf_model) -> None:  # fmt: skip
    with torch.no_grad():
        out = hf_model.generate(**long_inputs, max_new_tokens=NEW, do_sample=False)
    eos = set(Manifest.read(artifact).model.config.eos_token_ids)
    rows = out[:, long_inputs["input_ids"].shape[1] :].tolist()
    expected = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]
    result = images.run(artifact, prompts=LONG_PROMPTS, images=image_files, max_new_tokens=NEW, sampling=GREEDY)
    assert [out["new_ids"] for out in result["outputs"]] == expected
    assert len({t for row in expected for t in row}) > 2


def test_an_older_artifact_bounded_by_the_window_still_refuses_a_longer_prompt(capsys, artifact, image_files,
                                                                               tmp_path) -> None:  # fmt: skip
    """An artifact built before the op's `blocks` 2 says so with a nonzero `prefix_window`: its manifest still
    reads, and a prompt its graph would compute differently from transformers is refused (exit 2)."""
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    raw = json.loads((old / "manifest.json").read_text())
    raw["vision"]["preprocessing"]["prefix_window"] = WINDOW
    (old / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.read(old).vision.preprocessing.prefix_window == WINDOW
    with pytest.raises(BadInput, match="longer than the sliding window"):
        images.run(old, prompts=LONG_PROMPTS[:1], images=image_files[:1], max_new_tokens=1)
    code, _, err = run(capsys, "generate", old, "--prompt", LONG_PROMPTS[0], "--image", image_files[0])
    assert code == 2
    error_line(err, "longer than the sliding window (8)")
