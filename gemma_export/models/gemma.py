"""Gemma 1, 2 and 3 (text) decoders as one model; the generations differ only in `GemmaConfig`.

    x_0   = embed(tokens) * sqrt(hidden)                      (scale rounded to the compute dtype, as HF does)
    h     = x + PostAttnNorm(Attention(InputNorm(x)))         (PostAttnNorm: Gemma 2/3; identity for Gemma 1)
    x'    = h + PostFFNorm(MLP(PreFFNorm(h)))                 (PostFFNorm:   Gemma 2/3; identity for Gemma 1)
    MLP   = down(gelu_tanh(gate(x)) * up(x))
    Norm  = x / rms(x) * (1 + w), in float32
    Attention: q, k (RMSNorm per head on Gemma 3) -> RoPE (per-layer-type base and linear scaling) ->
               softcap(q.k * scale) -> mask (causal, window on local layers, padding) -> softmax -> v
    logits = softcap(Norm(x_L) @ embed^T)                     (softcap: Gemma 2), in float32

Norm, MLP, RoPE, softcap and the tied head are models/layers.py's (RecurrentGemma shares them). Attention
itself is the custom op `torch.ops.gemma.attention` (gemma_export/ops/attention.py; its mask is
ops/visibility.py's rule), so the ONNX graph carries one `ai.gemma::Attention` node per layer.

KV cache layouts (`CACHE_LAYOUTS`, chosen with `GemmaModel.use_cache_layout`):
    full      every layer's key/value cache grows by the new tokens (past + new positions)
    windowed  a sliding-window layer keeps a fixed buffer of its (window - 1) most recent positions, all that a
              later query can see (it sees `window` keys, itself included); global layers grow. As in
              RecurrentGemma (models/griffin.py): slots before the first token are zeros and masked. The
              buffer's mask is not carried: it is the attention mask's columns of those positions (zeros before
              the first), and the attention mask spans the whole past anyway for the global layers.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma_export.config.model_config import GemmaConfig
from gemma_export.errors import BadInput
from gemma_export.models.layers import MLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, softcap, tied_lm_head
from gemma_export.models.state import StateSpec
from gemma_export.ops import attention as _attention_op  # noqa: F401 - registers torch.ops.gemma.attention

CACHE_LAYOUTS = ("full", "windowed")


def cache_slots(cfg: GemmaConfig, layer: int, layout: str) -> int | None:
    """Positions a layer's key/value buffer holds between calls, or None when its cache grows with the context."""
    window = cfg.window_of(layer)
    return window - 1 if layout == "windowed" and window > 0 else None


def kv_cache_bytes(cfg: GemmaConfig, context: int, batch: int = 1, layout: str = "full", itemsize: int = 4) -> int:
    """Bytes of the carried key/value state after `context` tokens (float32: itemsize 4), as `state_specs` lays
    it out: a windowed layer's buffer has its fixed size whatever the context."""
    if layout not in CACHE_LAYOUTS:
        raise BadInput(f"cache layout {layout!r} is not one of: {', '.join(CACHE_LAYOUTS)}")
    per_position = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * itemsize  # a key and a value
    slots = (cache_slots(cfg, i, layout) for i in range(cfg.num_hidden_layers))
    return sum(per_position * (context if s is None else s) for s in slots)


def buffer_mask(attention_mask: torch.Tensor, seq: int, slots: int) -> torch.Tensor:
    """Mask [batch, slots + seq] of a windowed layer's keys: its buffer (the `slots` positions before the new
    tokens; zeros before the first token) then the new tokens. attention_mask: [batch, past + seq]."""
    padded = torch.cat((attention_mask.new_zeros(attention_mask.shape[0], slots), attention_mask), dim=1)
    return padded[:, attention_mask.shape[1] - seq :]


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcapping
        self.window = cfg.window_of(layer)
        self.causal = not cfg.use_bidirectional_attention
        self.blocks = False  # the mask may name image blocks (values >= 2): models/multimodal.py sets it
        self.slots: int | None = None  # a windowed cache's buffer size; None: the cache grows (full layout)
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        norm = (lambda: RMSNorm(self.head_dim, cfg.rms_norm_eps)) if cfg.family.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
        out = torch.ops.gemma.attention(
            q, k, v, attention_mask, self.scale, self.softcap, self.window, self.causal, self.blocks
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        if self.slots is not None:  # keep the last `slots` positions (a slice that is empty when slots == 0)
            k, v = k[:, :, k.shape[2] - self.slots :], v[:, :, v.shape[2] - self.slots :]
        return self.o_proj(out), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

        post_norm = norm if cfg.family.post_norms else nn.Identity
        self.rope_kind = cfg.layer_types[layer]
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = post_norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.post_feedforward_layernorm = post_norm()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, past)
        h = x + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), present


