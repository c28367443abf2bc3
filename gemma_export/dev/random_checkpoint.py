"""Deterministic random-weight Gemma checkpoints, in the exact Hugging Face on-disk layout.

No real Gemma weights can be downloaded where this tool is built and tested, yet every path of the exporter
(config parsing, safetensors reading, sharded indexes, the tokenizer files that ONNX Runtime GenAI loads)
has to be exercised on files that look exactly like the hub's. This module writes such files from a seed:
`config.json`, `generation_config.json`, `model.safetensors` (or shards plus an index) and a small
Gemma-style tokenizer. It is what the `make demo` default checkpoint is made of, and what benchmarks use
at realistic sizes (`PUBLISHED_CONFIGS`: the published Gemma, Gemma 2, Gemma 3 and RecurrentGemma sizes,
written with `write_published`).

It deliberately does not import transformers: transformers is the test-suite's oracle, and a generator that
used it to write its files could not catch a disagreement with it. Files are written with `safetensors`'
format (streamed, see `_write_safetensors`), `json` and `tokenizers`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import string
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from gemma_export.config.model_config import SLIDING, GemmaConfig, GriffinConfig, parse_config, parse_griffin_config
from gemma_export.errors import BadInput

# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_cache": True,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "dtype": "float32",
}

# Small configs in the form transformers 5 writes them (`rope_parameters`, `layer_types`, `dtype`), one per
# generation. The sizes are tiny so that a test builds, exports and runs one in seconds, but each keeps the
# traits that distinguish its generation, so that a bug in one of them shows up:
#  * gemma: one key/value head (multi-query attention, like Gemma-2B), head_dim ** -0.5 scaling.
#  * gemma2: grouped KV heads, alternating sliding/global layers with a window far shorter than the
#    context, logit softcaps 50/30, and a query_pre_attn_scalar (24) that differs from head_dim (16), as in
#    Gemma-2-27B, so that an exporter scaling by head_dim is caught.
#  * gemma3_text: five sliding layers then a global one (layer 5), q/k norms, and a different rope per
#    layer type, the global one with linear scaling (factor 8), as the 4B+ Gemma 3 models have.
#  * recurrent_gemma: (recurrent, recurrent, attention) blocks, one key/value head, RoPE on half of each
#    head, and an attention window (8) far shorter than a test's prompts; `intermediate_size` is twice the
#    MLP's width, as transformers stores it. Written as `RecurrentGemmaConfig.save_pretrained` writes it.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma": {
        **_COMMON,
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "num_key_value_heads": 1,
        "hidden_act": "gelu_pytorch_tanh",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "gemma2": {
        **_COMMON,
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "num_key_value_heads": 2,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 24,
        "sliding_window": 16,
        "layer_types": [SLIDING if i % 2 == 0 else "full_attention" for i in range(6)],
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "gemma3_text": {
        **_COMMON,
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "num_key_value_heads": 2,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,
        "_sliding_window_pattern": 6,
        "layer_types": [SLIDING] * 5 + ["full_attention"],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    },
    "recurrent_gemma": {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": "recurrent_gemma",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "lru_width": 64,
        "attention_window_size": 8,
        "conv1d_width": 4,
        "logits_soft_cap": 30.0,
        "block_types": ["recurrent", "recurrent", "attention"],
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "rms_norm_eps": 1e-6,
        "w_init_variance_scale": 0.01,
        "final_w_init_variance_scale": 2.0 / 6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": "float32",
    },
}

_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "recurrent_gemma": "RecurrentGemmaForCausalLM",
    "gemma4_text": "Gemma4ForCausalLM",
    "gemma4_unified_text": "Gemma4UnifiedForCausalLM",
    "embedding_gemma2_text": "EmbeddingGemma2TextModel",
}


def _published_configs() -> dict[str, dict[str, Any]]:
    """The published models' config.json, as the hub has them, from the recipes' [architecture] tables.

    The recipes (`recipes/*.toml`) are the one place the published architectures are written down; the
    parameter counts they give are checked against transformers' (tests/dev/test_random_checkpoint.py).
    """
    from gemma_export.config import recipes

    return {name: dict(recipes.load(name).recipe.architecture) for name in recipes.available()}


PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = _published_configs()

# EmbeddingGemma-300M's sentence-transformers head, as its folder describes it: mean pooling over every
# token (the prompt included), Dense 768 -> 3072 and 3072 -> 768 (no bias, Identity activation), Normalize;
# inputs cut at 2048 tokens; the task prompts of config_sentence_transformers.json (no default prompt).
EMBEDDINGGEMMA_PROMPTS: dict[str, str] = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}
EMBEDDINGGEMMA_HEAD: dict[str, Any] = {"dense": (3072,), "prompts": EMBEDDINGGEMMA_PROMPTS, "max_seq_length": 2048}


def is_embedding_config(config: dict[str, Any]) -> bool:
    """An EmbeddingGemma backbone (written as a sentence-transformers folder), not a decoder."""
    return config.get("model_type") == "gemma3_text" and bool(config.get("use_bidirectional_attention"))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

# Gemma's own ids for the first four; the turn markers follow, then <mask> (GemmaTokenizer in transformers
# adds a <mask> token when the vocabulary has none, which would grow the vocabulary past what onnxruntime-
# genai sees, so it is given an id here).
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<mask>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # byte fallback: any text encodes, nothing is <unk>
SPACE = "▁"  # SentencePiece's visible space, U+2581
# Every printable ASCII character is a piece of its own; other characters fall back to their UTF-8 bytes.
ALPHABET = (*sorted(set(string.printable) - set(string.whitespace)), SPACE)
TOKENIZER_VOCAB_SIZE = 480  # all ids < 512, the tiny configs' vocab_size

# The text the merges are learned from. Its content only decides which common English fragments become
# single pieces; it is embedded (not downloaded) so the tokenizer is the same on every machine.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say hello to the world, and this one
does: it has the same files, the same names and the same shapes as a real one, only with random numbers in
place of what was learned.
Once upon a time there was a little robot who liked to count. It counted the stars in the sky, the stones
on the road and the words in every book it could find: one, two, three, four, five, six, seven, eight.
When the robot was tired of counting, it wrote stories about the things it had counted, and then it
counted the letters in the stories.
The weather today is sunny with a light wind from the west. Tomorrow there will be some rain in the
morning, and the afternoon should be clear and warm. Take a coat if you go out in the evening.
To make a cup of tea, boil the water, pour it over the leaves and wait for three or four minutes. Some
people like to add milk, others prefer lemon or honey. What do you like best?
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
def add(a, b):
    return a + b
print(add(2, 3))  # 5
"""

