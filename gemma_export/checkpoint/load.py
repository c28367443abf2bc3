"""Load stage: a checkpoint folder -> (config, reference PyTorch model with its weights)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gemma_export.checkpoint.files import read_tensors, select_weights
from gemma_export.config.model_config import WEIGHT_PREFIXES, GemmaConfig, GriffinConfig, load_config
from gemma_export.errors import BadInput
from gemma_export.models.embedding import EmbeddingGemma, HeadConfig, is_sentence_transformers_folder, read_head
from gemma_export.models.gemma import CHECKPOINT_RENAMES, GemmaModel
from gemma_export.models.griffin import GriffinModel

Decoder = GemmaModel | GriffinModel

# Tensors a checkpoint may carry that the text decoder does not use: the (tied) LM head, and the vision
# tower and projector of a multimodal Gemma 3.
IGNORED_PREFIXES = (
    "lm_head.",
    "vision_tower.",
    "multi_modal_projector.",
    "audio_tower.",  # Gemma 4's audio encoder and its projectors
    "embed_vision.",
    "embed_audio.",
    "vision_embedder.",  # Gemma 4 unified's image-patch embedder (it has no vision tower)
)


def load_model(
    checkpoint_dir: Path, dtype: torch.dtype = torch.float32, *, allow_pickle: bool = False
) -> tuple[GemmaConfig | GriffinConfig, Decoder]:
    """`allow_pickle`: read pickled weights (`pytorch_model.bin`, ...) with torch.load(weights_only=True)."""
    cfg = load_config(checkpoint_dir)
    if is_sentence_transformers_folder(checkpoint_dir) or is_embedding_config(cfg):
        raise BadInput(f"{checkpoint_dir}: a sentence-transformers (embedding) folder; it builds an encoder")
    with torch.device("meta"):
        model = GriffinModel(cfg) if isinstance(cfg, GriffinConfig) else GemmaModel(cfg)
    return cfg, _load_weights(checkpoint_dir, cfg, model, dtype, allow_pickle=allow_pickle)


def _load_weights(
    checkpoint_dir: Path,
    cfg: GemmaConfig | GriffinConfig,
    model: Decoder,
    dtype: torch.dtype = torch.float32,
    *,
    allow_pickle: bool = False,
) -> Decoder:
    """Fill a meta-device model with the checkpoint's (memory-mapped) tensors, validated by name and shape."""
    tensors = read_tensors(checkpoint_dir, allow_pickle=allow_pickle)
    tensors = {name: t for name, t in tensors.items() if not _unused_shared_kv(name, cfg)}
    renames = CHECKPOINT_RENAMES.get(cfg.model_type, {})
    to_checkpoint = {name: _rename(name, renames) for name, _ in model.named_parameters()}
    expected = {to_checkpoint[name]: (tuple(p.shape), None) for name, p in model.named_parameters()}
    found = select_weights(
        tensors, expected, WEIGHT_PREFIXES, source=str(checkpoint_dir), ignore_prefixes=IGNORED_PREFIXES
    )
    state = {name: found[ckpt].to(dtype) for name, ckpt in to_checkpoint.items()}
    model.load_state_dict(state, strict=True, assign=True)  # the meta model takes the tensors as they are
    model.init_rope()
    return model.eval()


def is_embedding_config(cfg: GemmaConfig | GriffinConfig) -> bool:
    """An encoder checkpoint that is not a sentence-transformers folder (EmbeddingGemma 2)."""
    return isinstance(cfg, GemmaConfig) and cfg.model_type == "embedding_gemma2_text"


def is_embedding_folder(folder: Path) -> bool:
    """What `build` exports as an encoder: a sentence-transformers folder, or an EmbeddingGemma 2 checkpoint."""
    if is_sentence_transformers_folder(folder):
        return True
    config = Path(folder) / "config.json"
    return config.is_file() and is_embedding_config(load_config(folder))


def _unused_shared_kv(name: str, cfg: GemmaConfig | GriffinConfig) -> bool:
    """A Gemma 4 KV-shared layer's key/value projections and norms: checkpoints may carry them, transformers
    ignores them (`_keys_to_ignore_on_load_unexpected`), and so do we."""
    if not isinstance(cfg, GemmaConfig) or not cfg.num_kv_shared_layers:
        return False
    match = _SHARED_KV_TENSOR.search(name)
    return match is not None and not cfg.produces_kv(int(match.group(1)))


_SHARED_KV_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:k_proj|v_proj|k_norm|v_norm)\.")


def _rename(name: str, renames: dict[str, str]) -> str:
    name = "." + name  # a module at the top (Gemma 4's per_layer_inputs) matches as one deeper does
    for ours, theirs in renames.items():
        name = name.replace(f".{ours}.", f".{theirs}.")
    return name[1:]


