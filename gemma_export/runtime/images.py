"""Image prompts: the processor's preprocessing and token layout (read from the manifest), and generation with
the vision graph's features. Pillow + numpy only: transformers' PIL-backend image processor is what this
reproduces (tests/pipeline/test_vision_artifact.py holds it to it), never a dependency.

    pixels   = normalize(rescale(resize(convert_rgb(image), (height, width), resample)))   channels first
    prompt   = each `<start_of_image>` -> "\\n\\n<start_of_image>" + mm_tokens x <image_soft_token>
               + "<end_of_image>\\n\\n"
    token_type_ids = 1 at the image tokens, 0 elsewhere (and 0 for every generated token)
    PaliGemma (`prompt_layout` paligemma, PaliGemmaProcessor): each `<image>` -> mm_tokens x <image>, then bos
    after the last image's tokens and "\\n" at the end; token_type_ids = 1 over the whole prompt (the
    prefix, bidirectional), 0 for every generated token (the suffix, causal)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.errors import BadInput
from gemma_export.runtime.session import GREEDY, Sampling, decode_loop, left_pad, positions, prefill_slices

RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read_processor(
    checkpoint_dir: Path, mm_tokens_per_image: int, image_token_id: int, *, prefix_window: int | None = None
) -> dict[str, Any]:
    """The checkpoint's image preprocessing and token layout (the manifest's `vision.preprocessing`), from its
    processor_config.json (transformers 5: `image_processor` inside) or preprocessor_config.json, and the
    image tokens from tokenizer_config.json. `prefix_window` (not None): a PaliGemma checkpoint; its value the
    longest prompt the artifact takes (0: any, since its decoder's blocks ignore the sliding window)."""
    import json

    def read(name: str) -> dict[str, Any]:
        path = Path(checkpoint_dir) / name
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: not a readable JSON file ({e})") from None
        return raw if isinstance(raw, dict) else {}

    processor = read("processor_config.json")
    image = processor.get("image_processor") or read("preprocessor_config.json")
    if not image:
        raise BadInput(f"{checkpoint_dir}: no image processor (processor_config.json or preprocessor_config.json)")
    if image.get("do_pan_and_scan"):
        raise BadInput(f"{checkpoint_dir}: do_pan_and_scan is not supported (one crop per image)")
    size = image.get("size") or {}
    if "height" not in size or "width" not in size:
        raise BadInput(f"{checkpoint_dir}: the image processor's size must give height and width, got {size}")
    tokenizer = read("tokenizer_config.json")
    special = tokenizer.get("extra_special_tokens")  # a dict, or a list beside top-level entries (transformers 5)
    special = special if isinstance(special, dict) else {}
    boi = special.get("boi_token") or tokenizer.get("boi_token") or "<start_of_image>"
    eoi = special.get("eoi_token") or tokenizer.get("eoi_token") or "<end_of_image>"
    image_token = special.get("image_token") or tokenizer.get("image_token") or "<image_soft_token>"
    paligemma = prefix_window is not None
    if paligemma:  # PaliGemmaProcessor: image_seq_length in the image processor, bos after the images
        image_token = special.get("image_token") or tokenizer.get("image_token") or "<image>"
        boi, eoi = image_token, ""
        mm_tokens_per_image = int(image.get("image_seq_length", mm_tokens_per_image))
    layout = {"prompt_layout": "paligemma", "bos_token": str(tokenizer.get("bos_token") or "<bos>"),
              "prefix_window": prefix_window} if paligemma else {}  # fmt: skip
    return {
        "size": [int(size["height"]), int(size["width"])],
        "resample": RESAMPLE_NAMES.get(int(image.get("resample", 2)), "bilinear"),
        "do_convert_rgb": bool(image.get("do_convert_rgb", True)),
        "do_rescale": bool(image.get("do_rescale", True)),
        "rescale_factor": float(image.get("rescale_factor", 1 / 255)),
        "do_normalize": bool(image.get("do_normalize", True)),
        "image_mean": [float(v) for v in image.get("image_mean", [0.5, 0.5, 0.5])],
        "image_std": [float(v) for v in image.get("image_std", [0.5, 0.5, 0.5])],
        "image_marker": boi,
        "image_sequence": ["", "", image_token, "", ""] if paligemma else ["\n\n", boi, image_token, eoi, "\n\n"],
        "mm_tokens_per_image": int(processor.get("image_seq_length", mm_tokens_per_image)),
        "image_token_id": image_token_id,
        **layout,
    }


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise BadInput(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"--image {path}: not a readable image ({str(e).splitlines()[0]})") from None


def pixel_values(images: Sequence[Any], pre: dict[str, Any]) -> np.ndarray:
    """[n, 3, height, width] float32, as transformers' PIL-backend image processor computes it."""
    from PIL import Image

    resample = {v: k for k, v in RESAMPLE_NAMES.items()}[pre["resample"]]
    height, width = pre["size"]
    out = []
    for image in images:
        if pre["do_convert_rgb"]:
            image = image.convert("RGB")
        x = np.array(image.resize((width, height), resample=Image.Resampling(resample)))
        x = x.transpose(2, 0, 1)  # channels first, as transformers processes them
        if pre["do_rescale"]:
            x = (x.astype(np.float64) * pre["rescale_factor"]).astype(np.float32)
        if pre["do_normalize"]:
            x = x.astype(np.float32)
            mean = np.array(pre["image_mean"], np.float32)[:, None, None]
            std = np.array(pre["image_std"], np.float32)[:, None, None]
            x = (x - mean) / std
        out.append(x.astype(np.float32))
    return np.stack(out)


def expand_prompt(text: str, pre: dict[str, Any]) -> str:
    """Each image marker becomes the full image sequence (the processor's `full_image_sequence`)."""
    before, boi, image_token, eoi, after = pre["image_sequence"]
    full = f"{before}{boi}{image_token * pre['mm_tokens_per_image']}{eoi}{after}"
    if pre.get("prompt_layout") == "paligemma":  # PaliGemmaProcessor.prepare_inputs_layout
        end = text.rfind(pre["image_marker"]) + len(pre["image_marker"])
        text = text[:end] + pre["bos_token"] + text[end:] + "\n"
    return text.replace(pre["image_marker"], full)


def generate_with_images(
    decoder,
    prompts: Sequence[Sequence[int]],
    features: np.ndarray,  # [images in row-major order, mm_tokens, hidden]: the vision graph's output
    image_token_id: int,
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    sampling: Sampling = GREEDY,
    prefix_lm: bool = False,
    window: int = 0,
) -> list[list[int]]:
    """`runtime.session.generate` with image features: each step feeds token_type_ids (past + new) and the
    feature rows of that step's image tokens (none after the prompt). `prefix_lm` (PaliGemma): the whole
    prompt is one bidirectional block (token_type_ids 1 over it). `window` (nonzero: the manifest's
    `prefix_window` of an artifact built before the op's blocks=2, whose graph bounds the block by the sliding
    window where transformers does not): the longest prompt that graph computes as transformers does."""
    ids, mask = left_pad(prompts, pad_id)
    pos = positions(mask)
    image = ((ids == image_token_id) & (mask != 0)).astype(np.int64)
    types = image
    if prefix_lm:
        longest = max((len(p) for p in prompts), default=0)
        if window and longest > window:
            raise BadInput(f"a PaliGemma prompt of {longest} tokens (image tokens included) is longer than the "
                           f"sliding window ({window}): this artifact's graph would cut its bidirectional prefix "
                           "(rebuild it: PaliGemma artifacts built now take prompts of any length)")  # fmt: skip
        types = (mask != 0).astype(np.int64)
    rows = features.reshape(-1, features.shape[-1]).astype(np.float32)
    if int(image.sum()) != len(rows):
        raise BadInput(f"{int(image.sum())} image tokens in the prompts but features for {len(rows)}")
    row_of = np.where(image == 1, image.reshape(-1).cumsum().reshape(image.shape) - 1, -1)  # feature row per token
    decoder.reserve(ids.shape[1] + max_new_tokens)
    cache = decoder.empty_cache(len(prompts))
    no_features = np.zeros((0, rows.shape[1]), np.float32)
    for cols in whole_blocks(prefill_slices(ids.shape[1], len(prompts), decoder.vocab_size), types):
        chunk = row_of[:, cols]
        extra = {"token_type_ids": types[:, : cols.stop], "image_features": rows[chunk[chunk >= 0]]}
        logits, cache = decoder.step(ids[:, cols], mask[:, : cols.stop], pos[:, cols], cache, logits_to_keep=1, **extra)

    def no_image(mask: np.ndarray) -> dict[str, np.ndarray]:  # decode steps: generated tokens are text
        return {"token_type_ids": np.zeros_like(mask), "image_features": no_features}

    return decode_loop(decoder, logits, cache, mask, pos, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                       sampling=sampling, step_inputs=no_image)  # fmt: skip


def whole_blocks(slices: list[slice], types: np.ndarray) -> list[slice]:
    """Prefill passes that never cut a bidirectional block (a run of token_type_ids 1 in some row): a block's
    first tokens must see its last ones, which a later pass would add only after they were computed. So a
    PaliGemma prompt (one block) is one pass whatever the logits budget; a Gemma 3 image is never split."""
    merged: list[slice] = []
    for cols in slices:
        start = cols.start
        if merged and start > 0 and bool((types[:, start - 1] & types[:, start]).any()):
            merged[-1] = slice(merged[-1].start, cols.stop)
        else:
            merged.append(cols)
    return merged


class OrtVision:
    """An image + text artifact's vision graph in an ONNX Runtime session: pixel_values -> image_features."""

    def __init__(self, artifact_dir: Path, manifest, threads: int = 0) -> None:
        import onnxruntime as ort

        from gemma_export.runtime.session import session_options

        if manifest.vision is None:
            raise BadInput(f"{artifact_dir}: a text-only artifact; it takes no --image")
        self.preprocessing = manifest.vision.preprocessing.model_dump()
        path = str(Path(artifact_dir) / manifest.files[manifest.vision.model].path)
        self.session = ort.InferenceSession(path, session_options(threads), providers=list(manifest.build.providers))

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """[num_images, mm_tokens_per_image, hidden] float32."""
        return self.session.run(["image_features"], {"pixel_values": pixels})[0]


def image_prompts(tokenizer, prompts: Sequence[str], image_paths: Sequence[Path], pre: dict[str, Any]):
    """(token ids per prompt, pixel_values of every image in order): the images go to the markers in order,
    prompt after prompt. Each prompt's markers must be matched by images, and every image by a marker."""
    marker = pre["image_marker"]
    counts = [p.count(marker) for p in prompts]
    if sum(counts) != len(image_paths):
        where = "the prompt has" if len(prompts) == 1 else "the prompts have"
        raise BadInput(f"{where} {sum(counts)} image marker(s) {marker} but {len(image_paths)} --image(s) were given: "
                       f"put one {marker} where each image goes")  # fmt: skip
    images = [load_image(Path(p)) for p in image_paths]
    ids = [enc.ids for enc in tokenizer.encode_batch([expand_prompt(p, pre) for p in prompts])]
    return ids, pixel_values(images, pre)


def run(
    artifact_dir: Path,
    *,
    prompts: list[str],
    images: list[Path],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    threads: int = 0,
) -> dict[str, Any]:
    """`gemma-export generate --image`: the Python runtime API of image prompts (runtime/generation.py's `run`
    with images)."""
    from gemma_export.manifest import Manifest
    from gemma_export.runtime.generation import load_tokenizer
    from gemma_export.runtime.session import OrtDecoder, check_prompts

    manifest = Manifest.read(artifact_dir)
    if manifest.vision is None:
        raise BadInput(f"{artifact_dir}: a text-only artifact; it takes no --image")
    if not prompts:
        raise BadInput("--image needs --prompt text with an image marker (not --token-ids)")
    cfg = manifest.model.config
    vision = OrtVision(artifact_dir, manifest, threads)
    pre = vision.preprocessing
    tokenizer = load_tokenizer(artifact_dir)
    batch, pixels = image_prompts(tokenizer, prompts, images, pre)
    check_prompts(batch, cfg.vocab_size, manifest.build.max_length, max_new_tokens)
    features = vision.encode(pixels) if len(pixels) else np.zeros((0, 0, cfg.hidden_size), np.float32)
    decoder = OrtDecoder(artifact_dir, manifest, threads=threads)
    new = generate_with_images(decoder, batch, features, pre["image_token_id"], max_new_tokens,
                               eos_ids=cfg.eos_token_ids, pad_id=cfg.pad_token_id, sampling=sampling,
                               prefix_lm=pre.get("prompt_layout") == "paligemma",
                               window=pre.get("prefix_window") or 0)  # fmt: skip
    outputs = [{"prompt_ids": p, "new_ids": t, "text": tokenizer.decode(t, skip_special_tokens=True)}
               for p, t in zip(batch, new, strict=True)]  # fmt: skip
    return {"artifact": str(artifact_dir), "images": [str(p) for p in images], "outputs": outputs}
