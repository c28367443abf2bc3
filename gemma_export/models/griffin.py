"""RecurrentGemma (Griffin, De et al. 2024): residual blocks whose temporal mixing cycles through
(recurrent, recurrent, local attention).

    x_0      = embed(tokens) * sqrt(hidden)            (the scale rounded to bfloat16, as trained)
    residual block:  h  = x + Temporal(RMSNorm(x));   x' = h + MLP(RMSNorm(h))
    MLP      = down(gelu_tanh(gate(x)) * up(x))        (with biases)
    logits   = 30 * tanh(RMSNorm(x_L) @ embed^T / 30)

    Recurrent temporal block:
        y    = gelu_tanh(W_y x)
        u    = Conv1D_4(W_x x)                       causal, depthwise, with bias; never looks across a reset
        rglru(u):  gate_x = sigmoid(BlockDiag_x(u)),  gate_a = sigmoid(BlockDiag_a(u))
                   log_a  = -8 * gate_a * softplus(Lambda)
                   h_t    = a_t * h_{t-1} + sqrt(1 - a_t^2) * (u_t * gate_x_t)     (ai.gemma::RGLRU)
        out  = W_out(rglru(u) * y)

    Local attention block: multi-query attention over the last `window` tokens, RoPE on the first half of
    each head, through ai.gemma::Attention.

RMSNorm, MLP, RoPE, the soft-cap and the tied head are models/layers.py's, shared with models/gemma.py.

Decode state is constant in the sequence length: per recurrent layer the Conv1D's last (width - 1) inputs
and the RG-LRU state h (float32); per attention layer a key/value buffer of (window - 1) slots, plus one
mask saying which slots hold real tokens. A reset (position 0) starts a new document: the RG-LRU state and
the Conv1D's view of earlier tokens are cut there, as in google-deepmind/recurrentgemma; with left padding
this makes a padded row compute exactly what the row computes alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma_export.config.model_config import GriffinConfig
from gemma_export.errors import BadInput
from gemma_export.models.layers import MLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, softcap, tied_lm_head
from gemma_export.models.state import StateSpec
from gemma_export.ops import attention as _attention_op  # noqa: F401 - registers torch.ops.gemma.attention
from gemma_export.ops import rglru as _rglru_op  # noqa: F401 - registers torch.ops.gemma.rglru


def causal_conv1d(
    x: torch.Tensor,  # [batch, seq, width]
    tail: torch.Tensor,  # [batch, kernel - 1, width]: the inputs before x
    weight: torch.Tensor,  # [width, 1, kernel] (torch's depthwise Conv1d layout)
    bias: torch.Tensor,  # [width]
    document: torch.Tensor,  # [batch, seq] int64: 0 for the tail's document, +1 at every reset
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over [tail, x] that does not mix documents; returns (out, new tail).

    Unrolled over the kernel's taps (4), not over time: the graph's size is independent of the length.
    """
    kernel = weight.shape[-1]
    seq = x.shape[1]
    full = torch.cat((tail, x), dim=1)
    full_doc = torch.cat((torch.zeros_like(document[:, :1]).expand(-1, kernel - 1), document), dim=1)
    out = bias
    for k in range(kernel):  # tap k reads the input (kernel - 1 - k) steps back
        same_document = (full_doc[:, k : k + seq] == document)[:, :, None]
        out = out + full[:, k : k + seq] * weight[:, 0, k] * same_document
    # The tail carries only inputs of the current document: what came before a reset (padding, an earlier
    # document) must stay invisible on the next call too, even when the document is shorter than the tail.
    tail_doc = full_doc[:, -(kernel - 1) :] == document[:, -1:]
    return out, full[:, -(kernel - 1) :] * tail_doc[:, :, None]


