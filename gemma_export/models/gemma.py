"""Gemma 1, 2, 3 and 4 (text) decoders as one model; the generations differ only in `GemmaConfig`.

    x_0   = embed(tokens) * sqrt(hidden)                      (scale rounded to the compute dtype, as HF does)
    h     = x + PostAttnNorm(Attention(InputNorm(x)))         (PostAttnNorm: Gemma 2-4; identity for Gemma 1)
    x'    = h + PostFFNorm(FF(PreFFNorm(h)))                  (PostFFNorm:   Gemma 2-4; identity for Gemma 1)
    FF    = MLP                                                 (dense; Gemma 4 E-models: 2x wide on KV-shared layers)
          = Norm1(MLP(PreFFNorm(h))) + Norm2(MoE(PreFFNorm2(h)))  (Gemma 4 26B-A4B: the router reads h; models/moe.py)
    MLP   = down(gelu_tanh(gate(x)) * up(x))
    x''   = (x' + Norm(proj(gelu_tanh(gate(x')) * ple_l))) * s_l   (Gemma 4: per-layer embeddings ple_l, a
                                                                  loaded layer scalar s_l; layers.py's PerLayerInputs)
    Norm  = x / rms(x) * (1 + w), in float32                  (Gemma 4: * w)
    Attention: q, k (RMSNorm per head on Gemma 3/4) -> RoPE (per-layer-type base, linear scaling, Gemma 4's
               "proportional" partial rotation) -> softcap(q.k * scale) -> mask (causal, window on local layers,
               padding) -> softmax -> v.
               Gemma 4: scale 1; v = RMSNorm without weight (v_proj(x), or k_proj(x) before its norm and RoPE
               when k = v); head_dim and KV heads per layer (global layers wider, fewer KV heads); the last
               `num_kv_shared_layers` layers compute only q and attend to the keys/values of the last earlier
               layer of their type (`GemmaConfig.kv_source`), which alone carries a cache.
    logits = softcap(Norm(x_L) @ embed^T)                     (softcap: Gemma 2 and 4), in float32
    EmbeddingGemma 2 (an encoder, models/embedding.py): the Gemma 4 layers, bidirectional, per-layer embeddings
    from proj(x_0) alone, token states proj_e(Norm(x_L)) to `embedding_dim` instead of logits.

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
from gemma_export.models.layers import (
    MLP,
    PerLayerGate,
    PerLayerInputs,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    softcap,
    tied_lm_head,
)
from gemma_export.models.moe import Experts, Router
from gemma_export.models.state import StateSpec
from gemma_export.ops import attention as _attention_op  # noqa: F401 - registers torch.ops.gemma.attention

CACHE_LAYOUTS = ("full", "windowed")


def cache_slots(cfg: GemmaConfig, layer: int, layout: str) -> int | None:
    """Positions a layer's key/value buffer holds between calls, or None when its cache grows with the context."""
    window = cfg.window_of(layer)
    return window - 1 if layout == "windowed" and window > 0 else None


def kv_cache_bytes(
    cfg: GemmaConfig,
    context: int,
    batch: int = 1,
    layout: str = "full",
    itemsize: int = 4,
    shared: bool = True,
) -> int:
    """Bytes of the carried key/value state after `context` tokens (float32: itemsize 4), as `state_specs` lays
    it out: a windowed layer's buffer has its fixed size whatever the context. `shared=False`: as if every
    layer kept its own cache (what an exporter without Gemma 4's KV sharing stores)."""
    if layout not in CACHE_LAYOUTS:
        raise BadInput(f"cache layout {layout!r} is not one of: {', '.join(CACHE_LAYOUTS)}")
    total = 0
    for i in range(cfg.num_hidden_layers):
        if shared and not cfg.produces_kv(i):
            continue
        per_position = 2 * batch * cfg.kv_heads_of(i) * cfg.head_dim_of(i) * itemsize  # a key and a value
        slots = cache_slots(cfg, i, layout)
        total += per_position * (context if slots is None else slots)
    return total


def buffer_mask(attention_mask: torch.Tensor, seq: int, slots: int) -> torch.Tensor:
    """Mask [batch, slots + seq] of a windowed layer's keys: its buffer (the `slots` positions before the new
    tokens; zeros before the first token) then the new tokens. attention_mask: [batch, past + seq]."""
    padded = torch.cat((attention_mask.new_zeros(attention_mask.shape[0], slots), attention_mask), dim=1)
    return padded[:, attention_mask.shape[1] - seq :]


KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [batch, kv_heads, positions, head_dim]


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.kv_heads_of(layer),
            cfg.head_dim_of(layer),
        )
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcapping
        self.window = cfg.window_of(layer)
        self.causal = not cfg.use_bidirectional_attention
        self.blocks = 0  # the mask may name image blocks (values >= 2; the op's `blocks`): models/multimodal.py sets it
        self.slots: int | None = None  # a windowed cache's buffer size; None: the cache grows (full layout)
        self.produces_kv = cfg.produces_kv(layer)  # else it reads the keys/values of cfg.kv_source(layer)
        offset = cfg.family.norm_offset

        def norm() -> nn.Module:
            return RMSNorm(self.head_dim, cfg.rms_norm_eps, offset) if cfg.family.qk_norm else nn.Identity()

        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.q_norm = norm()
        if self.produces_kv:
            self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
            self.k_norm = norm()
            if not cfg.k_is_v(layer):
                self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
            value_norm = cfg.family.value_norm
            self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, scaled=False) if value_norm else nn.Identity()
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor,
        past: KV | None,
        shared: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """past: this layer's cache; shared: instead, the keys/values (past and new) of the layer it reads.
        Returns the output and the keys/values it attended to (past and new)."""
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        if shared is not None:
            k, v = shared
        else:
            assert past is not None
            k_raw = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
            v_raw = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim) if hasattr(self, "v_proj") else k_raw
            k = apply_rope(self.k_norm(k_raw).transpose(1, 2), cos, sin)
            v = self.v_norm(v_raw).transpose(1, 2)
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = torch.ops.gemma.attention(
            q, k, v, attention_mask, self.scale, self.softcap, self.window, self.causal, self.blocks
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        return self.o_proj(out), (k, v)

    def present(self, kv: KV) -> KV:
        """What this layer carries to the next call: all its keys/values, or a windowed buffer's last `slots`."""
        if self.slots is None:
            return kv
        k, v = kv  # a slice that is empty when slots == 0
        return k[:, :, k.shape[2] - self.slots :], v[:, :, v.shape[2] - self.slots :]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.norm_offset)

        post_norm = norm if cfg.family.post_norms else nn.Identity
        self.rope_kind = cfg.layer_types[layer]
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = post_norm()
        self.pre_feedforward_layernorm = norm()
        wide = 2 if cfg.use_double_wide_mlp and not cfg.produces_kv(layer) else 1
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size * wide, bias=False)
        self.post_feedforward_layernorm = post_norm()
        self.experts: Experts | None = None
        if cfg.num_experts:  # Gemma 4 26B-A4B: a routed expert block beside the MLP
            self.router = Router(cfg.hidden_size, cfg.num_experts, cfg.top_k_experts, cfg.rms_norm_eps)
            self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
            self.post_feedforward_layernorm_1 = norm()
            self.pre_feedforward_layernorm_2 = norm()
            self.post_feedforward_layernorm_2 = norm()
        self.per_layer_input: PerLayerGate | None = None
        if cfg.hidden_size_per_layer_input:  # Gemma 4: gated per-layer embeddings, and a loaded output scalar
            self.per_layer_input = PerLayerGate(cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.rms_norm_eps)
        if cfg.family.layer_scalar:
            self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor,
        past: KV | None,
        shared: KV | None = None,
        per_layer_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, past, shared)
        h = x + self.post_attention_layernorm(attn)
        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if self.experts is not None:
            weights = self.router(h)  # the router reads the residual stream, not the MLP's normed input
            routed = self.experts(self.pre_feedforward_layernorm_2(h), weights)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(routed)
        x = h + self.post_feedforward_layernorm(ff)
        if self.per_layer_input is not None:
            x = x + self.per_layer_input(x, per_layer_input)
        if hasattr(self, "layer_scalar"):
            x = x * self.layer_scalar
        return x, kv


