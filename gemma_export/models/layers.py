"""The layers every Gemma shares (GEMMA.md, "Shared by every member"), for models/gemma.py and models/griffin.py.

    RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * (1 + w)       in float32, whatever the input dtype
                   (Gemma 4: * w; its value norm has no w)
    MLP(x)       = down(gelu_tanh(gate(x)) * up(x))         GeGLU
    RoPE(x)      = x * cos(p f) + rotate_half(x) * sin(p f)  non-interleaved, on each head's first rotated channels
                   f_k = theta^(-2k / dim) / factor          (factor: linear scaling, Gemma 3's global layers)
                   f_k = 0 for k >= fraction * dim / 2       ("proportional" partial rotary, Gemma 4's global layers)
    softcap(x)   = cap * tanh(x / cap)                      (cap > 0; no cap otherwise)
    logits       = x @ embedding^T                          the LM head tied to the input embedding, float32

Module and parameter names are the checkpoints' (`gate_proj`, `weight`, ...): they are the state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with Gemma's `(offset + weight)` scale (offset 1 up to Gemma 3, 0 on Gemma 4; `scaled=False`: no
    weight at all, Gemma 4's value norm), computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float, offset: float = 1.0, scaled: bool = True) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim)) if scaled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return xf.to(x.dtype)
        scale = self.weight.float() + self.offset if self.offset else self.weight.float()
        return (xf * scale).to(x.dtype)


class MLP(nn.Module):
    """The GeGLU feed-forward block, with the tanh approximation of GELU (Gemma: no biases; Griffin: biases)."""

    def __init__(self, hidden: int, width: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def rope_inv_freq(theta: float, dim: int, factor: float = 1.0, fraction: float = 1.0) -> torch.Tensor:
    """Inverse frequencies of the `dim` rotated channels (dim / 2 of them), with linear scaling by `factor`;
    with `fraction` < 1 only the first int(fraction * dim // 2) turn and the rest are 0, channels that the
    rotation leaves as they are (transformers' "proportional" RoPE: the exponents stay k / dim)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (theta**exponents)
    if fraction < 1.0:
        inv_freq[int(fraction * dim // 2) :] = 0.0
    return inv_freq / factor


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin tables [batch, seq, dim] for the rotate-half (non-interleaved) convention."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]. Rotates each head's first cos.shape[-1] channels (all of them, or
    RecurrentGemma's first half); the rest pass through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        rot, rest = x[..., :rotary], x[..., rotary:]
        return torch.cat((apply_rope(rot, cos, sin), rest), dim=-1)
    half = rotary // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): x bounded smoothly to (-cap, cap); cap <= 0 leaves x as it is."""
    return cap * torch.tanh(x / cap) if cap > 0 else x


def tied_lm_head(x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Float32 logits x @ embedding^T, written as a rank-2 linear so that the graph gets one Gemm(transB=1):
    no transposed copy of the (vocab x hidden) embedding, at run time or on disk (pipeline/graph_patterns.py
    finds it there)."""
    return F.linear(x.reshape(-1, x.shape[-1]), embedding).reshape(*x.shape[:-1], -1).float()


class PerLayerInputs(nn.Module):
    """Gemma 4's per-layer embeddings (PLE), computed once for all layers from the token ids and x_0:

        ple = (Norm(reshape(proj(x_0) / sqrt(hidden))) + reshape(table[tokens] * sqrt(width))) / sqrt(2)

    reshaped to [batch, seq, layers, width]; layer l reads ple[:, :, l]. EmbeddingGemma 2 has no table
    (vocab 0): ple = Norm(reshape(proj(x_0) / sqrt(hidden))) alone. Only Gemma 4-style models have it, whose
    norms scale by w (offset 0). Checkpoint names: embed_tokens_per_layer, per_layer_model_projection,
    per_layer_projection_norm (models/gemma.py's CHECKPOINT_RENAMES)."""

    def __init__(self, vocab: int, hidden: int, layers: int, width: int, eps: float) -> None:
        super().__init__()
        self.layers, self.width, self.hidden = layers, width, hidden
        self.embed = nn.Embedding(vocab, layers * width) if vocab else None
        self.projection = nn.Linear(hidden, layers * width, bias=False)
        self.norm = RMSNorm(width, eps, offset=0.0)

    def forward(self, input_ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        shape = (*input_ids.shape, self.layers, self.width)
        context = self.norm((self.projection(x0) * self.hidden**-0.5).reshape(shape))
        if self.embed is None:
            return context
        tokens = self.embed(input_ids) * torch.tensor(self.width**0.5, dtype=self.embed.weight.dtype)
        return (context + tokens.reshape(shape)) * 2.0**-0.5


class PerLayerGate(nn.Module):
    """A layer's share of the per-layer embeddings, added to its output: Norm(proj(gelu_tanh(gate(x)) * ple_l)).
    Checkpoint names: per_layer_input_gate, per_layer_projection, post_per_layer_input_norm."""

    def __init__(self, hidden: int, width: int, eps: float) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.projection = nn.Linear(width, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps, offset=0.0)

    def forward(self, x: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        return self.norm(self.projection(F.gelu(self.gate(x), approximate="tanh") * per_layer_input))