class RGLRU(nn.Module):
    """Real-gated linear recurrent unit with block-diagonal gates (one block per head)."""

    def __init__(self, cfg: GriffinConfig) -> None:
        super().__init__()
        heads, block = cfg.num_attention_heads, cfg.lru_width // cfg.num_attention_heads
        self.recurrent_param = nn.Parameter(torch.zeros(cfg.lru_width))  # Lambda
        self.input_gate_weight = nn.Parameter(torch.zeros(heads, block, block))
        self.input_gate_bias = nn.Parameter(torch.zeros(heads, block))
        self.recurrent_gate_weight = nn.Parameter(torch.zeros(heads, block, block))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(heads, block))

    def forward(self, u: torch.Tensor, reset: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_x = torch.sigmoid(_block_diagonal(u, self.input_gate_weight, self.input_gate_bias))
        gate_a = torch.sigmoid(_block_diagonal(u, self.recurrent_gate_weight, self.recurrent_gate_bias))
        log_a = -8.0 * gate_a * F.softplus(self.recurrent_param)
        return torch.ops.gemma.rglru(u * gate_x, log_a, reset, h0)


def _block_diagonal(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads * block] -> per head x_h @ W_h + b_h."""
    heads, block = bias.shape
    xh = x.unflatten(-1, (heads, block))
    return (torch.einsum("bshi,hij->bshj", xh, weight) + bias).flatten(-2)


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: GriffinConfig) -> None:
        super().__init__()
        self.linear_y = nn.Linear(cfg.hidden_size, cfg.lru_width)
        self.linear_x = nn.Linear(cfg.hidden_size, cfg.lru_width)
        self.linear_out = nn.Linear(cfg.lru_width, cfg.hidden_size)
        # Only its parameters are used (by causal_conv1d), in torch's depthwise layout as checkpoints store them.
        self.conv_1d = nn.Conv1d(cfg.lru_width, cfg.lru_width, cfg.conv1d_width, groups=cfg.lru_width)
        self.rg_lru = RGLRU(cfg)

    def forward(
        self, x: torch.Tensor, reset: torch.Tensor, document: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        conv_tail, h0 = state
        y = F.gelu(self.linear_y(x), approximate="tanh")
        u, conv_tail = causal_conv1d(self.linear_x(x), conv_tail, self.conv_1d.weight, self.conv_1d.bias, document)
        lru, h = self.rg_lru(u, reset, h0)
        return self.linear_out(lru * y), (conv_tail, h)


class LocalAttention(nn.Module):
    def __init__(self, cfg: GriffinConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window, self.scale = cfg.attention_window_size, cfg.attention_scale
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,  # [batch, slots + seq]: the buffer's slots, then the new tokens
        state: tuple[torch.Tensor, torch.Tensor],  # key, value [batch, kv_heads, slots, head_dim]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # on the first half of each head
        slots = state[0].shape[2]
        k = torch.cat((state[0], k), dim=2)
        v = torch.cat((state[1], v), dim=2)
        out = torch.ops.gemma.attention(q, k, v, mask, self.scale, 0.0, self.window, True)
        out = self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))
        return out, (k[:, :, -slots:], v[:, :, -slots:])  # the buffer keeps the last (window - 1) tokens


class ResidualBlock(nn.Module):
    def __init__(self, cfg: GriffinConfig, layer: int) -> None:
        super().__init__()
        self.kind = cfg.block_types[layer]
        self.temporal_pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.temporal_block = RecurrentBlock(cfg) if self.kind == "recurrent" else LocalAttention(cfg)
        self.channel_pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp_block = MLP(cfg.hidden_size, cfg.intermediate_size // 2, bias=True)  # (HF stores 2x the width)


class GriffinModel(nn.Module):
    """RecurrentGemma with its tied LM head: token ids -> float32 logits and the new (constant-size) state."""

    mask_covers_past = False  # attention_mask covers the new tokens; the state carries the buffer's mask
    cache_layout = "windowed"  # its only layout: attention layers keep their window, recurrent layers a state

    def __init__(self, cfg: GriffinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(ResidualBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)compute the rotary frequencies, which are derived from the config, never loaded."""
        inv_freq = rope_inv_freq(self.cfg.rope_theta, int(self.cfg.head_dim * self.cfg.partial_rotary_factor))
        self.register_buffer("inv_freq", inv_freq.to(self.final_norm.weight.device), persistent=False)

    def use_cache_layout(self, layout: str) -> GriffinModel:
        if layout != self.cache_layout:
            raise BadInput(f"--cache-layout {layout!r}: RecurrentGemma's attention layers always keep only their "
                           "window (its state is constant in the length); use 'windowed'")  # fmt: skip
        return self

    @property
    def slots(self) -> int:
        return self.cfg.attention_window_size - 1

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq] int64
        attention_mask: torch.Tensor,  # [batch, seq] int64, 0 = padding
        position_ids: torch.Tensor,  # [batch, seq] int64; 0 starts a document
        state: list[torch.Tensor],  # as state_specs() lists them
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dtype = self.embed_tokens.weight.dtype
        normalizer = torch.tensor(self.cfg.hidden_size**0.5, dtype=torch.bfloat16).to(dtype)
        x = self.embed_tokens(input_ids) * normalizer
        reset = position_ids == 0
        document = torch.cumsum(reset.to(torch.int64), dim=1)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, dtype)
        *layer_state, past_mask = state
        mask = torch.cat((past_mask, attention_mask), dim=1)

        new_state: list[torch.Tensor] = []
        for layer, a, b in zip(self.layers, layer_state[0::2], layer_state[1::2], strict=True):
            normed = layer.temporal_pre_norm(x)
            if layer.kind == "recurrent":
                out, carried = layer.temporal_block(normed, reset, document, (a, b))
            else:
                out, carried = layer.temporal_block(normed, cos, sin, mask, (a, b))
            new_state.extend(carried)
            h = x + out
            x = h + layer.mlp_block(layer.channel_pre_norm(h))
        new_state.append(mask[:, -self.slots :])

        logits = softcap(tied_lm_head(self.final_norm(x), self.embed_tokens.weight), self.cfg.logits_soft_cap)
        return logits, new_state

    def state_specs(self) -> list[StateSpec]:
        cfg, dtype = self.cfg, self.embed_tokens.weight.dtype
        specs = []
        for i, kind in enumerate(cfg.block_types):
            if kind == "recurrent":
                specs += [
                    StateSpec(f"past_state.{i}.conv", f"present_state.{i}.conv",
                              ("batch", cfg.conv1d_width - 1, cfg.lru_width), dtype),
                    StateSpec(f"past_state.{i}.recurrent", f"present_state.{i}.recurrent",
                              ("batch", cfg.lru_width), torch.float32),
                ]  # fmt: skip
            else:
                shape = ("batch", cfg.num_key_value_heads, self.slots, cfg.head_dim)
                specs += [
                    StateSpec(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}", shape, dtype) for kv in ("key", "value")
                ]
        specs.append(StateSpec("past_attention_mask", "present_attention_mask", ("batch", self.slots), torch.int64))
        return specs