class GemmaModel(nn.Module):
    """The decoder with its tied LM head: token ids -> float32 logits and the new KV cache."""

    mask_covers_past = True  # attention_mask spans past + new tokens

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache_layout = "full"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.per_layer_inputs: PerLayerInputs | None = None
        if cfg.hidden_size_per_layer_input:
            self.per_layer_inputs = PerLayerInputs(
                cfg.vocab_size_per_layer_input,
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.hidden_size_per_layer_input,
                cfg.rms_norm_eps,
            )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.norm_offset)
        if cfg.embedding_dim:  # EmbeddingGemma 2: token states projected to the embedding width (before pooling)
            self.embedding_projection = nn.Linear(cfg.hidden_size, cfg.embedding_dim, bias=False)
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
        cfg = self.cfg
        for kind, rope in cfg.rope.items():
            # a layer type's head dim (Gemma 4's global layers are wider); the first such layer's, as transformers
            dim = next((cfg.head_dim_of(i) for i, t in enumerate(cfg.layer_types) if t == kind), cfg.head_dim)
            inv_freq = rope_inv_freq(rope.theta, dim, rope.factor, rope.fraction).to(self.norm.weight.device)
            self.register_buffer(f"inv_freq_{kind}", inv_freq, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq] int64
        attention_mask: torch.Tensor,  # [batch, past + seq] int64, 0 = padding
        position_ids: torch.Tensor,  # [batch, seq] int64
        state: list[torch.Tensor],  # per KV-producing layer: key, value [batch, kv_heads, past, head_dim]
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
        """The final-normed hidden states [batch, seq, hidden] (what an encoder pools; EmbeddingGemma 2's
        projected to [batch, seq, embedding_dim]) and the new cache."""
        x = self.embed(input_ids)
        ple = self.per_layer_inputs(input_ids, x) if self.per_layer_inputs is not None else None
        return self.run_layers(x, attention_mask, position_ids, state, ple)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        dtype = self.embed_tokens.weight.dtype
        return self.embed_tokens(input_ids) * torch.tensor(self.cfg.hidden_size**0.5, dtype=dtype)

    def run_layers(
        self,
        x: torch.Tensor,  # [batch, seq, hidden]: the embedded tokens
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        state: list[torch.Tensor],
        ple: torch.Tensor | None = None,  # Gemma 4's per-layer inputs (from the token ids), indexed [:, :, layer]
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
        pasts = iter(zip(state[0::2], state[1::2], strict=True))
        attended: dict[int, KV] = {}  # a producing layer's keys/values (past and new), for the layers sharing them
        for i, layer in enumerate(self.layers):
            cos, sin = tables[layer.rope_kind]
            attn = layer.self_attn
            past = next(pasts) if attn.produces_kv else None
            shared = None if attn.produces_kv else attended[self.cfg.kv_source(i)]
            per_layer = ple[:, :, i] if ple is not None else None
            x, kv = layer(x, cos, sin, masks[attn.slots], past, shared, per_layer)
            if attn.produces_kv:
                attended[i] = kv
                presents.extend(attn.present(kv))
        if next(pasts, None) is not None:
            raise BadInput(f"{len(state)} state tensors given; the model carries {2 * len(attended)}")
        x = self.norm(x)
        if hasattr(self, "embedding_projection"):
            x = self.embedding_projection(x)
        return x, presents

    def state_specs(self) -> list[StateSpec]:
        """Per KV-producing layer (every layer but Gemma 4's KV-shared ones) a key and a value cache
        [batch, kv_heads, positions, head_dim] (that layer's KV heads and head dim): growing along axis 2
        (past_sequence_length), or, for a windowed layer, a fixed buffer of its last (window - 1) positions."""
        cfg, dtype = self.cfg, self.embed_tokens.weight.dtype
        specs = []
        for i, layer in enumerate(self.layers):
            if not layer.self_attn.produces_kv:
                continue
            slots = layer.self_attn.slots
            shape = ("batch", cfg.kv_heads_of(i), 0 if slots is None else slots, cfg.head_dim_of(i))
            grows = 2 if slots is None else None
            specs += [StateSpec(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", shape, dtype, grows=grows)
                      for kind in ("key", "value")]  # fmt: skip
        return specs


# Our module name -> the checkpoint's, where they differ: Gemma 1 calls its pre-MLP norm "post attention".
CHECKPOINT_RENAMES: dict[str, dict[str, str]] = {
    "gemma": {"pre_feedforward_layernorm": "post_attention_layernorm"},
    "gemma2": {},
    "gemma3_text": {},
    "gemma4_text": {
        "per_layer_inputs.embed": "embed_tokens_per_layer",
        "per_layer_inputs.projection": "per_layer_model_projection",
        "per_layer_inputs.norm": "per_layer_projection_norm",
        "per_layer_input.gate": "per_layer_input_gate",
        "per_layer_input.projection": "per_layer_projection",
        "per_layer_input.norm": "post_per_layer_input_norm",
    },
    "gemma4_unified_text": {},
    "embedding_gemma2_text": {
        "per_layer_inputs.projection": "ple.per_layer_model_projection",
        "per_layer_inputs.norm": "ple.per_layer_projection_norm",
        "per_layer_input.gate": "ple_block.per_layer_input_gate",
        "per_layer_input.projection": "ple_block.per_layer_projection",
        "per_layer_input.norm": "ple_block.post_per_layer_input_norm",
    },
}