# The chat template of the instruction-tuned Gemma models (turns are `<start_of_turn>{role}`, a newline,
# the text, `<end_of_turn>`; the assistant's role is called `model`). Newlines are Jinja escapes, as in the
# hub's files.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


_NOT_STRIPPED = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def build_tokenizer() -> Tokenizer:
    """The tokenizer `write_tokenizer` saves, as a `tokenizers.Tokenizer`.

    Its pipeline mirrors the hub's Gemma `tokenizer.json` and the one transformers' `GemmaTokenizer`
    rebuilds on load (transformers 5 keeps only the vocabulary, merges and post-processor of the file):
    normalizer Replace(' ', '▁'); pre-tokenizer Split(' ', merged_with_previous), which is a no-op after
    that normalizer; BPE with byte fallback over `<0xNN>` pieces; decoder Replace('▁', ' ') + ByteFallback
    + Fuse; a post-processor that prepends `<bos>`. onnxruntime-genai 0.18 (onnxruntime-extensions' JSON
    BPE tokenizer, picked by `tokenizer_class: GemmaTokenizer`) gives the same ids and text for it.
    Mirroring the real structure is the point: a tokenizer of another kind (byte-level BPE, say) would
    leave the code paths that real Gemma tokenizers take untested.
    """
    base = [*SPECIAL_TOKENS, *BYTE_TOKENS, *ALPHABET]
    vocab = {piece: i for i, piece in enumerate(base)}
    merges = _learn_merges(_corpus_words(CORPUS), vocab, TOKENIZER_VOCAB_SIZE)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = SPECIAL_TOKENS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", bos)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def _corpus_words(text: str) -> Counter[str]:
    """Words as SentencePiece sees them: spaces become '▁' and start the piece that follows them.

    Learning merges within such words (never across a '▁' in the middle) means no merge spans a word
    boundary, so running BPE over a whole normalized string, as the tokenizer does, splits words the same way.
    """
    words: Counter[str] = Counter()
    for line in text.splitlines():
        words.update(w for w in re.split(f"(?={SPACE})", line.replace(" ", SPACE)) if w)
    return words


def _learn_merges(words: Counter[str], vocab: dict[str, int], size: int) -> list[tuple[str, str]]:
    """Classic BPE training, in plain Python so that the result is the same in every process and version.

    (The `tokenizers` trainer is not used: its output depends on the library version, and this is ~20
    lines.) The most frequent adjacent pair is merged first; ties go to the lexicographically smallest
    pair. Characters outside `vocab` (none, for the ASCII corpus) are skipped. Grows `vocab` to `size`.
    """
    seqs = {w: [c for c in w if c in vocab] for w in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            s = seqs[w]
            for pair in itertools.pairwise(s):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        vocab.setdefault(merged, len(vocab))
        for s in seqs.values():
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i : i + 2] = [merged]
                i += 1
    return merges


