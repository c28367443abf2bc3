"""What a checkpoint's `config.json` says, normalised into one typed `GemmaConfig`.

Two spellings of the same facts exist on disk and both are read here:

* the hub's files (written by transformers 4): `rope_theta`, `rope_local_base_freq`, `rope_scaling`,
  `sliding_window_pattern`, no `layer_types`;
* transformers 5's files: `rope_parameters` (flat, or nested per layer type) and `layer_types`.

The differences between Gemma generations live in `FAMILIES` (data), so that the model code has no
`if model_type == ...` branches: it reads `post_norms`, `qk_norm`, softcaps, windows from the config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gemma_export.checkpoint import gguf as gguf_checkpoint
from gemma_export.errors import BadInput

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


@dataclass(frozen=True)
class Family:
    """Architecture traits that a generation fixes, whatever its size."""

    post_norms: bool  # post-attention and post-feed-forward RMSNorms (Gemma 2 and 3)
    qk_norm: bool  # RMSNorm on each query and key head (Gemma 3)
    scale_by_query_pre_attn_scalar: bool  # else head_dim ** -0.5 (Gemma 1)
    window_every: int  # layer i is global when (i + 1) % window_every == 0; 0 = every layer global
    defaults: dict[str, Any]  # transformers' config defaults: hub files omit the fields that equal them
    norm_offset: float = 1.0  # RMSNorm scales by (norm_offset + w): 1 + w up to Gemma 3, w on Gemma 4
    value_norm: bool = False  # an RMSNorm without weight on each value head (Gemma 4)
    unit_attention_scale: bool = False  # scores are q.k unscaled: the q/k norms set their size (Gemma 4)
    layer_scalar: bool = False  # each layer's output times a loaded scalar (Gemma 4)


_SHARED_DEFAULTS = {
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "attention_bias": False,
}
# Gemma 4's layer traits, shared by its decoders and EmbeddingGemma 2's encoder.
_GEMMA4_TRAITS: dict[str, Any] = {
    "post_norms": True,
    "qk_norm": True,
    "scale_by_query_pre_attn_scalar": False,
    "window_every": 6,
    "norm_offset": 0.0,
    "value_norm": True,
    "unit_attention_scale": True,
    "layer_scalar": True,
}
FAMILIES: dict[str, Family] = {
    "gemma": Family(
        post_norms=False,
        qk_norm=False,
        scale_by_query_pre_attn_scalar=False,
        window_every=0,
        defaults={
            **_SHARED_DEFAULTS,
            "vocab_size": 256000,
            "hidden_size": 3072,
            "intermediate_size": 24576,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "max_position_embeddings": 8192,
        },
    ),
    "gemma2": Family(
        post_norms=True,
        qk_norm=False,
        scale_by_query_pre_attn_scalar=True,
        window_every=2,
        defaults={
            **_SHARED_DEFAULTS,
            "vocab_size": 256000,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "max_position_embeddings": 8192,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "gemma3_text": Family(
        post_norms=True,
        qk_norm=True,
        scale_by_query_pre_attn_scalar=True,
        window_every=6,
        defaults={
            **_SHARED_DEFAULTS,
            "vocab_size": 262208,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "max_position_embeddings": 131072,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
        },
    ),
    # Gemma 4 text (transformers' Gemma4TextConfig defaults). Its per-layer traits (head dims, KV heads, k = v,
    # KV sharing, per-layer embeddings, experts) are GemmaConfig fields that parse_config reads.
    "gemma4_text": Family(
        **_GEMMA4_TRAITS,
        defaults={
            **_SHARED_DEFAULTS,
            "vocab_size": 262144,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 30,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "max_position_embeddings": 131072,
            "sliding_window": 512,
            "global_head_dim": 512,
            "vocab_size_per_layer_input": 262144,
            "hidden_size_per_layer_input": 256,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                GLOBAL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            },
        },
    ),
    # EmbeddingGemma 2 (transformers' EmbeddingGemma2TextConfig defaults): a bidirectional Gemma 4 encoder whose
    # per-layer embeddings come from the projection of x_0 alone (no table), and a final projection to
    # `embedding_dim`; its `sliding_window` is a radius (|i - j| <= sliding_window).
    "embedding_gemma2_text": Family(
        **_GEMMA4_TRAITS,
        defaults={
            **_SHARED_DEFAULTS,
            "vocab_size": 262144,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 24,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 262144,
            "sliding_window": 512,
            "global_head_dim": 512,
            "num_global_key_value_heads": 1,
            "hidden_size_per_layer_input": 512,
            "embedding_dim": 768,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                GLOBAL: {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        },
    ),
}
# Gemma 4 "unified" (12B; transformers' Gemma4UnifiedTextConfig defaults): the Gemma 4 decoder without per-layer
# embeddings or experts, a 1024 window; its multimodal wrapper embeds image patches and audio frames directly
# (no towers), which the text artifact leaves out. Its per-layer overrides, k = v, KV sharing and double-wide
# MLPs are the same GemmaConfig fields as gemma4_text's.
_GEMMA4_PLE = ("vocab_size_per_layer_input", "hidden_size_per_layer_input")  # gemma4_text's, not the unified's
FAMILIES["gemma4_unified_text"] = Family(
    **_GEMMA4_TRAITS,
    defaults={
        **{k: v for k, v in FAMILIES["gemma4_text"].defaults.items() if k not in _GEMMA4_PLE},
        "max_position_embeddings": 262144,
        "sliding_window": 1024,
        "use_bidirectional_attention": "vision",
    },
)
GEMMA4_LIKE = ("gemma4_text", "gemma4_unified_text", "embedding_gemma2_text")  # parsed by _gemma4_traits
GEMMA4_DECODERS = ("gemma4_text", "gemma4_unified_text")
# Multimodal checkpoints whose text model we export: model_type -> the text config's model_type.
MULTIMODAL = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "gemma4_unified": "gemma4_unified_text",
    "embedding_gemma2": "embedding_gemma2_text",
}
# PaliGemma (1 and 2): the text config names its own family (gemma or gemma2).
PREFIX_LM = {"paligemma": ("gemma", "gemma2")}
SUPPORTED_MODEL_TYPES = (
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "gemma4_text",
    "gemma4",
    "gemma4_unified_text",
    "gemma4_unified",
    "embedding_gemma2_text",
    "embedding_gemma2",
    "paligemma",
    "recurrent_gemma",
)

# Where the decoder's tensors live in each on-disk layout, tried in order.
WEIGHT_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")  # "": a bare AutoModel


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: `inv_freq = 1 / theta ** (2i / d) / factor` (linear scaling);
    `fraction` < 1 ("proportional", Gemma 4's global layers): only the first fraction * d / 2 frequencies
    turn, the rest are 0 (those channel pairs pass through)."""

    theta: float
    factor: float = 1.0
    fraction: float = 1.0


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # gemma | gemma2 | gemma3_text (a gemma3 multimodal config is reduced to its text part)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    attn_logit_softcapping: float  # 0 = none
    final_logit_softcapping: float  # 0 = none
    sliding_window: int  # 0 = none
    layer_types: tuple[str, ...]
    rope: dict[str, Rope]  # layer type -> rope
    max_position_embeddings: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    use_bidirectional_attention: bool = False
    source_model_type: str = ""  # as written in config.json (gemma3 for a multimodal checkpoint)
    # Gemma 4 (defaults: every earlier generation). Per layer; empty: head_dim / num_key_value_heads everywhere.
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    attention_k_eq_v: bool = False  # global layers project keys only: values are the same projection
    num_kv_shared_layers: int = 0  # the last layers reuse the keys/values of an earlier layer of their type
    hidden_size_per_layer_input: int = 0  # per-layer embeddings (PLE) width; 0 = none
    vocab_size_per_layer_input: int = 0
    use_double_wide_mlp: bool = False  # KV-shared layers' MLP is twice intermediate_size wide
    num_experts: int = 0  # a routed expert block beside the MLP; 0 = none
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    embedding_dim: int = 0  # EmbeddingGemma 2: the final projection's width; 0 = none
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_key_value_heads

    def k_is_v(self, layer: int) -> bool:
        """Gemma 4's `attention_k_eq_v`: global layers have no v_proj; values come from the key projection."""
        return self.attention_k_eq_v and self.layer_types[layer] == GLOBAL

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values this layer attends to: itself, or for the last
        `num_kv_shared_layers` layers the last earlier non-shared layer of the same type (transformers'
        `kv_sharing_modes`: "reuse" reads what that "store" layer computed)."""
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first_shared) if self.layer_types[i] == kind)

    def produces_kv(self, layer: int) -> bool:
        return self.kv_source(layer) == layer

    @property
    def attention_scale(self) -> float:
        if self.family.unit_attention_scale:
            return 1.0
        if self.family.scale_by_query_pre_attn_scalar:
            return self.query_pre_attn_scalar**-0.5
        return self.head_dim**-0.5

    def window_of(self, layer: int) -> int:
        """Attention window of a layer in keys, the current one included (0 = global)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else 0

    @property
    def max_window(self) -> int:
        return max((self.window_of(i) for i in range(self.num_hidden_layers)), default=0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        for name in ("layer_types", "eos_token_ids", "layer_head_dims", "layer_kv_heads"):
            out[name] = list(getattr(self, name))
        out["rope"] = {k: asdict(v) for k, v in self.rope.items()}
        return out


@dataclass(frozen=True)
class GriffinConfig:
    """RecurrentGemma: residual blocks whose temporal mixing cycles through `block_types`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # as transformers stores it: the MLP is intermediate_size // 2 wide
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    lru_width: int
    attention_window_size: int  # keys visible to a query, the current one included
    conv1d_width: int
    logits_soft_cap: float
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float  # RoPE on the first head_dim * factor channels
    block_types: tuple[str, ...]  # per layer: "recurrent" or "attention"
    max_position_embeddings: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    model_type: str = "recurrent_gemma"
    source_model_type: str = "recurrent_gemma"

    @property
    def max_window(self) -> int:
        return self.attention_window_size

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["block_types"] = list(self.block_types)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out


GRIFFIN_DEFAULTS = {  # transformers' RecurrentGemmaConfig defaults (the 2B model)
    "num_hidden_layers": 26,
    "vocab_size": 256000,
    "hidden_size": 2560,
    "intermediate_size": 3 * 2560,
    "num_attention_heads": 10,
    "attention_window_size": 2048,
    "conv1d_width": 4,
    "logits_soft_cap": 30.0,
    "rms_norm_eps": 1e-6,
    "block_types": ["recurrent", "recurrent", "attention"],
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "attention_bias": False,
}
# RecurrentGemma has no position limit of its own (its attention is local); this bounds a generation.
GRIFFIN_MAX_LENGTH = 1 << 20


def parse_griffin_config(raw: dict[str, Any], source: str = "config.json") -> GriffinConfig:
    raw = {**GRIFFIN_DEFAULTS, **raw}
    r = _Reader(raw, source)
    if raw.get("attention_bias"):
        raise BadInput(f"{source}: 'attention_bias': true is not a RecurrentGemma architecture")
    hidden, heads, layers = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    pattern = raw["block_types"]
    if not isinstance(pattern, list) or not pattern or any(b not in ("recurrent", "attention") for b in pattern):
        raise BadInput(f"{source}: 'block_types' must list 'recurrent' / 'attention', got {pattern!r}")
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise BadInput(f"{source}: RecurrentGemma supports only default RoPE, got {rope!r}")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10_000.0))
    factor = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
    if not _is_number(theta) or not _is_number(factor) or not 0 < factor <= 1:
        raise BadInput(f"{source}: rope_theta must be a number and partial_rotary_factor in (0, 1]")
    cfg = GriffinConfig(
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.int("intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=r.int("num_key_value_heads", default=heads),
        head_dim=hidden // heads if heads else 0,
        lru_width=r.int("lru_width", default=hidden),
        attention_window_size=r.int("attention_window_size"),
        conv1d_width=r.int("conv1d_width"),
        logits_soft_cap=r.opt_float("logits_soft_cap") or 0.0,
        rms_norm_eps=r.float("rms_norm_eps"),
        rope_theta=float(theta),
        partial_rotary_factor=float(factor),
        block_types=tuple((pattern * layers)[:layers]),
        max_position_embeddings=r.int("max_position_embeddings", default=GRIFFIN_MAX_LENGTH),
        bos_token_id=r.int("bos_token_id"),
        eos_token_ids=r.token_ids("eos_token_id"),
        pad_token_id=r.int("pad_token_id"),
    )
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "lru_width",
                 "attention_window_size", "conv1d_width", "num_key_value_heads"):  # fmt: skip
        if getattr(cfg, name) <= 0:
            raise BadInput(f"{source}: '{name}' must be a positive integer, got {getattr(cfg, name)}")
    if hidden % heads or cfg.lru_width % heads or heads % cfg.num_key_value_heads:
        raise BadInput(f"{source}: hidden_size and lru_width must split evenly into {heads} heads")
    if cfg.intermediate_size < 2 or cfg.intermediate_size % 2:
        raise BadInput(f"{source}: 'intermediate_size' must be a positive even integer")
    return cfg


def read_json(path: Path) -> Any:
    """A JSON file the user handed us; missing or malformed is a one-line BadInput naming it."""
    if not Path(path).is_file():
        raise BadInput(f"{path}: missing")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None


def load_config(checkpoint_dir: Path) -> GemmaConfig | GriffinConfig:
    """Read and validate `checkpoint_dir/config.json`, or the metadata of a GGUF file (or of a folder's one GGUF)."""
    gguf = gguf_checkpoint.find_gguf(checkpoint_dir)
    if gguf is not None:
        return parse_config(gguf_checkpoint.read_config(gguf), source=str(gguf))
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise BadInput(f"{checkpoint_dir}: checkpoint directory does not exist")
    if not path.is_file():
        raise BadInput(f"{path}: no config.json in the checkpoint directory")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a JSON object")
    if raw.get("model_type") == "recurrent_gemma":
        return parse_griffin_config(raw, source=str(path))
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> GemmaConfig:
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in MULTIMODAL:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise BadInput(f"{source}: model_type {model_type!r} needs a 'text_config' object")
        text = {"model_type": MULTIMODAL[model_type], **text}
        cfg = parse_config(text, source=f"{source} (text_config)")
        return replace(cfg, source_model_type=model_type)
    if isinstance(model_type, str) and model_type in PREFIX_LM:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise BadInput(f"{source}: model_type {model_type!r} needs a 'text_config' object")
        family = text.get("model_type", "gemma")
        if family not in PREFIX_LM[model_type]:
            raise BadInput(f"{source}: text_config.model_type {family!r} is not one of {PREFIX_LM[model_type]}")
        # PaliGemmaConfig writes use_bidirectional_attention = true into its text config; what it means there is
        # the prefix-LM mask (image + prompt bidirectional, the suffix causal: models/multimodal.py), not an encoder
        text = {k: v for k, v in text.items() if k != "use_bidirectional_attention"}
        cfg = parse_config({"model_type": family, **text}, source=f"{source} (text_config)")
        return replace(cfg, source_model_type=model_type)
    if not isinstance(model_type, str) or model_type not in FAMILIES:  # a list or object is not hashable
        raise BadInput(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    family = FAMILIES[model_type]
    raw = {**family.defaults, **raw}  # a field written as null stays null (e.g. no softcap)
    r = _Reader(raw, source)
    if raw.get("attention_bias"):
        raise BadInput(f"{source}: 'attention_bias': true is not a Gemma architecture; no Gemma has attention biases")

    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    head_dim = r.int("head_dim", default=hidden // heads if heads else 0)
    layers = r.int("num_hidden_layers")
    window = r.opt_int("sliding_window") or 0
    if model_type == "embedding_gemma2_text":  # an encoder; its window a radius: |i - j| <= sliding_window
        bidirectional, window = True, window + 1 if window else 0
    elif model_type in GEMMA4_DECODERS:  # "all" (an encoder), "vision" (images only: text stays causal) or null
        mode = raw.get("use_bidirectional_attention")
        if mode not in (None, "all", "vision"):
            raise BadInput(f"{source}: 'use_bidirectional_attention' must be 'all', 'vision' or null, got {mode!r}")
        bidirectional = mode == "all"
        if bidirectional and window:
            window = window // 2 + 1  # as Gemma4TextConfig (and Gemma4UnifiedTextConfig) converts it
    else:
        bidirectional = r.bool("use_bidirectional_attention", default=False)
    if bidirectional and window and model_type not in GEMMA4_LIKE:
        # transformers stores the bidirectional window as sliding_window // 2 + 1 keys each way (EmbeddingGemma).
        window = window // 2 + 1
    window_every = r.int("sliding_window_pattern", default=family.window_every)
    window_every = r.int("_sliding_window_pattern", default=window_every)

    layer_types = raw.get("layer_types")
    if layer_types is None:
        layer_types = [SLIDING if window and window_every and (i + 1) % window_every else GLOBAL for i in range(layers)]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != layers
        or any(t not in (SLIDING, GLOBAL) for t in layer_types)
    ):
        raise BadInput(
            f"{source}: 'layer_types' must list {layers} entries of {SLIDING!r} or {GLOBAL!r}, got {layer_types!r}"
        )
    if SLIDING in layer_types and window <= 0:
        raise BadInput(f"{source}: 'sliding_window' must be a positive integer when layers slide")
    if model_type in GEMMA4_LIKE and layer_types[-1] != GLOBAL:
        layer_types = [*layer_types[:-1], GLOBAL]  # as Gemma4TextConfig does (it warns): the last layer is global

    cfg = GemmaConfig(
        model_type=model_type,
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.int("intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=r.int("num_key_value_heads", default=heads),
        head_dim=head_dim,
        rms_norm_eps=r.float("rms_norm_eps", default=1e-6),
        query_pre_attn_scalar=r.float("query_pre_attn_scalar", default=float(head_dim)),
        attn_logit_softcapping=r.opt_float("attn_logit_softcapping") or 0.0,
        final_logit_softcapping=r.opt_float("final_logit_softcapping") or 0.0,
        sliding_window=window if SLIDING in layer_types else 0,
        layer_types=tuple(layer_types),
        rope=_parse_rope(raw, r, model_type, source),
        max_position_embeddings=r.int("max_position_embeddings", default=8192),
        bos_token_id=r.int("bos_token_id", default=2),
        eos_token_ids=r.token_ids("eos_token_id", default=1),
        pad_token_id=r.int("pad_token_id", default=0),
        use_bidirectional_attention=bidirectional,
        source_model_type=model_type,
    )
    if model_type in GEMMA4_LIKE:
        cfg = _gemma4_traits(cfg, raw, r, source)
    _check_consistency(cfg, source)
    return cfg


def _gemma4_traits(cfg: GemmaConfig, raw: dict[str, Any], r: _Reader, source: str) -> GemmaConfig:
    """Gemma 4's per-layer fields, in both spellings: transformers 5.25 writes `per_layer_config` (layer index ->
    overrides of head_dim / num_key_value_heads); the hub's files write `global_head_dim` and
    `num_global_key_value_heads` (the latter applies only with `attention_k_eq_v`, as Gemma4TextConfig reads it)."""
    if raw.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise BadInput(f"{source}: 'hidden_activation' must be gelu_pytorch_tanh, got {raw['hidden_activation']!r}")
    layers, k_eq_v = cfg.num_hidden_layers, r.bool("attention_k_eq_v", default=False)
    head_dims, kv_heads = [cfg.head_dim] * layers, [cfg.num_key_value_heads] * layers
    per_layer = raw.get("per_layer_config")
    encoder = cfg.model_type == "embedding_gemma2_text"  # its global KV heads apply whatever attention_k_eq_v
    if per_layer is None:
        global_kv = r.opt_int("num_global_key_value_heads") if k_eq_v or encoder else None
        per_layer = {
            str(i): {"head_dim": r.int("global_head_dim"), **({"num_key_value_heads": global_kv} if global_kv else {})}
            for i, kind in enumerate(cfg.layer_types)
            if kind == GLOBAL
        }
    if not isinstance(per_layer, dict):
        raise BadInput(f"{source}: 'per_layer_config' must be an object of layer index -> overrides")
    for key, overrides in per_layer.items():
        if not str(key).isdigit() or int(key) >= layers or not isinstance(overrides, dict):
            raise BadInput(f"{source}: 'per_layer_config' key {key!r} must be a layer index below {layers}")
        unknown = set(overrides) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise BadInput(f"{source}: per_layer_config.{key} overrides unsupported fields: {sorted(unknown)}")
        sub = _Reader(overrides, f"{source} per_layer_config.{key}")
        head_dims[int(key)] = sub.int("head_dim", default=cfg.head_dim)
        kv_heads[int(key)] = sub.int("num_key_value_heads", default=cfg.num_key_value_heads)
    shared = r.int("num_kv_shared_layers", default=0)
    if not 0 <= shared < layers:
        raise BadInput(f"{source}: 'num_kv_shared_layers' must be in [0, {layers}), got {shared}")
    if shared and set(cfg.layer_types[layers - shared :]) - set(cfg.layer_types[: layers - shared]):
        raise BadInput(f"{source}: a KV-shared layer's type has no earlier layer of that type to read keys from")
    # Gemma4UnifiedTextConfig has no per-layer embeddings or experts: fields of that name are not its own
    unified = cfg.model_type == "gemma4_unified_text"
    moe = not unified and r.bool("enable_moe_block", default=False)
    experts = r.int("num_experts", default=0) if moe else 0
    cfg = replace(
        cfg,
        layer_head_dims=tuple(head_dims),
        layer_kv_heads=tuple(kv_heads),
        attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=shared,
        hidden_size_per_layer_input=0 if unified else r.int("hidden_size_per_layer_input", default=0),
        vocab_size_per_layer_input=0
        if encoder or unified
        else r.int("vocab_size_per_layer_input", default=cfg.vocab_size),
        embedding_dim=r.int("embedding_dim") if encoder else 0,
        use_double_wide_mlp=r.bool("use_double_wide_mlp", default=False),
        num_experts=experts,
        top_k_experts=r.int("top_k_experts") if experts else 0,
        moe_intermediate_size=r.int("moe_intermediate_size") if experts else 0,
    )
    for i in range(layers):
        if cfg.head_dim_of(i) <= 0 or cfg.head_dim_of(i) % 2 or cfg.kv_heads_of(i) <= 0:
            raise BadInput(f"{source}: layer {i} needs an even positive head_dim and positive num_key_value_heads")
        if cfg.num_attention_heads % cfg.kv_heads_of(i):
            raise BadInput(f"{source}: layer {i}'s {cfg.kv_heads_of(i)} KV heads do not divide the query heads")
        if cfg.kv_source(i) != i and (cfg.head_dim_of(i), cfg.kv_heads_of(i)) != (
            cfg.head_dim_of(cfg.kv_source(i)),
            cfg.kv_heads_of(cfg.kv_source(i)),
        ):
            raise BadInput(f"{source}: KV-shared layer {i} has another head shape than layer {cfg.kv_source(i)}")
    if experts and not 0 < cfg.top_k_experts <= experts:
        raise BadInput(f"{source}: 'top_k_experts' must be in [1, num_experts = {experts}]")
    return cfg


def _parse_rope(raw: dict[str, Any], r: _Reader, model_type: str, source: str) -> dict[str, Rope]:
    params = raw.get("rope_parameters")
    if params is None and model_type in GEMMA4_LIKE:  # null: the config class's own per-type defaults
        params = FAMILIES[model_type].defaults["rope_parameters"]
    if isinstance(params, dict) and (SLIDING in params or GLOBAL in params):
        # transformers 5, per layer type (Gemma 3).
        return {
            kind: _rope_from(params.get(kind) or {}, source, f"rope_parameters.{kind}") for kind in (SLIDING, GLOBAL)
        }
    if isinstance(params, dict):
        # transformers 5, one rope for every layer (Gemma 1 and 2).
        rope = _rope_from(params, source, "rope_parameters")
        return {SLIDING: rope, GLOBAL: rope}
    if params is not None:
        raise BadInput(f"{source}: 'rope_parameters' must be an object, got {type(params).__name__}")
    # The hub's transformers-4 spelling.
    default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10_000.0
    theta = r.float("rope_theta", default=default_theta)
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise BadInput(f"{source}: 'rope_scaling' must be an object or null, got {type(scaling).__name__}")
    global_rope = _rope_from({"rope_theta": theta, **(scaling or {})}, source, "rope_scaling")
    if model_type == "gemma3_text":
        local = Rope(theta=r.float("rope_local_base_freq", default=10_000.0))
        return {SLIDING: local, GLOBAL: global_rope}
    return {SLIDING: global_rope, GLOBAL: global_rope}


def _rope_from(d: dict[str, Any], source: str, key: str) -> Rope:
    if not isinstance(d, dict):
        raise BadInput(f"{source}: '{key}' must be an object, got {type(d).__name__}")
    kind = d.get("rope_type", d.get("type", "default"))
    theta = d.get("rope_theta", 10_000.0)
    if not isinstance(theta, int | float) or isinstance(theta, bool) or theta <= 0:
        raise BadInput(f"{source}: '{key}.rope_theta' must be a positive number, got {theta!r}")
    if kind == "default":
        return Rope(theta=float(theta))
    if kind in ("linear", "proportional"):
        factor = d.get("factor", 1.0 if kind == "proportional" else None)
        if not isinstance(factor, int | float) or isinstance(factor, bool) or factor <= 0:
            raise BadInput(f"{source}: '{key}.factor' must be a positive number, got {factor!r}")
        fraction = d.get("partial_rotary_factor", 1.0) if kind == "proportional" else 1.0
        if not _is_number(fraction) or not 0 <= fraction <= 1:
            raise BadInput(f"{source}: '{key}.partial_rotary_factor' must be in [0, 1], got {fraction!r}")
        return Rope(theta=float(theta), factor=float(factor), fraction=float(fraction))
    raise BadInput(f"{source}: unsupported rope type {kind!r} in '{key}'; supported: default, linear, proportional")


def _check_consistency(cfg: GemmaConfig, source: str) -> None:
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ):
        if getattr(cfg, name) <= 0:
            raise BadInput(f"{source}: '{name}' must be a positive integer, got {getattr(cfg, name)}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise BadInput(
            f"{source}: num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )
    if cfg.head_dim % 2:
        raise BadInput(f"{source}: 'head_dim' must be even for rotary embeddings, got {cfg.head_dim}")
    if not math.isfinite(cfg.rms_norm_eps) or cfg.rms_norm_eps <= 0:
        raise BadInput(f"{source}: 'rms_norm_eps' must be a positive number, got {cfg.rms_norm_eps}")


class _Reader:
    """Typed access to config fields; a wrong type is a one-line error naming the field."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def _get(self, key: str, default: Any) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is _MISSING:
                raise BadInput(f"{self.source}: missing required field '{key}'")
            return default
        return self.raw[key]

    def int(self, key: str, default: Any = None) -> int:
        v = self._get(key, _MISSING if default is None else default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise BadInput(f"{self.source}: field '{key}' must be an integer, got {v!r}")
        return v

    def opt_int(self, key: str) -> int | None:
        return None if self.raw.get(key) is None else self.int(key)

    def float(self, key: str, default: Any = None) -> float:
        v = self._get(key, _MISSING if default is None else default)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise BadInput(f"{self.source}: field '{key}' must be a number, got {v!r}")
        return float(v)

    def opt_float(self, key: str) -> float | None:
        return None if self.raw.get(key) is None else self.float(key)

    def bool(self, key: str, default: Any = None) -> bool:
        v = self._get(key, _MISSING if default is None else default)
        if not isinstance(v, bool):
            raise BadInput(f"{self.source}: field '{key}' must be true or false, got {v!r}")
        return v

    def token_ids(self, key: str, default: Any = None) -> tuple[int, ...]:
        """A token id or a non-empty list of them (`eos_token_id`)."""
        v = self._get(key, _MISSING if default is None else default)
        ids = v if isinstance(v, list) else [v]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise BadInput(
                f"{self.source}: field '{key}' must be a non-negative integer or a non-empty list of them, got {v!r}"
            )
        return tuple(ids)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_MISSING = object()
