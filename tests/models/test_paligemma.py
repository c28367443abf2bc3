"""PaliGemma 2 (models/multimodal.py with the PaliGemma traits + models/siglip.py's PaliGemma projector) against
transformers' `PaliGemmaForConditionalGeneration`, fed by the checkpoint's own `PaliGemmaProcessor`: logits on
a prefix + suffix longer than the window (left-padded batch), a prefix itself longer than the window (the op's
`blocks` 2: it sees all of itself, as transformers' mask OR(AND(window, causal), block) lets it), and greedy
tokens of generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.errors import BadInput
from gemma_export.ops.visibility import BLOCKS_IN_WINDOW, BLOCKS_PAST_WINDOW
from gemma_export.runtime.images import generate_with_images
from gemma_export.runtime.session import positions
from gemma_export.verify.reference import TorchDecoder
from tests.support.vision import random_image, save_paligemma_checkpoint

TOL = 1e-4
WINDOW = 8
# The prefix (4 image tokens, bos, the prompt, "\n") fits in the window; the suffix takes row 0 past it.
PROMPTS = ["<image>cap", "<image>is"]
SUFFIXES = ["a long answer that runs well past the window of the sliding layers", "yes"]
SIZES = [(37, 23), (61, 90)]  # odd sizes: each is resized to the tower's 28 px
# Row 0's prefix (4 image tokens, bos, the prompt, "\n") is longer than the window, row 1's fits (left-padded).
LONG_PROMPTS = ["<image>describe the picture in a few words please", "<image>is"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_paligemma_checkpoint(tmp_path_factory.mktemp("paligemma"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    tmp = tmp_path_factory.mktemp("images")
    return [Image.open(random_image(tmp / f"{i}.png", w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def processor(folder):
    import transformers

    return transformers.AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_model(folder):
    import transformers

    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()


def our_logits(folder, inputs, prefix_lm: bool = True, blocks: int = BLOCKS_PAST_WINDOW) -> np.ndarray:
    """`blocks`: the decoder's block mode; PaliGemma's is BLOCKS_PAST_WINDOW (Gemma 3's: BLOCKS_IN_WINDOW)."""
    _, _, vision, decoder = load.load_multimodal(folder)
    assert decoder.position_offset == 1  # transformers' 1-indexed positions
    assert all(layer.self_attn.blocks == BLOCKS_PAST_WINDOW for layer in decoder.decoder.layers)
    for layer in decoder.decoder.layers:
        layer.self_attn.blocks = blocks
    with torch.no_grad():
        features = vision(inputs["pixel_values"]).reshape(-1, decoder.cfg.hidden_size)
    mask = inputs["attention_mask"].numpy()
    # ours marks the bidirectional tokens with 1: the prefix, transformers' token_type_ids == 0
    prefix = ((inputs["token_type_ids"].numpy() == 0) & (mask != 0)).astype(np.int64)
    types = prefix if prefix_lm else np.zeros_like(mask)
    ids = inputs["input_ids"].numpy()
    torch_decoder = TorchDecoder(decoder)
    logits, _ = torch_decoder.step(ids, mask, positions(mask), torch_decoder.empty_cache(len(ids)),
                                   token_type_ids=types, image_features=features.numpy())  # fmt: skip
    return logits


def test_logits_match_transformers(folder, processor, images, hf_model) -> None:
    inputs = processor(text=PROMPTS, images=images, suffix=SUFFIXES, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"].numpy()
    real = mask.astype(bool)
    prefix_lengths = ((inputs["token_type_ids"].numpy() == 0) & real).sum(1)
    assert prefix_lengths.max() <= WINDOW < inputs["input_ids"].shape[1] // 2  # the window matters, the prefix fits
    with torch.no_grad():  # generate's positions: 1-indexed, counted over the real tokens
        ref = hf_model(**inputs, position_ids=torch.from_numpy(positions(mask)) + 1).logits.numpy()
    ours = our_logits(folder, inputs)
    error = np.abs(ours[real] - ref[real]).max()
    print(f"paligemma logits max abs error {error:.3g}")
    assert error <= TOL
    # the trait that matters: a causal-only mask (no bidirectional prefix) is measurably different
    causal = our_logits(folder, inputs, prefix_lm=False)
    assert np.abs(causal[real] - ref[real]).max() > 100 * TOL


def test_a_prefix_longer_than_the_window_matches_transformers(folder, processor, images, hf_model) -> None:
    """transformers' sliding layers let PaliGemma's prefix see all of itself (OR(AND(window, causal), block));
    the op's `blocks` 2 does too; Gemma 3's rule (`blocks` 1: AND(window, OR(causal, block))) would not."""
    inputs = processor(text=LONG_PROMPTS, images=images, suffix=["a cat on a mat", "no"], return_tensors="pt",
                       padding=True)  # fmt: skip
    mask = inputs["attention_mask"].numpy()
    real = mask.astype(bool)
    prefix_lengths = ((inputs["token_type_ids"].numpy() == 0) & real).sum(1)
    assert prefix_lengths[0] > 1.5 * WINDOW and prefix_lengths[1] <= WINDOW and not real[1, 0]  # left-padded
    with torch.no_grad():
        ref = hf_model(**inputs, position_ids=torch.from_numpy(positions(mask)) + 1).logits.numpy()
    error = np.abs(our_logits(folder, inputs)[real] - ref[real]).max()
    print(f"paligemma prefix of {prefix_lengths[0]} tokens, window {WINDOW}: max abs logit error {error:.3g}")
    assert error <= TOL
    in_window = our_logits(folder, inputs, blocks=BLOCKS_IN_WINDOW)
    assert np.abs(in_window[real] - ref[real]).max() > 100 * TOL  # the mode matters
    assert np.abs(in_window[1] - ref[1])[real[1]].max() <= TOL  # ... and only where a prefix outgrows the window


def _greedy_against_transformers(folder, inputs, hf_model, steps: int):
    """(our reference decoder, a function running its greedy generation on the processor's prompts and images,
    transformers' greedy tokens for the same inputs)."""
    cfg, _, vision, decoder = load.load_multimodal(folder)
    with torch.no_grad():
        expected = hf_model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        features = vision(inputs["pixel_values"]).numpy()
    mask = inputs["attention_mask"].numpy()
    prompts = [list(row[m.astype(bool)]) for row, m in zip(inputs["input_ids"].numpy(), mask, strict=True)]

    def run(model) -> list[list[int]]:
        return generate_with_images(TorchDecoder(model), prompts, features, model.image_token_id, steps, eos_ids=[],
                                    pad_id=cfg.pad_token_id, prefix_lm=True)  # fmt: skip

    return decoder, run, expected.tolist()


def test_greedy_tokens_for_a_prefix_longer_than_the_window_match_transformers_generate(
    folder, processor, images, hf_model
) -> None:
    inputs = processor(text=LONG_PROMPTS, images=images, return_tensors="pt", padding=True)
    steps = 10
    assert inputs["input_ids"].shape[1] > 1.5 * WINDOW
    decoder, run, expected = _greedy_against_transformers(folder, inputs, hf_model, steps)
    got = run(decoder)
    assert got == expected
    assert len({t for row in got for t in row}) > 2  # not a degenerate repetition
    for layer in decoder.decoder.layers:  # Gemma 3's rule: the prefix bounded by the window
        layer.self_attn.blocks = BLOCKS_IN_WINDOW
    in_window = run(decoder)
    assert in_window[0] != got[0] and in_window[1] == got[1]


def test_greedy_tokens_match_transformers_generate(folder, processor, images, hf_model) -> None:
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    steps = 12  # the prompt plus the answer runs past the window
    assert inputs["input_ids"].shape[1] <= WINDOW < inputs["input_ids"].shape[1] + steps
    decoder, run, expected = _greedy_against_transformers(folder, inputs, hf_model, steps)
    got = run(decoder)
    assert got == expected
    assert len({t for row in got for t in row}) > 2  # not a degenerate repetition


def test_an_artifact_whose_prefix_is_bounded_by_the_window_refuses_a_longer_one(folder) -> None:
    """Artifacts built before `blocks` 2 bound the prefix by the window (manifest `prefix_window`): the runtime
    still refuses what their graph would compute differently from transformers."""
    cfg, _, _, decoder = load.load_multimodal(folder)
    prompt = [decoder.image_token_id] * 4 + [2] + [300] * 10
    features = np.zeros((1, 4, cfg.hidden_size), np.float32)
    with pytest.raises(BadInput, match="longer than the sliding window"):
        generate_with_images(TorchDecoder(decoder), [prompt], features, decoder.image_token_id, 1, prefix_lm=True,
                             window=WINDOW)  # fmt: skip


def test_a_published_style_config_reads_as_transformers_reads_it() -> None:
    """PaliGemma 2 3B 224's config.json leaves out SigLIP's image_size; its text config (as PaliGemmaConfig
    saves it) says use_bidirectional_attention, which there means the prefix-LM mask, not an encoder."""
    from gemma_export.config.model_config import parse_config
    from gemma_export.models.siglip import VisionConfig

    raw = {"model_type": "paligemma", "projection_dim": 2304, "image_token_index": 257152,
           "text_config": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                           "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                           "head_dim": 256, "vocab_size": 257216, "query_pre_attn_scalar": 256,
                           "sliding_window": 4096, "use_bidirectional_attention": True},
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                             "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
                             "projection_dim": 2304, "vision_use_head": False}}  # fmt: skip
    cfg = parse_config(raw)
    assert cfg.model_type == "gemma2" and cfg.source_model_type == "paligemma"
    assert not cfg.use_bidirectional_attention and cfg.sliding_window == 4096
    vision = VisionConfig.from_checkpoint(raw, "config.json")
    assert (vision.image_size, vision.mm_tokens_per_image, vision.projector) == (224, 256, "paligemma")
    assert vision.text_hidden_size == 2304
    with pytest.raises(BadInput, match=r"text_config\.model_type"):
        parse_config({**raw, "text_config": {**raw["text_config"], "model_type": "gemma3_text"}})