def write_tokenizer(out_dir: Path, *, model_max_length: int = 1024, chat_template: bool = True) -> None:
    """Deterministic small Gemma-style tokenizer: tokenizer.json, tokenizer_config.json and
    special_tokens_map.json.

    `tokenizer_config.json` matters as much as `tokenizer.json`: transformers 5 takes the special tokens
    from its `added_tokens_decoder`, and onnxruntime-extensions picks its tokenizer implementation from
    `tokenizer_class` and reads `add_bos_token` from it. `chat_template=False` leaves the chat template out,
    as embedding folders must (sentence-transformers 6 wraps prompt + text in a tokenizer's chat template
    when it has one).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    turn_tokens = ["<start_of_turn>", "<end_of_turn>"]
    named = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "special": True, **_NOT_STRIPPED} for i, s in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": turn_tokens,
        **named,
        "mask_token": "<mask>",
        **({"chat_template": CHAT_TEMPLATE} if chat_template else {}),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "use_default_system_prompt": False,
    }
    special_tokens_map = {"additional_special_tokens": turn_tokens, **named, "mask_token": "<mask>"}
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_tokens_map)


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------

DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16")}
NORM_STD = 0.1  # Gemma's RMSNorm scales by (1 + w): small random w exercises the offset without dominating
BIAS_STD = 0.02  # RecurrentGemma's biases: small, but not zero, so that an exporter dropping one is caught
W_INIT_VARIANCE_SCALE = 0.01  # RecurrentGemma's conv1d and RG-LRU gate initialisation (transformers' default)
# RG-LRU decay: a ** 2 uniform in [0.9 ** 2, 0.999 ** 2], stored as recurrent_param = log(1 / a - 1) so that
# softplus(recurrent_param) = -log(a) (transformers' `_init_weights`). Random normal values would give
# decays from ~0 to ~1 and a recurrence that forgets at once or never, unlike a trained model.
RG_LRU_DECAY = "rg_lru_decay"
NORM_AROUND_ONE = "norm_around_one"  # Gemma 4's norms scale by w: 1 + N(0, NORM_STD)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# Tensor name, shape, and how its values are drawn: a float is the standard deviation of a zero-mean normal,
# RG_LRU_DECAY the RG-LRU's decay parameter.
Spec = tuple[str, tuple[int, ...], float | str]


def tensor_specs(cfg: GemmaConfig | GriffinConfig, *, tie_word_embeddings: bool = True) -> list[Spec]:
    """(name, shape, init) of every stored tensor, in the order transformers' state_dict lists them.

    The order is also the order of generation, so it fixes every value for a seed. The lm_head is not
    stored when tied (transformers drops tied weights on save). Standard deviations are 1/sqrt(fan_in) for
    projections and 1/sqrt(hidden) for the embedding (which Gemma multiplies by sqrt(hidden)), so that
    activations stay of unit scale at any size: logits are then neither flat, which would make top-k
    comparisons between the exporter and transformers meaningless, nor saturated.
    """
    if isinstance(cfg, GriffinConfig):
        return _griffin_specs(cfg, tie_word_embeddings=tie_word_embeddings)
    if cfg.model_type in ("gemma4_text", "gemma4_unified_text"):
        return _gemma4_specs(cfg, tie_word_embeddings=tie_word_embeddings)
    if cfg.model_type == "embedding_gemma2_text":
        return _embedding_gemma2_specs(cfg)
    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    specs: list[Spec] = [("model.embed_tokens.weight", (cfg.vocab_size, h), h**-0.5)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q, h), h**-0.5),
            (p + "self_attn.k_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.v_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.o_proj.weight", (h, q), q**-0.5),
        ]
        if cfg.family.qk_norm:
            specs += [
                (p + "self_attn.q_norm.weight", (d,), NORM_STD),
                (p + "self_attn.k_norm.weight", (d,), NORM_STD),
            ]
        specs += [
            (p + "mlp.gate_proj.weight", (inter, h), h**-0.5),
            (p + "mlp.up_proj.weight", (inter, h), h**-0.5),
            (p + "mlp.down_proj.weight", (h, inter), inter**-0.5),
            (p + "input_layernorm.weight", (h,), NORM_STD),
            (p + "post_attention_layernorm.weight", (h,), NORM_STD),
        ]
        if cfg.family.post_norms:
            specs += [
                (p + "pre_feedforward_layernorm.weight", (h,), NORM_STD),
                (p + "post_feedforward_layernorm.weight", (h,), NORM_STD),
            ]
    specs.append(("model.norm.weight", (h,), NORM_STD))
    if not tie_word_embeddings:
        specs.append(("lm_head.weight", (cfg.vocab_size, h), h**-0.5))
    return specs


_GEMMA4_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                       "post_feedforward_layernorm")  # fmt: skip


def _gemma4_specs(cfg: GemmaConfig, *, tie_word_embeddings: bool) -> list[Spec]:
    """Gemma 4's tensors (`Gemma4ForCausalLM.state_dict()` order): per-layer head dims and KV heads, no k/v
    weights on KV-shared layers, no v_proj on k = v layers, per-layer embeddings, the expert block, a layer
    scalar. Its norms scale by w, not 1 + w: their weights are drawn around 1 (NORM_AROUND_ONE)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    ple, layers = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
    specs: list[Spec] = [("model.embed_tokens.weight", (cfg.vocab_size, h), h**-0.5)]
    for i in range(layers):
        p, d = f"model.layers.{i}.", cfg.head_dim_of(i)
        q, kv = cfg.num_attention_heads * d, cfg.kv_heads_of(i) * d
        specs += [(p + "layer_scalar", (1,), NORM_AROUND_ONE), (p + "self_attn.q_proj.weight", (q, h), h**-0.5)]
        specs.append((p + "self_attn.q_norm.weight", (d,), NORM_AROUND_ONE))
        if cfg.produces_kv(i):
            specs += [
                (p + "self_attn.k_norm.weight", (d,), NORM_AROUND_ONE),
                (p + "self_attn.k_proj.weight", (kv, h), h**-0.5),
            ]
            if not cfg.k_is_v(i):
                specs.append((p + "self_attn.v_proj.weight", (kv, h), h**-0.5))
        specs.append((p + "self_attn.o_proj.weight", (h, q), q**-0.5))
        width = inter * (2 if cfg.use_double_wide_mlp and not cfg.produces_kv(i) else 1)
        specs += [
            (p + "mlp.gate_proj.weight", (width, h), h**-0.5),
            (p + "mlp.up_proj.weight", (width, h), h**-0.5),
            (p + "mlp.down_proj.weight", (h, width), width**-0.5),
        ]
        specs += [(p + f"{n}.weight", (h,), NORM_AROUND_ONE) for n in _GEMMA4_LAYER_NORMS]
        if ple:
            specs += [
                (p + "per_layer_input_gate.weight", (ple, h), h**-0.5),
                (p + "per_layer_projection.weight", (h, ple), ple**-0.5),
                (p + "post_per_layer_input_norm.weight", (h,), NORM_AROUND_ONE),
            ]
        if cfg.num_experts:
            e, m = cfg.num_experts, cfg.moe_intermediate_size
            specs += [
                (p + "router.scale", (h,), NORM_AROUND_ONE),  # a module's own parameters before its children's
                (p + "router.per_expert_scale", (e,), NORM_AROUND_ONE),
                (p + "router.proj.weight", (e, h), h**-0.5),
                (p + "experts.gate_up_proj", (e, 2 * m, h), h**-0.5),
                (p + "experts.down_proj", (e, h, m), m**-0.5),
                (p + "post_feedforward_layernorm_1.weight", (h,), NORM_AROUND_ONE),
                (p + "post_feedforward_layernorm_2.weight", (h,), NORM_AROUND_ONE),
                (p + "pre_feedforward_layernorm_2.weight", (h,), NORM_AROUND_ONE),
            ]
    specs.append(("model.norm.weight", (h,), NORM_AROUND_ONE))
    if ple:
        specs += [
            ("model.embed_tokens_per_layer.weight", (cfg.vocab_size_per_layer_input, layers * ple), ple**-0.5),
            ("model.per_layer_model_projection.weight", (layers * ple, h), h**-0.5),
            ("model.per_layer_projection_norm.weight", (ple,), NORM_AROUND_ONE),
        ]
    if not tie_word_embeddings:
        specs.append(("lm_head.weight", (cfg.vocab_size, h), h**-0.5))
    return specs


