"""Tiny random multimodal checkpoints written by transformers (`Gemma3ForConditionalGeneration`), with the
checkpoint's own processor (`Gemma3Processor`, PIL backend) saved beside them: the oracle of the vision tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gemma_export.dev import random_checkpoint
from tests.support.checkpoints import randomize

BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


def vision_config(**overrides) -> dict:
    """config.json of a tiny Gemma 3 with a SigLIP tower: 56 px, 14 px patches (a 4x4 grid) pooled to 4 tokens;
    a text decoder with a window of 8 (sliding layers) and a global layer."""
    text = {k: v for k, v in random_checkpoint.TINY_CONFIGS["gemma3_text"].items() if k != "architectures"}
    text.update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
              "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}  # fmt: skip
    raw = {"model_type": "gemma3", "text_config": text, "vision_config": vision, "mm_tokens_per_image": 4}
    for key, value in overrides.items():
        (vision if key.startswith("vision_") and key[7:] in vision else raw)[key.removeprefix("vision_")] = value
    return raw


def write_tokenizer(out: Path) -> dict[str, int]:
    """The tiny Gemma tokenizer plus Gemma 3's image tokens (ids after the base vocabulary)."""
    from tokenizers import AddedToken, Tokenizer

    random_checkpoint.write_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOI, EOI, IMAGE)])
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in (BOI, EOI, IMAGE)}
    config = json.loads((out / "tokenizer_config.json").read_text())
    for token, i in ids.items():
        flags = dict.fromkeys(("lstrip", "rstrip", "normalized", "single_word"), False)
        config["added_tokens_decoder"][str(i)] = {"content": token, "special": True, **flags}
    config["extra_special_tokens"] = {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


def save_gemma3_vision_checkpoint(out: Path, seed: int = 0, **overrides) -> Path:
    """A random `Gemma3ForConditionalGeneration` and its `Gemma3Processor`, both saved by transformers."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out)
    raw = vision_config(**overrides)
    raw.update(boi_token_index=ids[BOI], eoi_token_index=ids[EOI], image_token_index=ids[IMAGE])
    config = transformers.Gemma3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    size = raw["vision_config"]["image_size"]
    image_processor = transformers.Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5, 0.4, 0.3], image_std=[0.5, 0.6, 0.7]
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    processor = transformers.Gemma3Processor(image_processor, tokenizer, image_seq_length=raw["mm_tokens_per_image"])
    processor.save_pretrained(out)
    return out


def random_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def random_images(folder: Path, sizes: list[tuple[int, int]], formats: list[str]) -> list[Path]:
    """One random image per (width, height) and format, seeded by its position."""
    return [random_image(folder / f"{i}.{fmt}", w, h, seed=i)
            for i, ((w, h), fmt) in enumerate(zip(sizes, formats, strict=True))]  # fmt: skip


PALI_IMAGE = "<image>"


def paligemma_config(**overrides) -> dict:
    """config.json of a tiny PaliGemma 2: the tiny SigLIP tower at 28 px (a 2x2 grid: 4 image tokens per image,
    no pooling) and a Gemma 2 decoder with a window of 8 (sliding, global)."""
    raw = vision_config(vision_image_size=28)
    text = {k: v for k, v in random_checkpoint.TINY_CONFIGS["gemma2"].items() if k != "architectures"}
    text.update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    out = {"model_type": "paligemma", "text_config": text, "vision_config": raw["vision_config"],
           "projection_dim": text["hidden_size"], "hidden_size": text["hidden_size"]}  # fmt: skip
    out.update(overrides)
    return out


def save_paligemma_checkpoint(out: Path, seed: int = 0, **overrides) -> Path:
    """A random `PaliGemmaForConditionalGeneration` and its `PaliGemmaProcessor` (SigLIP PIL image processor),
    both saved by transformers."""
    import transformers
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    random_checkpoint.write_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(PALI_IMAGE, special=True, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    image_id = tok.token_to_id(PALI_IMAGE)
    config = json.loads((out / "tokenizer_config.json").read_text())
    flags = dict.fromkeys(("lstrip", "rstrip", "normalized", "single_word"), False)
    config["added_tokens_decoder"][str(image_id)] = {"content": PALI_IMAGE, "special": True, **flags}
    config["extra_special_tokens"] = {"image_token": PALI_IMAGE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    raw = paligemma_config(**overrides)
    raw["image_token_index"] = image_id
    config = transformers.PaliGemmaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    size, patch = raw["vision_config"]["image_size"], raw["vision_config"]["patch_size"]
    image_processor = transformers.SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5, 0.4, 0.3], image_std=[0.5, 0.6, 0.7],
        image_seq_length=(size // patch) ** 2,
    )  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    transformers.PaliGemmaProcessor(image_processor, tokenizer).save_pretrained(out)
    return out