def test_paligemma_1_logits_match_transformers(tmp_path, images) -> None:
    """PaliGemma 1: the same model over a Gemma text config (no window): a long prefix is one block."""
    import transformers

    from gemma_export.dev import random_checkpoint

    text = {k: v for k, v in random_checkpoint.TINY_CONFIGS["gemma"].items() if k != "architectures"}
    folder = save_paligemma_checkpoint(tmp_path / "paligemma1", seed=1, text_config={**text, "num_hidden_layers": 2})
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    inputs = processor(text=["<image>describe the picture in a few words please", "<image>what?"], images=images,
                       suffix=["a cat", "no"], return_tensors="pt", padding=True)  # fmt: skip
    mask = inputs["attention_mask"].numpy()
    real = mask.astype(bool)
    with torch.no_grad():
        ref = hf(**inputs, position_ids=torch.from_numpy(positions(mask)) + 1).logits.numpy()
    assert np.abs(our_logits(folder, inputs)[real] - ref[real]).max() <= TOL
    assert np.abs(our_logits(folder, inputs, prefix_lm=False)[real] - ref[real]).max() > 100 * TOL


def test_prefill_passes_never_cut_the_prefix(folder, processor, images, hf_model, monkeypatch) -> None:
    """With a logits budget of one token per pass, the prompt (one block) still goes in one pass: split, its
    first tokens could not see its last ones, and the answer would differ from transformers'."""
    from gemma_export.runtime import session

    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    cfg, _, vision, decoder = load.load_multimodal(folder)
    with torch.no_grad():
        expected = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        features = vision(inputs["pixel_values"]).numpy()
    mask = inputs["attention_mask"].numpy()
    prompts = [list(row[m.astype(bool)]) for row, m in zip(inputs["input_ids"].numpy(), mask, strict=True)]
    monkeypatch.setattr(session, "LOGITS_BUDGET_BYTES", 1)
    got = generate_with_images(TorchDecoder(decoder), prompts, features, decoder.image_token_id, 6, eos_ids=[],
                               pad_id=cfg.pad_token_id, prefix_lm=True)  # fmt: skip
    assert got == expected.tolist()


def test_whole_blocks_merges_passes_across_a_block() -> None:
    from gemma_export.runtime.images import whole_blocks

    types = np.array([[0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1]])
    passes = [slice(i, i + 1) for i in range(6)]
    assert whole_blocks(passes, types) == [slice(0, 1), slice(1, 3), slice(3, 4), slice(4, 6)]