def _embedding_gemma2_specs(cfg: GemmaConfig) -> list[Spec]:
    """EmbeddingGemma 2's tensors (`EmbeddingGemma2TextModel.state_dict()`: a bare encoder, no `model.` prefix):
    Gemma 4's layers in that class's order, projection-only per-layer embeddings (`ple.`, `ple_block.`), the
    embedding projection to `embedding_dim`."""
    h, inter, ple, layers = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.hidden_size_per_layer_input,
        cfg.num_hidden_layers,
    )
    specs: list[Spec] = [("embed_tokens.weight", (cfg.vocab_size, h), h**-0.5)]
    for i in range(layers):
        p, d = f"layers.{i}.", cfg.head_dim_of(i)
        q, kv = cfg.num_attention_heads * d, cfg.kv_heads_of(i) * d
        specs += [
            (p + "layer_scalar", (1,), NORM_AROUND_ONE),
            (p + "self_attn.q_proj.weight", (q, h), h**-0.5),
            (p + "self_attn.k_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.v_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.o_proj.weight", (h, q), q**-0.5),
            (p + "self_attn.q_norm.weight", (d,), NORM_AROUND_ONE),
            (p + "self_attn.k_norm.weight", (d,), NORM_AROUND_ONE),
            (p + "mlp.gate_proj.weight", (inter, h), h**-0.5),
            (p + "mlp.up_proj.weight", (inter, h), h**-0.5),
            (p + "mlp.down_proj.weight", (h, inter), inter**-0.5),
        ]
        specs += [(p + f"{n}.weight", (h,), NORM_AROUND_ONE) for n in _GEMMA4_LAYER_NORMS]
        specs += [
            (p + "ple_block.per_layer_input_gate.weight", (ple, h), h**-0.5),
            (p + "ple_block.per_layer_projection.weight", (h, ple), ple**-0.5),
            (p + "ple_block.post_per_layer_input_norm.weight", (h,), NORM_AROUND_ONE),
        ]
    return [
        *specs,
        ("norm.weight", (h,), NORM_AROUND_ONE),
        ("ple.per_layer_model_projection.weight", (layers * ple, h), h**-0.5),
        ("ple.per_layer_projection_norm.weight", (ple,), NORM_AROUND_ONE),
        ("embedding_projection.weight", (cfg.embedding_dim, h), h**-0.5),
    ]


