"""Gemma 4's routed expert block (26B-A4B), beside each layer's dense MLP (models/gemma.py):

    r       = RMSNorm_nw(h) * scale / sqrt(hidden)                 (no-weight norm of the residual stream h)
    p       = softmax(router(r))                                   float32, over num_experts
    w, idx  = topk(p, top_k);  w = w / sum(w) * per_expert_scale[idx]
    MoE(x)  = sum_j w_j * down_e(gelu_tanh(gate_e(x)) * up_e(x)),  e = idx_j; x is the block's own normed input

as transformers' Gemma4TextRouter / Gemma4TextExperts compute it. The graph evaluates every expert on every
token and weighs the unselected ones by exactly 0 (a dense routing-weight matrix): the routing is exact and
the graph has no data-dependent shapes, at num_experts / top_k times the expert FLOPs of a gathered kernel
(ONNX Runtime's com.microsoft MoE is not used: see the README's support table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma_export.models.layers import RMSNorm


class Router(nn.Module):
    """Token -> dense routing weights [..., num_experts]: the renormalised top-k probabilities, 0 elsewhere."""

    def __init__(self, hidden: int, experts: int, top_k: int, eps: float) -> None:
        super().__init__()
        self.top_k, self.hidden = top_k, hidden
        self.norm = RMSNorm(hidden, eps, scaled=False)
        self.proj = nn.Linear(hidden, experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scores = self.proj(self.norm(h) * self.scale * self.hidden**-0.5)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True) * self.per_expert_scale[index]
        return torch.zeros_like(probs).scatter(-1, index, top)


class Experts(nn.Module):
    """The experts' GeGLU MLPs as transformers stores them: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, experts: int, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.zeros(experts, hidden, width))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate, up = torch.einsum("...h,eih->...ei", x, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("...ei,ehi->...eh", F.gelu(gate, approximate="tanh") * up, self.down_proj)
        return (out * weights[..., None].to(out.dtype)).sum(dim=-2)
