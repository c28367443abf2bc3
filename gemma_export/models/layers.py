"""The layers every Gemma shares (GEMMA.md, "Shared by every member"), for models/gemma.py and models/griffin.py.

    RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * (1 + w)       in float32, whatever the input dtype
    MLP(x)       = down(gelu_tanh(gate(x)) * up(x))         GeGLU
    RoPE(x)      = x * cos(p f) + rotate_half(x) * sin(p f)  non-interleaved, on each head's first rotated channels
                   f_k = theta^(-2k / dim) / factor          (factor: linear scaling, Gemma 3's global layers)
    softcap(x)   = cap * tanh(x / cap)                      (cap > 0; no cap otherwise)
    logits       = x @ embedding^T                          the LM head tied to the input embedding, float32

Module and parameter names are the checkpoints' (`gate_proj`, `weight`, ...): they are the state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with Gemma's `(1 + weight)` scale, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class MLP(nn.Module):
    """The GeGLU feed-forward block, with the tanh approximation of GELU (Gemma: no biases; Griffin: biases)."""

    def __init__(self, hidden: int, width: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def rope_inv_freq(theta: float, dim: int, factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies of the `dim` rotated channels (dim / 2 of them), with linear scaling by `factor`."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents) / factor


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