def _griffin_specs(cfg: GriffinConfig, *, tie_word_embeddings: bool) -> list[Spec]:
    """RecurrentGemma's tensors (`RecurrentGemmaForCausalLM.state_dict()`), initialised in the spirit of
    transformers' `_init_weights`: conv1d std sqrt(0.01 / width), RG-LRU gates sqrt(0.01 / block width),
    realistic decays (RG_LRU_DECAY). Projections are 1/sqrt(fan_in) as for Gemma; biases are small."""
    h, lru, mlp = cfg.hidden_size, cfg.lru_width, cfg.intermediate_size // 2
    heads, d = cfg.num_attention_heads, cfg.head_dim
    block = lru // heads
    q, kv = heads * d, cfg.num_key_value_heads * d
    gate_std = (W_INIT_VARIANCE_SCALE / block) ** 0.5
    specs: list[Spec] = [("model.embed_tokens.weight", (cfg.vocab_size, h), h**-0.5)]
    for i, kind in enumerate(cfg.block_types):
        p = f"model.layers.{i}."
        t = p + "temporal_block."
        specs.append((p + "temporal_pre_norm.weight", (h,), NORM_STD))
        if kind == "recurrent":
            specs += [
                (t + "linear_y.weight", (lru, h), h**-0.5),
                (t + "linear_y.bias", (lru,), BIAS_STD),
                (t + "linear_x.weight", (lru, h), h**-0.5),
                (t + "linear_x.bias", (lru,), BIAS_STD),
                (t + "linear_out.weight", (h, lru), lru**-0.5),
                (t + "linear_out.bias", (h,), BIAS_STD),
                (t + "conv_1d.weight", (lru, 1, cfg.conv1d_width), (W_INIT_VARIANCE_SCALE / cfg.conv1d_width) ** 0.5),
                (t + "conv_1d.bias", (lru,), BIAS_STD),
                (t + "rg_lru.recurrent_param", (lru,), RG_LRU_DECAY),
                (t + "rg_lru.input_gate_weight", (heads, block, block), gate_std),
                (t + "rg_lru.input_gate_bias", (heads, block), BIAS_STD),
                (t + "rg_lru.recurrent_gate_weight", (heads, block, block), gate_std),
                (t + "rg_lru.recurrent_gate_bias", (heads, block), BIAS_STD),
            ]
        else:
            specs += [
                (t + "q_proj.weight", (q, h), h**-0.5),
                (t + "k_proj.weight", (kv, h), h**-0.5),
                (t + "v_proj.weight", (kv, h), h**-0.5),
                (t + "o_proj.weight", (h, q), q**-0.5),
                (t + "o_proj.bias", (h,), BIAS_STD),
            ]
        specs += [
            (p + "channel_pre_norm.weight", (h,), NORM_STD),
            (p + "mlp_block.gate_proj.weight", (mlp, h), h**-0.5),
            (p + "mlp_block.gate_proj.bias", (mlp,), BIAS_STD),
            (p + "mlp_block.up_proj.weight", (mlp, h), h**-0.5),
            (p + "mlp_block.up_proj.bias", (mlp,), BIAS_STD),
            (p + "mlp_block.down_proj.weight", (h, mlp), mlp**-0.5),
            (p + "mlp_block.down_proj.bias", (h,), BIAS_STD),
        ]
    specs.append(("model.final_norm.weight", (h,), NORM_STD))
    if not tie_word_embeddings:
        specs.append(("lm_head.weight", (cfg.vocab_size, h), h**-0.5))
    return specs