def load_embedding(
    folder: Path, dim: int | None = None, *, allow_pickle: bool = False
) -> tuple[GemmaConfig, HeadConfig, EmbeddingGemma]:
    """A sentence-transformers EmbeddingGemma folder, or an EmbeddingGemma 2 checkpoint (whose head is mean
    pooling and normalisation over its projected token states) -> (backbone config, head, model truncated to
    `dim`)."""
    cfg = load_config(folder)
    if isinstance(cfg, GemmaConfig) and cfg.model_type == "embedding_gemma2_text":
        st = is_sentence_transformers_folder(folder)
        head = read_head(folder, cfg.embedding_dim) if st else HeadConfig(dense=(), normalize=True)
    elif not isinstance(cfg, GemmaConfig) or cfg.model_type != "gemma3_text":
        raise BadInput(f"{folder}: a sentence-transformers folder must hold a gemma3_text backbone")
    else:
        head = read_head(folder, cfg.hidden_size)
    model = EmbeddingGemma(cfg, head, dim or head.full_dim or cfg.embedding_dim or cfg.hidden_size)
    backbone = _load_weights(folder, cfg, model.backbone, allow_pickle=allow_pickle)
    model.backbone = backbone
    for spec, layer in zip(head.dense, model.dense, strict=True):
        expected = {"linear.weight": ((spec.out_features, spec.in_features), None)}
        if spec.bias:
            expected["linear.bias"] = ((spec.out_features,), None)
        found = select_weights(
            read_tensors(folder / spec.path, allow_pickle=allow_pickle),
            expected,
            ("",),
            source=str(folder / spec.path),
            anchor="linear.weight",
        )
        layer.weight.data = found["linear.weight"].float()
        if spec.bias:
            layer.bias.data = found["linear.bias"].float()
    return cfg, head, model.eval()


def load_vision(checkpoint_dir: Path, dtype: torch.dtype = torch.float32, *, allow_pickle: bool = False):
    """A multimodal checkpoint's vision tower and projector (models/siglip.py), its weights validated by name and
    shape; the text decoder's and the tower's unused head (`vision_tower.head.`) are left to their readers."""
    from gemma_export.config.model_config import read_json
    from gemma_export.models.siglip import VisionConfig, VisionModel, checkpoint_name

    raw = read_json(checkpoint_dir / "config.json")
    cfg = VisionConfig.from_checkpoint(raw if isinstance(raw, dict) else {}, str(checkpoint_dir / "config.json"))
    with torch.device("meta"):
        model = VisionModel(cfg)
    tensors = read_tensors(checkpoint_dir, allow_pickle=allow_pickle)
    # published files nest the tower one level deeper (`vision_tower.vision_model.encoder...`): drop that level
    tensors = {
        k.replace("vision_tower.vision_model.", "vision_tower."): v
        for k, v in tensors.items()
        if "vision_tower." in k or "multi_modal_projector." in k
    }  # the text decoder's are load_model's
    to_checkpoint = {name: checkpoint_name(name) for name, _ in model.named_parameters()}
    expected = {to_checkpoint[name]: (tuple(p.shape), None) for name, p in model.named_parameters()}
    found = select_weights(
        tensors,
        expected,
        ("model.", ""),
        source=str(checkpoint_dir),
        ignore_prefixes=("vision_tower.head.",),
        anchor="vision_tower.embeddings.patch_embedding.weight",
    )
    model.load_state_dict({n: found[c].to(dtype) for n, c in to_checkpoint.items()}, strict=True, assign=True)
    return cfg, model.eval()


def unexported_parts(checkpoint_dir: Path) -> list[str]:
    """What a text artifact of a multimodal checkpoint without an image path of ours leaves out: its `vision` and
    `audio` inputs (Gemma 4's encoders, Gemma 4 unified's patch and frame embedders), as its config.json declares
    them. The build logs it and the manifest records it (`model.not_exported`); [] for anything else."""
    from gemma_export.config.model_config import MULTIMODAL, read_json

    path = checkpoint_dir / "config.json"
    raw = read_json(path) if path.is_file() else None
    if not isinstance(raw, dict) or raw.get("model_type") not in MULTIMODAL or has_vision(checkpoint_dir):
        return []
    return [part for part in ("vision", "audio") if isinstance(raw.get(f"{part}_config"), dict)]


def has_vision(checkpoint_dir: Path) -> bool:
    """A multimodal Gemma 3 or PaliGemma folder (config.json with a `vision_config`): it builds a vision
    artifact."""
    from gemma_export.config.model_config import read_json

    path = checkpoint_dir / "config.json"
    raw = read_json(path) if path.is_file() else None
    return (
        isinstance(raw, dict)
        and raw.get("model_type") in ("gemma3", "paligemma")
        and isinstance(raw.get("vision_config"), dict)
    )


def load_multimodal(checkpoint_dir: Path, *, allow_pickle: bool = False):
    """A multimodal Gemma 3 or PaliGemma folder -> (text config, vision config, vision model, multimodal
    decoder); PaliGemma's decoder counts positions from 1 and lets its prefix see itself past the sliding
    window (models/multimodal.py)."""
    from gemma_export.config.model_config import read_json
    from gemma_export.models.multimodal import Gemma3MultimodalDecoder
    from gemma_export.ops.visibility import BLOCKS_IN_WINDOW, BLOCKS_PAST_WINDOW

    cfg, decoder = load_model(checkpoint_dir, allow_pickle=allow_pickle)
    vision_cfg, vision = load_vision(checkpoint_dir, allow_pickle=allow_pickle)
    raw = read_json(checkpoint_dir / "config.json")
    image_token_id = raw.get("image_token_id", raw.get("image_token_index"))
    if not isinstance(image_token_id, int):
        raise BadInput(f"{checkpoint_dir}/config.json: no integer image_token_index (or image_token_id)")
    paligemma = raw.get("model_type") == "paligemma"
    blocks = BLOCKS_PAST_WINDOW if paligemma else BLOCKS_IN_WINDOW
    return cfg, vision_cfg, vision, Gemma3MultimodalDecoder(decoder, image_token_id, position_offset=int(paligemma),
                                                            blocks=blocks)  # fmt: skip