class GemmaModel(nn.Module):
    """The decoder with its tied LM head: token ids -> float32 logits and the new KV cache."""

    mask_covers_past = True  # attention_mask spans past + new tokens

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache_layout = "full"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.init_rope()

    def use_cache_layout(self, layout: str) -> GemmaModel:
        """Choose how the key/value caches are carried (`CACHE_LAYOUTS`); the weights are unchanged."""
        if layout not in CACHE_LAYOUTS:
            raise BadInput(f"--cache-layout {layout!r} is not supported; choose one of: {', '.join(CACHE_LAYOUTS)}")
        if layout == "windowed" and not all(layer.self_attn.causal for layer in self.layers):
            raise BadInput("--cache-layout windowed needs causal attention (a bidirectional model has no cache)")
        self.cache_layout = layout
        for i, layer in enumerate(self.layers):
            layer.self_attn.slots = cache_slots(self.cfg, i, layout)
        return self

    def init_rope(self) -> None:
        """(Re)compute the rotary frequencies, which are derived from the config, never loaded."""
        for kind, rope in self.cfg.rope.items():
            inv_freq = rope_inv_freq(rope.theta, self.cfg.head_dim, rope.factor).to(self.norm.weight.device)
            self.register_buffer(f"inv_freq_{kind}", inv_freq, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq] int64
        attention_mask: torch.Tensor,  # [batch, past + seq] int64, 0 = padding
        position_ids: torch.Tensor,  # [batch, seq] int64
        state: list[torch.Tensor],  # per layer: key, value [batch, kv_heads, past, head_dim]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, presents = self.hidden_states(input_ids, attention_mask, position_ids, state)
        logits = softcap(tied_lm_head(x, self.embed_tokens.weight), self.cfg.final_logit_softcapping)
        return logits, presents

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        state: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final-normed hidden states [batch, seq, hidden] (what an encoder pools) and the new cache."""
        return self.run_layers(self.embed(input_ids), attention_mask, position_ids, state)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        dtype = self.embed_tokens.weight.dtype
        return self.embed_tokens(input_ids) * torch.tensor(self.cfg.hidden_size**0.5, dtype=dtype)

    def run_layers(
        self,
        x: torch.Tensor,  # [batch, seq, hidden]: the embedded tokens
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        state: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dtype = self.embed_tokens.weight.dtype
        tables = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), position_ids, dtype) for kind in self.cfg.rope}
        seq = x.shape[1]
        masks = {None: attention_mask}  # per buffer size (None: a growing cache), computed once
        for layer in self.layers:
            slots = layer.self_attn.slots
            if slots not in masks:
                masks[slots] = buffer_mask(attention_mask, seq, slots)
        presents: list[torch.Tensor] = []
        for layer, past_k, past_v in zip(self.layers, state[0::2], state[1::2], strict=True):
            cos, sin = tables[layer.rope_kind]
            x, present = layer(x, cos, sin, masks[layer.self_attn.slots], (past_k, past_v))
            presents.extend(present)
        return self.norm(x), presents

    def state_specs(self) -> list[StateSpec]:
        """Per layer a key and a value cache [batch, kv_heads, positions, head_dim]: growing along axis 2
        (past_sequence_length), or, for a windowed layer, a fixed buffer of its last (window - 1) positions."""
        cfg, dtype = self.cfg, self.embed_tokens.weight.dtype
        specs = []
        for i, layer in enumerate(self.layers):
            slots = layer.self_attn.slots
            shape = ("batch", cfg.num_key_value_heads, 0 if slots is None else slots, cfg.head_dim)
            grows = 2 if slots is None else None
            specs += [StateSpec(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", shape, dtype, grows=grows)
                      for kind in ("key", "value")]  # fmt: skip
        return specs


# Our module name -> the checkpoint's, where they differ: Gemma 1 calls its pre-MLP norm "post attention".
CHECKPOINT_RENAMES: dict[str, dict[str, str]] = {
    "gemma": {"pre_feedforward_layernorm": "post_attention_layernorm"},
    "gemma2": {},
    "gemma3_text": {},
}