def write_random_checkpoint(
    out_dir: Path,
    config: dict,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors (or shards + model.safetensors.index.json
    when max_shard_bytes is set), and the tokenizer, into out_dir. Returns out_dir.

    `config` is an HF-style config.json dict of a text model (gemma, gemma2, gemma3_text, recurrent_gemma;
    the hub's transformers-4 spelling is accepted too), e.g. one of `TINY_CONFIGS` or `PUBLISHED_CONFIGS`.
    Same config, seed and dtype give byte-identical files, and the tensors' values do not depend on
    sharding. Tensors are generated one at a time and streamed to disk, so memory stays at one tensor
    whatever the model size. Checkpoint files left in out_dir by an earlier write are removed first, so that
    a loader never sees a mix of two.
    """
    if not isinstance(config, dict):
        raise BadInput(f"config must be a dict (a config.json object), got {type(config).__name__}")
    if dtype not in DTYPES:
        raise BadInput(f"dtype {dtype!r} is not supported for random checkpoints; use {' or '.join(DTYPES)}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise BadInput(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if config.get("model_type") == "gemma3":
        raise BadInput(
            "random checkpoints are text-only: use model_type 'gemma3_text' (a 'gemma3' checkpoint also "
            "needs the vision tower's weights)"
        )
    if config.get("attention_bias"):
        raise BadInput("random checkpoints do not support attention_bias: true (no Gemma uses it)")
    source = "random checkpoint config"
    if config.get("model_type") == "recurrent_gemma":
        cfg: GemmaConfig | GriffinConfig = parse_griffin_config(config, source=source)
    else:
        cfg = parse_config(config, source=source)
    if cfg.vocab_size < TOKENIZER_VOCAB_SIZE:
        raise BadInput(
            f"vocab_size {cfg.vocab_size} is below the generated tokenizer's {TOKENIZER_VOCAB_SIZE} token ids"
        )
    tied = config.get("tie_word_embeddings", True) is not False

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)

    _write_json(out / "config.json", _config_json(config, cfg, dtype))
    _write_json(out / "generation_config.json", _generation_config(cfg))
    write_tokenizer(out, model_max_length=cfg.max_position_embeddings)

    torch_dtype, st_dtype = DTYPES[dtype]
    specs = tensor_specs(cfg, tie_word_embeddings=tied)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = _split(specs, itemsize, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    if max_shard_bytes is None:
        _write_safetensors(out / SINGLE_FILE, shards[0], generator, torch_dtype, st_dtype)
        return out
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / name, shard, generator, torch_dtype, st_dtype)
        weight_map.update({spec[0]: name for spec in shard})
    index = {
        "metadata": {
            "total_parameters": sum(math.prod(s[1]) for s in specs),
            "total_size": sum(math.prod(s[1]) for s in specs) * itemsize,
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out / INDEX_FILE, index)
    return out


def write_published(
    out_dir: Path, name: str, *, seed: int = 0, dtype: str = "float32", max_shard_bytes: int = 2**31
) -> Path:
    """A random checkpoint of one of the published sizes (`PUBLISHED_CONFIGS`), sharded as the hub's are.

    Sizes are the real ones: gemma-3-270m is ~1.1 GB in float32, recurrentgemma-9b ~34 GB. An embedding
    model (embeddinggemma-300m) is written as its sentence-transformers folder (`write_random_embedding_folder`).
    """
    if name not in PUBLISHED_CONFIGS:
        raise BadInput(f"unknown published model {name!r}; known: {', '.join(PUBLISHED_CONFIGS)}")
    if is_embedding_config(PUBLISHED_CONFIGS[name]):  # one model.safetensors, as the hub's (1.2 GB)
        return write_random_embedding_folder(out_dir, PUBLISHED_CONFIGS[name], seed=seed, dtype=dtype)
    return write_random_checkpoint(
        out_dir, PUBLISHED_CONFIGS[name], seed=seed, dtype=dtype, max_shard_bytes=max_shard_bytes
    )


# ---------------------------------------------------------------------------------------------------------
# Image + text (Gemma 3 4B+): the SigLIP tower, the projector, the processor files
# ---------------------------------------------------------------------------------------------------------

LAYER_NORM_SCALE = "layer_norm_scale"
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")  # boi, eoi, the image token


def add_image_tokens(out: Path) -> dict[str, int]:
    """Gemma 3's image tokens added to the folder's tokenizer (ids after its vocabulary), named in
    tokenizer_config.json as transformers' Gemma3Processor reads them (`boi_token`, `eoi_token`, `image_token`)."""
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    tok.save(str(out / "tokenizer.json"), pretty=True)
    ids = {t: tok.token_to_id(t) for t in IMAGE_TOKENS}
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for token, i in ids.items():
        config["added_tokens_decoder"][str(i)] = {"content": token, "special": True, **_NOT_STRIPPED}
    config["extra_special_tokens"] = dict(zip(("boi_token", "eoi_token", "image_token"), IMAGE_TOKENS, strict=True))
    _write_json(out / "tokenizer_config.json", config)
    return ids


def add_vision(out: Path, vision: dict[str, Any], *, seed: int = 0) -> Path:
    """Make the text checkpoint at `out` (written by `write_random_checkpoint`, sharded) an image + text Gemma 3
    one: config.json becomes `gemma3` (its text part under `text_config`), random SigLIP tower and projector
    weights go into one more shard (the published names: `vision_tower.vision_model.`), the tokenizer gains the
    image tokens and processor_config.json describes the preprocessing (SigLIP's: mean = std = 0.5, bilinear).
    `vision`: a recipe's [vision] table (the published vision_config and mm_tokens_per_image)."""
    from gemma_export.models.siglip import VisionConfig, VisionModel, checkpoint_name

    text = json.loads((out / "config.json").read_text(encoding="utf-8"))
    vision = dict(vision)
    mm_tokens = int(vision.pop("mm_tokens_per_image"))
    vision_config = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "num_channels": 3,
                     "vision_use_head": False, **vision}  # fmt: skip
    ids = add_image_tokens(out)
    raw = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {k: v for k, v in text.items() if k != "architectures"},
        "vision_config": vision_config,
        "mm_tokens_per_image": mm_tokens,
        "boi_token_index": ids[IMAGE_TOKENS[0]],
        "eoi_token_index": ids[IMAGE_TOKENS[1]],
        "image_token_index": ids[IMAGE_TOKENS[2]],
        "tie_word_embeddings": True,
    }
    cfg = VisionConfig.from_checkpoint(raw, str(out / "config.json"))
    with torch.device("meta"):
        model = VisionModel(cfg)
    specs: list[Spec] = []
    for name, p in model.named_parameters():
        ckpt = checkpoint_name(name).replace("vision_tower.", "vision_tower.vision_model.", 1)
        layer_norm = name.endswith("weight") and ("layer_norm" in name or "post_layernorm" in name)
        init: float | str = LAYER_NORM_SCALE if layer_norm else (0.1 if p.ndim == 1 else 0.02)
        specs.append((ckpt, tuple(p.shape), init))
    shard = "model-vision.safetensors"
    _write_safetensors(out / shard, specs, torch.Generator().manual_seed(seed + 1), *DTYPES["float32"])
    index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    index["weight_map"].update({spec[0]: shard for spec in specs})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    _write_json(out / INDEX_FILE, index)
    _write_json(out / "config.json", raw)
    image_processor = {
        "image_processor_type": "Gemma3ImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }  # fmt: skip
    _write_json(out / "processor_config.json", {"image_processor": image_processor, "image_seq_length": mm_tokens,
                                                "processor_class": "Gemma3Processor"})  # fmt: skip
    return out


def cut_depth(config: dict[str, Any], layers: int | None, name: str) -> dict[str, Any]:
    """`config` with only its first `layers` layers at full width (a cheaper stand-in; not the real size)."""
    config = dict(config)
    if layers is None:
        return config
    if not 1 <= layers <= config["num_hidden_layers"]:
        raise BadInput(f"--layers must be between 1 and {config['num_hidden_layers']} for {name}, got {layers}")
    config["num_hidden_layers"] = layers
    if config.get("model_type") in ("gemma4_text", "gemma4_unified_text", "embedding_gemma2_text") and config.get(
        "layer_types"
    ):
        # Gemma 4's pattern is written out (E2B: 4 local : 1 global): keep its first layers, the last one global
        kinds = [*config["layer_types"][: layers - 1], "full_attention"]
        config["layer_types"] = kinds
        # KV sharing kept as far as every shared layer still has an earlier producer of its type
        if config.get("num_kv_shared_layers"):
            config["num_kv_shared_layers"] = min(
                config["num_kv_shared_layers"], layers - kinds.index("full_attention") - 1
            )
        return config
    config.pop("layer_types", None)  # re-derived for the cut depth (sliding_window_pattern / block_types)
    return config


def write_once(
    out: Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    dense: tuple[int, ...] | None = None,
    max_seq_length: int | None = None,
    vision: dict[str, Any] | None = None,
) -> Path:
    """A random checkpoint of `config` at `out`, written once and reused afterwards (`vision`: with a SigLIP
    tower, `add_vision`).

    An embedding config (`is_embedding_config`) is written as a sentence-transformers folder with the head's
    Dense widths `dense`. The files go to a `.partial` folder that is renamed when complete, so an
    interrupted write is redone, never reused.
    """
    import shutil

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if is_embedding_config(config):
        write_random_embedding_folder(partial, config, dense=dense or EMBEDDINGGEMMA_HEAD["dense"], seed=seed,
                                      max_seq_length=max_seq_length)  # fmt: skip
    else:
        write_random_checkpoint(partial, config, seed=seed, max_shard_bytes=2**31)
        if vision is not None:
            add_vision(partial, vision, seed=seed)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def write_cached(
    root: Path,
    name: str,
    config: dict[str, Any],
    *,
    seed: int = 0,
    layers: int | None = None,
    dense: tuple[int, ...] | None = None,
    max_seq_length: int | None = None,
    vision: dict[str, Any] | None = None,
) -> Path:
    """`write_once` under root/NAME-seedS[-Nl], `layers` cutting the depth (`cut_depth`; the tower is kept whole)."""
    tag = f"{name}-seed{seed}" + (f"-{layers}l" if layers is not None else "")
    config = cut_depth(config, layers, name)
    return write_once(Path(root) / tag, config, seed=seed, dense=dense, max_seq_length=max_seq_length, vision=vision)


# sentence-transformers' module classes, by the names sentence-transformers 6.2 records in modules.json.
ST_MODULE_TYPES = {
    "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "Dense": "sentence_transformers.base.modules.dense.Dense",
    "Normalize": "sentence_transformers.base.modules.normalize.Normalize",
}
_SENTENCE_EMBEDDING = {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}


def write_random_embedding_folder(
    out_dir: Path,
    config: dict,
    *,
    dense: tuple[int, ...] = EMBEDDINGGEMMA_HEAD["dense"],
    seed: int = 0,
    dtype: str = "float32",
    prompts: dict[str, str] | None = None,
    max_seq_length: int | None = None,
) -> Path:
    """A random-weight EmbeddingGemma in the sentence-transformers folder layout; returns out_dir.

    `config` is the backbone's config.json (gemma3_text with use_bidirectional_attention: true), e.g.
    `PUBLISHED_CONFIGS["embeddinggemma-300m"]`. The folder holds what `SentenceTransformer.save` writes
    (sentence-transformers 6.2's format, checked by the tests against the library itself):

        config.json, model.safetensors   the backbone as transformers' AutoModel saves a Gemma3TextModel:
                                         bare tensor names (embed_tokens.weight, layers.0...., norm.weight)
        tokenizer files                  `write_tokenizer`, without a chat template
        modules.json                     Transformer, Pooling, Dense per width in `dense` and one back to
                                         hidden_size, Normalize
        1_Pooling/config.json            mean pooling, prompt included
        k_Dense/config.json + model.safetensors   `linear.weight` [out, in], no bias, Identity activation
        n_Normalize/config.json
        sentence_bert_config.json        max_seq_length (also the tokenizer's model_max_length)
        config_sentence_transformers.json   the task prompts (default: EmbeddingGemma's), no default prompt

    `dense` lists the hidden widths of the Dense stack: EmbeddingGemma's (3072,) gives 768 -> 3072 -> 768.
    The same arguments give byte-identical files; every tensor is drawn from one generator seeded with
    `seed`, backbone first, then the Dense layers in order. No sentence-transformers import: it is the
    tests' oracle for this layout.
    """
    if not isinstance(config, dict):
        raise BadInput(f"config must be a dict (a config.json object), got {type(config).__name__}")
    if not is_embedding_config(config):
        raise BadInput(
            "an embedding folder needs a gemma3_text backbone with use_bidirectional_attention: true, got "
            f"model_type {config.get('model_type')!r}, use_bidirectional_attention "
            f"{config.get('use_bidirectional_attention')!r}"
        )
    if dtype not in DTYPES:
        raise BadInput(f"dtype {dtype!r} is not supported for random checkpoints; use {' or '.join(DTYPES)}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dense):
        raise BadInput(f"dense must list positive integer widths, got {dense!r}")
    cfg = parse_config(config, source="random embedding config")
    if cfg.vocab_size < TOKENIZER_VOCAB_SIZE:
        raise BadInput(
            f"vocab_size {cfg.vocab_size} is below the generated tokenizer's {TOKENIZER_VOCAB_SIZE} token ids"
        )
    if max_seq_length is None:
        max_seq_length = min(EMBEDDINGGEMMA_HEAD["max_seq_length"], cfg.max_position_embeddings)
    if not 0 < max_seq_length <= cfg.max_position_embeddings:
        raise BadInput(f"max_seq_length must be between 1 and {cfg.max_position_embeddings}, got {max_seq_length}")
    prompts = EMBEDDINGGEMMA_PROMPTS if prompts is None else prompts

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "modules.json", out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    backbone = _config_json({**config, "architectures": ["Gemma3TextModel"]}, cfg, dtype)
    _write_json(out / "config.json", backbone)
    write_tokenizer(out, model_max_length=max_seq_length, chat_template=False)

    torch_dtype, st_dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(seed)
    specs = [(name.removeprefix("model."), shape, init) for name, shape, init in tensor_specs(cfg)]
    _write_safetensors(out / SINGLE_FILE, specs, generator, torch_dtype, st_dtype)

    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPES["Transformer"]}]

    def module(kind: str) -> Path:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_{kind}", "type": ST_MODULE_TYPES[kind]})
        path = out / f"{idx}_{kind}"
        path.mkdir(exist_ok=True)
        return path

    pooling = {"embedding_dimension": cfg.hidden_size, "include_prompt": True, "pooling_mode": "mean"}
    _write_json(module("Pooling") / "config.json", pooling)
    widths = [cfg.hidden_size, *dense, cfg.hidden_size]
    for n_in, n_out in itertools.pairwise(widths):
        path = module("Dense")
        _write_json(path / "config.json", {
            "activation_function": "torch.nn.modules.linear.Identity",
            "bias": False,
            "in_features": n_in,
            "out_features": n_out,
            **_SENTENCE_EMBEDDING,
        })  # fmt: skip
        _write_safetensors(path / SINGLE_FILE, [("linear.weight", (n_out, n_in), n_in**-0.5)], generator,
                           torch_dtype, st_dtype)  # fmt: skip
    _write_json(module("Normalize") / "config.json", _SENTENCE_EMBEDDING)

    _write_json(out / "sentence_bert_config.json", {
        "do_lower_case": False,
        "max_seq_length": max_seq_length,
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "transformer_task": "feature-extraction",
    })  # fmt: skip
    _write_json(out / "config_sentence_transformers.json", {
        "default_prompt_name": None,
        "model_type": "SentenceTransformer",
        "prompts": dict(prompts),
        "similarity_fn_name": "cosine",
    })  # fmt: skip
    _write_json(out / "modules.json", modules)  # last: a folder with modules.json is complete
    return out


