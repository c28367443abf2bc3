"""The SigLIP vision tower and Gemma 3's multimodal projector: pixels -> soft tokens in the text embedding space.

    x_0      = Conv(patch, stride patch)(pixels) flattened to [n, P, width] + pos_embed      (P = (size/patch)^2)
    h        = x + Attn(LN1(x))                     bidirectional multi-head attention, biased q/k/v/out
    x'       = h + fc2(gelu_tanh(fc1(LN2(h))))      LN: LayerNorm with bias
    tower    = LN_post(x_L)                         [n, P, width]
    Gemma 3 projector (`Gemma3MultiModalProjector`):
    tokens   = AvgPool(k = side / sqrt(mm_tokens))(tower as a side x side grid)  -> [n, mm_tokens, width]
    features = RMSNorm(1 + w)(tokens) @ W           W: [width, text hidden]; no sqrt(hidden) scale is applied
    PaliGemma projector (`PaliGemmaMultiModalProjector`): every patch is a soft token (mm_tokens = patches)
    features = tower @ W + b                        W: [width, projection_dim]; no scale either (transformers 5
                                                    scales text embeddings in the lookup, not image features)

The attention is the one custom op (`torch.ops.gemma.attention`, causal=0, no window, every key real), so the
vision graph carries `ai.gemma::Attention` nodes like the decoder's and runs wherever it does.
Sizes come from the checkpoint's `vision_config` and `mm_tokens_per_image`: nothing here assumes 896 px.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma_export.errors import BadInput
from gemma_export.models.layers import RMSNorm
from gemma_export.ops import attention as _attention_op  # noqa: F401 - registers torch.ops.gemma.attention


@dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision tower (the checkpoint's `vision_config`) and the projector into the text model."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_eps: float
    num_channels: int
    text_hidden_size: int
    mm_tokens_per_image: int
    projector: str = "gemma3"  # gemma3: avg-pool + RMSNorm + matmul; paligemma: linear with bias

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any], source: str) -> VisionConfig:
        """From a multimodal config.json (`model_type` gemma3 or paligemma): its `vision_config` and
        `text_config` (PaliGemma: `projection_dim`, one soft token per patch)."""
        vision, text = raw.get("vision_config"), raw.get("text_config") or {}
        paligemma = raw.get("model_type") == "paligemma"
        if paligemma and isinstance(vision, dict):  # published PaliGemma configs leave out SigLIP's defaults
            vision = {"image_size": 224, "patch_size": 16, **vision}  # (SiglipVisionConfig's, as transformers reads)
        if not isinstance(vision, dict):
            raise BadInput(f"{source}: no 'vision_config' object (a text-only checkpoint)")
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise BadInput(f"{source}: vision_config.hidden_act {act!r} is not supported (gelu_pytorch_tanh)")
        try:
            cfg = cls(
                image_size=int(vision["image_size"]),
                patch_size=int(vision["patch_size"]),
                hidden_size=int(vision["hidden_size"]),
                intermediate_size=int(vision["intermediate_size"]),
                num_hidden_layers=int(vision["num_hidden_layers"]),
                num_attention_heads=int(vision["num_attention_heads"]),
                layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
                num_channels=int(vision.get("num_channels", 3)),
                text_hidden_size=int(
                    raw.get("projection_dim", text.get("hidden_size", 2048)) if paligemma else text["hidden_size"]
                ),
                mm_tokens_per_image=(int(vision["image_size"]) // int(vision["patch_size"])) ** 2
                if paligemma
                else int(raw.get("mm_tokens_per_image", 256)),
                projector="paligemma" if paligemma else "gemma3",
            )
        except KeyError as e:
            raise BadInput(f"{source}: vision_config lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise BadInput(f"{source}: vision_config has a value of the wrong type ({e})") from None
        side, tokens = cfg.patches_per_side, math.isqrt(cfg.mm_tokens_per_image)
        if tokens * tokens != cfg.mm_tokens_per_image or side % max(tokens, 1):
            raise BadInput(f"{source}: mm_tokens_per_image {cfg.mm_tokens_per_image} does not pool a "
                           f"{side}x{side} patch grid evenly")  # fmt: skip
        return cfg


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        width = cfg.hidden_size
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, every_key: torch.Tensor) -> torch.Tensor:
        n, patches, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, patches, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = torch.ops.gemma.attention(q, k, v, every_key, self.head_dim**-0.5, 0.0, 0, False)
        return self.out_proj(out.transpose(1, 2).reshape(n, patches, width))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, every_key: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.layer_norm1(x), every_key)
        return h + self.mlp(self.layer_norm2(h))


class SiglipVisionTower(nn.Module):
    """pixel_values [n, channels, size, size] -> the post-layernormed patch states [n, patches, width]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2) + self.position_embedding.weight
        every_key = torch.ones(x.shape[:2], dtype=torch.int64)  # no padding among patches
        for layer in self.layers:
            x = layer(x, every_key)
        return self.post_layernorm(x)


class Gemma3Projector(nn.Module):
    """Patch states -> `mm_tokens_per_image` soft tokens of the text model's width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.side = cfg.patches_per_side
        self.kernel = self.side // math.isqrt(cfg.mm_tokens_per_image)
        self.mm_soft_emb_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(cfg.hidden_size, cfg.text_hidden_size))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        n, _, width = states.shape
        grid = states.transpose(1, 2).reshape(n, width, self.side, self.side)
        tokens = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return self.mm_soft_emb_norm(tokens) @ self.mm_input_projection_weight


class PaliGemmaProjector(nn.Module):
    """Patch states -> one soft token per patch, of the text model's width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.hidden_size, cfg.text_hidden_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(states)


PROJECTORS = {"gemma3": Gemma3Projector, "paligemma": PaliGemmaProjector}


class VisionModel(nn.Module):
    """The vision graph: pixel_values [num_images, channels, size, size] float32 ->
    image_features [num_images, mm_tokens_per_image, text hidden] float32."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionTower(cfg)
        self.multi_modal_projector = PROJECTORS[cfg.projector](cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower(pixel_values))


def checkpoint_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (without the outer prefix `model.`, which files.py handles):
    transformers keeps the tower's modules under `vision_tower.vision_model.embeddings` / `.encoder.layers`
    (older files) or `vision_tower.embeddings` (transformers 5's save)."""
    for ours, theirs in (("vision_tower.patch_", "vision_tower.embeddings.patch_"),
                         ("vision_tower.position_", "vision_tower.embeddings.position_"),
                         ("vision_tower.layers.", "vision_tower.encoder.layers.")):  # fmt: skip
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name
