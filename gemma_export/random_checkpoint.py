"""Deterministic random-weight Gemma checkpoints, in the exact Hugging Face on-disk layout.

No real Gemma weights can be downloaded where this tool is built and tested, yet every path of the exporter
(config parsing, safetensors reading, sharded indexes, the tokenizer files that ONNX Runtime GenAI loads)
has to be exercised on files that look exactly like the hub's. This module writes such files from a seed:
`config.json`, `generation_config.json`, `model.safetensors` (or shards plus an index) and a small
Gemma-style tokenizer. It is what the `make demo` default checkpoint is made of, and what benchmarks use
at realistic sizes (a Gemma-3-270M config and up).

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

from gemma_export.config import SLIDING, GemmaConfig, parse_config
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
}

_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

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


def write_tokenizer(out_dir: Path, *, model_max_length: int = 1024) -> None:
    """Deterministic small Gemma-style tokenizer: tokenizer.json, tokenizer_config.json and
    special_tokens_map.json.

    `tokenizer_config.json` matters as much as `tokenizer.json`: transformers 5 takes the special tokens
    from its `added_tokens_decoder`, and onnxruntime-extensions picks its tokenizer implementation from
    `tokenizer_class` and reads `add_bos_token` from it.
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
        "chat_template": CHAT_TEMPLATE,
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
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


Spec = tuple[str, tuple[int, ...], float]  # tensor name, shape, standard deviation


def tensor_specs(cfg: GemmaConfig, *, tie_word_embeddings: bool = True) -> list[Spec]:
    """(name, shape, std) of every stored tensor, in the order transformers' state_dict lists them.

    The order is also the order of generation, so it fixes every value for a seed. The lm_head is not
    stored when tied (transformers drops tied weights on save). Standard deviations are 1/sqrt(fan_in) for
    projections and 1/sqrt(hidden) for the embedding (which Gemma multiplies by sqrt(hidden)), so that
    activations stay of unit scale at any size: logits are then neither flat, which would make top-k
    comparisons between the exporter and transformers meaningless, nor saturated.
    """
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

    `config` is an HF-style config.json dict of a text model (gemma, gemma2, gemma3_text; the hub's
    transformers-4 spelling is accepted too), e.g. one of `TINY_CONFIGS`. Same config, seed and dtype give
    byte-identical files, and the tensors' values do not depend on sharding. Tensors are generated one at a
    time and streamed to disk, so memory stays at one tensor whatever the model size. Checkpoint files left
    in out_dir by an earlier write are removed first, so that a loader never sees a mix of two.
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
    cfg = parse_config(config, source="random checkpoint config")
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


def _config_json(config: dict[str, Any], cfg: GemmaConfig, dtype: str) -> dict[str, Any]:
    """The caller's config with what a saved checkpoint's config.json always has: architectures and dtype."""
    out = dict(config)
    out.setdefault("architectures", [_ARCHITECTURES[cfg.model_type]])
    out.pop("torch_dtype", None)  # transformers 4's name for it
    out["dtype"] = dtype
    return out


def _generation_config(cfg: GemmaConfig) -> dict[str, Any]:
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
        for _, shape, std in specs:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(torch_dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _write_json(path: Path, obj: Any) -> None:
    """Sorted keys and a trailing newline, as transformers writes its JSON files; stable bytes for a seed."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