def _config_json(config: dict[str, Any], cfg: GemmaConfig | GriffinConfig, dtype: str) -> dict[str, Any]:
    """The caller's config with what a saved checkpoint's config.json always has: architectures and dtype."""
    out = dict(config)
    out.setdefault("architectures", [_ARCHITECTURES[cfg.model_type]])
    out.pop("torch_dtype", None)  # transformers 4's name for it
    out["dtype"] = dtype
    return out


def _generation_config(cfg: GemmaConfig | GriffinConfig) -> dict[str, Any]:
    eos: int | list[int] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}


def _split(specs: list[Spec], itemsize: int, max_bytes: int | None) -> list[list[Spec]]:
    """Consecutive runs of tensors of at most max_bytes each (a bigger tensor gets a shard to itself)."""
    if max_bytes is None:
        return [specs]
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _write_safetensors(
    path: Path,
    specs: list[Spec],
    generator: torch.Generator,
    torch_dtype: torch.dtype,
    st_dtype: str,
) -> None:
    """Stream tensors into a safetensors file, generating each just before it is written.

    `safetensors.torch.save_file` needs every tensor in memory at once (and copies each to bytes), i.e.
    twice the checkpoint's size; the format is simple enough to write directly instead: a little-endian
    u64 header length, a JSON header (padded with spaces to a multiple of 8 bytes, as the library pads it)
    mapping names to dtype, shape and byte offsets, then the tensors' bytes in the header's order.
    """
    if sys.byteorder != "little":  # safetensors is little-endian; torch's bytes are the host's
        raise BadInput("random checkpoints can only be written on a little-endian machine")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape, init in specs:
            t = _draw(shape, init, generator).to(torch_dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _draw(shape: tuple[int, ...], init: float | str, generator: torch.Generator) -> torch.Tensor:
    """One tensor's float32 values (see `Spec`), from the generator's next numbers."""
    if init == LAYER_NORM_SCALE:  # a LayerNorm's weight multiplies (no 1 + w): near 1
        return torch.empty(shape, dtype=torch.float32).normal_(1.0, 0.02, generator=generator)
    if init == RG_LRU_DECAY:
        a2 = torch.empty(shape, dtype=torch.float32).uniform_(0.9**2 + 1e-8, 0.999**2 + 1e-8, generator=generator)
        return a2.log().mul(-0.5).exp().sub(1.0).log()  # log(1 / a - 1): softplus of it is -log(a)
    if init == NORM_AROUND_ONE:
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, NORM_STD, generator=generator).add_(1.0)
    if not isinstance(init, float):
        raise ValueError(f"unknown initialisation {init!r}")
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, init, generator=generator)


def _write_json(path: Path, obj: Any) -> None:
    """Sorted keys and a trailing newline, as transformers writes its JSON files; stable bytes for a seed."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":  # python -m gemma_export.dev.random_checkpoint NAME OUT: write once (make bench-e2b)
    if len(sys.argv) != 3 or sys.argv[1] not in PUBLISHED_CONFIGS:
        print(f"usage: python -m gemma_export.dev.random_checkpoint NAME OUT; NAME: {', '.join(PUBLISHED_CONFIGS)}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    print(write_once(Path(sys.argv[2]), PUBLISHED_CONFIGS[sys.argv[1]]))
