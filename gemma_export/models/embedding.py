"""EmbeddingGemma: the Gemma 3 backbone (EmbeddingGemma 2: a Gemma 4-style one, models/gemma.py, whose token
states are already projected to its embedding width), bidirectional, under a sentence-transformers head
(EmbeddingGemma 2 without a folder: mean pooling and Normalize, as its model card describes).

    h          = Gemma3(tokens), every layer bidirectional: keys j visible to query i when |i - j| < W on
                 local layers (W = sliding_window // 2 + 1, as transformers sets it), all on global ones
    pooled     = sum_i mask_i h_i / sum_i mask_i                         (mean over real tokens)
    e          = Dense_k(... Dense_1(pooled))                            (from the folder's module configs)
    e          = e / |e|                                                  (Normalize)
    embedding  = e[:dim] / |e[:dim]|                                      (Matryoshka truncation, dim < full)

The head is read from the folder (`modules.json` and each module's config), never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma_export.config.model_config import GemmaConfig, read_json
from gemma_export.errors import BadInput
from gemma_export.models.gemma import GemmaModel

TRANSFORMER, POOLING, DENSE, NORMALIZE = "Transformer", "Pooling", "Dense", "Normalize"
IDENTITY_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.Identity", "Identity")


@dataclass(frozen=True)
class DenseSpec:
    path: str  # the module's folder, e.g. 2_Dense
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class HeadConfig:
    """What the sentence-transformers folder says about pooling, the Dense stack and normalisation."""

    dense: tuple[DenseSpec, ...]
    normalize: bool
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None

    @property
    def full_dim(self) -> int:
        return self.dense[-1].out_features if self.dense else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "pooling": "mean",
            "dense": [vars(d) for d in self.dense],
            "normalize": self.normalize,
            "prompts": self.prompts,
            "default_prompt_name": self.default_prompt_name,
            "max_seq_length": self.max_seq_length,
        }


def is_sentence_transformers_folder(folder: Path) -> bool:
    return (Path(folder) / "modules.json").is_file()


def read_head(folder: Path, hidden_size: int) -> HeadConfig:
    """Parse modules.json and the module configs; anything we do not reproduce exactly is refused."""
    folder = Path(folder)
    modules = read_json(folder / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise BadInput(f"{folder / 'modules.json'}: expected a non-empty list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[0] != TRANSFORMER or (len(kinds) > 1 and kinds[1] != POOLING):
        raise BadInput(f"{folder / 'modules.json'}: expected Transformer then Pooling first, got {kinds}")
    dense: list[DenseSpec] = []
    normalize = False
    width = hidden_size
    for module, kind in zip(modules[1:], kinds[1:], strict=True):
        path = folder / module.get("path", "")
        if kind == POOLING:
            _check_pooling(path / "config.json")
        elif kind == DENSE:
            if normalize:
                raise BadInput(f"{path}: a Dense module after Normalize is not supported")
            spec = _read_dense(path, module.get("path", ""))
            if spec.in_features != width:
                raise BadInput(f"{path / 'config.json'}: in_features {spec.in_features} != previous width {width}")
            dense.append(spec)
            width = spec.out_features
        elif kind == NORMALIZE:
            normalize = True
        else:
            raise BadInput(f"{folder / 'modules.json'}: unsupported sentence-transformers module {kind!r}")
    st_config = read_json(folder / "config_sentence_transformers.json") if (
        folder / "config_sentence_transformers.json").is_file() else {}  # fmt: skip
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise BadInput(f"{folder / 'config_sentence_transformers.json'}: 'prompts' must map names to strings")
    bert = read_json(folder / "sentence_bert_config.json") if (folder / "sentence_bert_config.json").is_file() else {}
    return HeadConfig(
        dense=tuple(dense),
        normalize=normalize,
        prompts=dict(prompts),
        default_prompt_name=st_config.get("default_prompt_name"),
        max_seq_length=bert.get("max_seq_length"),
    )


def _check_pooling(path: Path) -> None:
    cfg = read_json(path)
    # sentence-transformers 6 writes {"pooling_mode": "mean"}; 5 and the published folders write flags.
    mode = cfg.get("pooling_mode")
    if mode is None:
        flags = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        mode = flags[0] if len(flags) == 1 else ",".join(flags)
    if mode not in ("mean", "mean_tokens"):
        raise BadInput(f"{path}: pooling mode {mode!r} is not supported (EmbeddingGemma uses mean pooling)")
    if cfg.get("include_prompt", True) is False:
        raise BadInput(f"{path}: include_prompt=false is not supported (EmbeddingGemma pools the prompt too)")


def _read_dense(path: Path, name: str) -> DenseSpec:
    cfg = read_json(path / "config.json")
    activation = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if activation not in IDENTITY_ACTIVATIONS:
        raise BadInput(f"{path / 'config.json'}: activation {activation!r} is not supported (only Identity)")
    try:
        return DenseSpec(name, int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg.get("bias", True)))
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{path / 'config.json'}: bad Dense config ({e})") from None


class EmbeddingGemma(nn.Module):
    """(input_ids, attention_mask) -> (sentence_embedding [batch, dim], token_embeddings [batch, seq, hidden])."""

    def __init__(self, cfg: GemmaConfig, head: HeadConfig, dim: int) -> None:
        super().__init__()
        if not cfg.use_bidirectional_attention:
            raise BadInput("an EmbeddingGemma backbone must set use_bidirectional_attention: true in config.json")
        width = head.full_dim or cfg.embedding_dim or cfg.hidden_size  # EmbeddingGemma 2 projects in the backbone
        if not 0 < dim <= width:
            raise BadInput(f"--dim {dim} must be between 1 and {width}")
        self.cfg, self.head, self.dim = cfg, head, dim
        self.backbone = GemmaModel(cfg)
        self.dense = nn.ModuleList(nn.Linear(d.in_features, d.out_features, bias=d.bias) for d in head.dense)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)  # as transformers: 0..seq-1
        no_cache = [t for spec in self.backbone.state_specs() for t in [spec.empty(batch)]]
        tokens, _ = self.backbone.hidden_states(input_ids, attention_mask, positions, no_cache)
        mask = attention_mask[:, :, None].to(tokens.dtype)
        e = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        for dense in self.dense:
            e = dense(e)
        if self.head.normalize:
            e = F.normalize(e, p=2, dim=-1)
        if self.dim < e.shape[-1]:  # Matryoshka: the leading dims are trained to stand alone
            e = F.normalize(e[:, : self.dim], p=2, dim=-1)
        return e.float(), tokens.float()
