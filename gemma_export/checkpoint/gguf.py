"""Gemma checkpoints in llama.cpp's GGUF format, read as if they were a Hugging Face folder.

Many people hold Gemma only as a GGUF: llama.cpp's single file of metadata key/values, a tensor table and the
tensor data, mostly block-quantized (Q4_K, Q8_0, ...). This module gives the build the three things it reads
from a Hugging Face checkpoint, so that every later stage, the parity gate included, is the same:

* the config, as the `config.json` dict `config.parse_config` reads, from llama.cpp's metadata keys
  (`gemma3.block_count`, `gemma3.attention.sliding_window`, ...) plus what llama.cpp assumes for Gemma
  without writing it down (the local/global layer pattern, Gemma 3's local RoPE base of 10,000, the query
  scaling of the 27B models);
* the tensors under Hugging Face names, dequantized to float32 by the `gguf` package (llama.cpp's own Python
  code), each one when the model takes it. llama.cpp's converter stores every Gemma RMSNorm weight as 1 + w
  (its RMSNorm multiplies by the stored weight); the reference computes HF's (1 + w), so 1 is subtracted back,
  in float32 after dequantizing, as transformers does when it loads a GGUF;
* a `tokenizer.json` built with `tokenizers` from the vocabulary the file lists: the pipeline transformers
  builds from a Gemma GGUF (`GemmaTokenizer`: BPE with byte fallback, the merges recovered from the order of
  the vocabulary, runs of spaces spelled with '▁', control tokens special), so it gives the same ids.

The file is untrusted input: the header is parsed here (no pickle, nothing executed), every length, count and
offset checked against the file's size before it is used, and each fault is a one-line `BadInput` naming the
file and what is wrong with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import re
import struct
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_export.errors import BadInput

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

SUFFIX = ".gguf"
MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted in 32 bits and predates Gemma; llama.cpp has written v3 since 2023
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays: allowed by the format, never deeper than this in practice
DEFAULT_ALIGNMENT = 32
DEQUANTIZE_CHUNK = 1 << 22  # elements per dequantize call: bounds the gguf package's temporaries

# general.architecture -> the model_type config.parse_config reads. A Gemma 3 4B+ GGUF is `gemma3` too: llama.cpp
# writes the text decoder to the model file and the vision tower to a separate mmproj file.
MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
NOT_SUPPORTED = {
    "gemma3n": "Gemma 3n (per-layer embeddings, AltUp, plain-weight norms) is not supported",
    "gemma4": "Gemma 4 is not supported from GGUF",
    "gemma-embedding": "EmbeddingGemma is built from its sentence-transformers folder, not from a GGUF",
}

# llama.cpp's per-layer tensor names (gguf's tensor_mapping.py) -> the Hugging Face module.
_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_POST_NORMS = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
LAYER_TENSORS = {
    "gemma": {**_COMMON, "ffn_norm": "post_attention_layernorm"},  # HF's name for Gemma 1's pre-MLP norm
    "gemma2": {**_COMMON, **_POST_NORMS},
    "gemma3": {**_COMMON, **_POST_NORMS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.weight")

# llama.cpp scales queries by (hidden_size / heads) ** -0.5 instead of head_dim ** -0.5 only for the 27B models,
# which it recognises by their depth (llama-model.cpp; HF's query_pre_attn_scalar: 144 and 168 there).
DEPTH_27B = {"gemma2": 46, "gemma3": 62}
# What llama.cpp assumes when a key is absent (llama-model.cpp, llama-hparams.h).
SLIDING_PERIOD = {"gemma2": 2, "gemma3": 6}  # the layer pattern's period (_layer_types); Gemma 1 has no window
LOCAL_ROPE_BASE = 10_000.0  # Gemma 3's local layers
GEMMA2_SOFTCAPS = (50.0, 30.0)  # attention, final

# Metadata value types (GGUF spec): fixed-size scalars, then string (8) and array (9).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
# llama.cpp's token types (llama_token_type): control tokens are special, user-defined ones matched whole.
CONTROL, USER_DEFINED = 3, 4
SPACE = "▁"
_REQUIRED = object()  # a metadata key without a default


# ---- the header ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / torch order: GGUF lists the fastest-moving dimension first
    type_id: int  # ggml type (gguf.GGMLQuantizationType)
    start: int  # absolute file offset of the data
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


def read_header(path: Path) -> Header:
    """The file's metadata and tensor table (no tensor data read), checked; cached while the file is unchanged."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    return _read_header(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_header(path: str, mtime_ns: int, size: int) -> Header:
    del mtime_ns  # part of the cache key only: a file rewritten in place is read again
    if size < 4 + 4 + 8 + 8:
        raise _corrupt(path, f"{size} bytes, shorter than a GGUF header")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Parser(Path(path), buf, size).header()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None


class _Parser:
    """A cursor over the mapped file that refuses to read past its end."""

    def __init__(self, path: Path, buf: mmap.mmap, size: int) -> None:
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def header(self) -> Header:
        magic = bytes(self.buf[:4])
        if magic != MAGIC:
            raise BadInput(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        self.pos = 4
        version = self.unpack("<I", "version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            why = "a big-endian GGUF, which is not supported" if swapped in VERSIONS else "not supported"
            raise BadInput(f"{self.path}: GGUF version {version} is {why} (supported: v2, v3)")
        tensor_count = self.count("tensor count", 8 + 4 + 4 + 8)
        kv_count = self.count("metadata count", 8 + 4)
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self.string("a metadata key")
            if key in metadata:
                raise self.corrupt(f"metadata key {key!r} given twice")
            metadata[key] = self.value(self.unpack("<I", f"the type of {key!r}"), key, depth=0)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 8 or alignment & (alignment - 1):
            raise self.corrupt(f"general.alignment {alignment!r} is not a power of two >= 8")
        entries = [self.tensor_entry() for _ in range(tensor_count)]
        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in entries:
            if name in tensors:
                raise self.corrupt(f"tensor {name!r} listed twice")
            tensors[name] = self.tensor_info(name, shape, type_id, offset, data_start, alignment)
        if not isinstance(metadata.get("general.architecture"), str):
            raise self.corrupt("no general.architecture string in the metadata")
        return Header(self.path, metadata, tensors)

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.size - start:
            raise self.corrupt(f"{what} runs past the end of the file ({self.size} bytes) at byte {start}")
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, min_bytes: int) -> int:
        """A u64 count of items of at least `min_bytes` each, which must fit in the rest of the file."""
        n = self.unpack("<Q", what)
        if n * min_bytes > self.size - self.pos:
            raise self.corrupt(f"{what} {n} cannot fit in the {self.size - self.pos} bytes left")
        return n

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} at byte {start} is not UTF-8") from None

    def value(self, type_id: int, key: str, depth: int) -> Any:
        if type_id in _SCALAR_FORMATS:
            v = self.unpack(_SCALAR_FORMATS[type_id], f"the value of {key!r}")
            # a float32 holds e.g. 1e-6 as 9.99999997e-07: keep the shortest decimal that rounds to it (1e-06)
            return float(str(np.float32(v))) if type_id == _FLOAT32 else v
        if type_id == _STRING:
            return self.string(f"the value of {key!r}")
        if type_id == _ARRAY and depth < MAX_NESTING:
            return self.array(key, depth)
        if type_id == _ARRAY:
            raise self.corrupt(f"metadata key {key!r} nests arrays deeper than {MAX_NESTING}")
        raise self.corrupt(f"metadata key {key!r} has unknown value type {type_id}")

    def array(self, key: str, depth: int) -> list[Any]:
        element = self.unpack("<I", f"the element type of {key!r}")
        fmt = _SCALAR_FORMATS.get(element)
        n = self.count(f"the length of {key!r}", struct.calcsize(fmt) if fmt else 8)
        if fmt is not None:  # numbers (scores, token types): read at once
            dtype = np.dtype(fmt)
            return np.frombuffer(self.buf, dtype, n, self.take(n * dtype.itemsize, repr(key))).tolist()
        return [self.value(element, key, depth + 1) for _ in range(n)]

    def tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string("a tensor name")
        n_dims = self.unpack("<I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.take(8 * n_dims, f"the shape of {name!r}"))
        type_id = self.unpack("<I", f"the type of tensor {name!r}")
        offset = self.unpack("<Q", f"the offset of tensor {name!r}")
        return name, tuple(reversed(dims)), type_id, offset

    def tensor_info(
        self, name: str, shape: tuple[int, ...], type_id: int, offset: int, data_start: int, alignment: int
    ) -> TensorInfo:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise BadInput(f"{self.path}: tensor {name!r} has unknown ggml type {type_id}") from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise self.corrupt(f"tensor {name!r} rows of {shape[-1]} are not whole {qtype.name} blocks of {block}")
        nbytes = math.prod(shape) // block * block_bytes
        if offset % alignment:
            raise self.corrupt(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > self.size:
            raise self.corrupt(
                f"tensor {name!r} ({nbytes} bytes at {data_start + offset}) runs past the end of the file "
                f"({self.size} bytes)"
            )
        return TensorInfo(name, shape, type_id, data_start + offset, nbytes)

    def corrupt(self, why: str) -> BadInput:
        return _corrupt(self.path, why)


def _corrupt(path: Path | str, why: str) -> BadInput:
    return BadInput(f"{path}: truncated or corrupt GGUF file ({why})")


# ---- finding the file ---------------------------------------------------------------------------------------


def find_gguf(path: Path) -> Path | None:
    """The GGUF file a checkpoint argument names: the path itself if it is a `.gguf` file, or the one `.gguf`
    file of a folder without a `config.json` (a Hugging Face folder that also ships a GGUF is read as such);
    None for anything else. A folder with several is refused: which one to build is the user's choice."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX and not path.is_dir():
        if not path.is_file():
            raise BadInput(f"{path}: no such GGUF file")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
        raise BadInput(f"{path}: holds {len(found)} .gguf files ({names}); pass the one to build, e.g. {found[0]}")
    return found[0] if found else None


def architecture(header: Header) -> str:
    """general.architecture, if it is a Gemma this module reads (and the file is the whole model)."""
    shards = header.metadata.get("split.count", 1)
    if shards != 1:  # llama.cpp's gguf-split: the tensors are spread over several files
        raise BadInput(f"{header.path}: one shard of a split GGUF ({shards!r} files); merge them first "
                       "(llama-gguf-split --merge FIRST-SHARD OUT.gguf)")  # fmt: skip
    arch = header.architecture
    if arch in MODEL_TYPES:
        return arch
    why = NOT_SUPPORTED.get(arch, "not a Gemma")
    raise BadInput(
        f"{header.path}: unsupported GGUF architecture {arch!r} ({why}); supported: {', '.join(MODEL_TYPES)}"
    )


# ---- config ------------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """The model's config as a Hugging Face `config.json` dict (for config.parse_config)."""
    header = read_header(path)
    arch = architecture(header)
    meta = _Meta(header, arch)
    hidden, layers = meta.int("embedding_length"), meta.int("block_count")
    heads = meta.per_layer_int("attention.head_count")
    head_dim = meta.int("attention.key_length", hidden // heads if heads else 0)
    eos = [meta.token_id("eos", 1)]
    eot = meta.token_id("eot", None)  # instruction-tuned files: <end_of_turn> ends a turn as well
    if eot is not None and eot not in eos:
        eos.append(eot)
    raw: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch],
        "vocab_size": _vocab_size(header, meta),
        "hidden_size": hidden,
        "intermediate_size": meta.int("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.per_layer_int("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": meta.int("context_length"),
        "bos_token_id": meta.token_id("bos", 2),
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": meta.token_id("padding", 0),
        "layer_types": _layer_types(meta, arch, layers),
        "rope_parameters": _rope(meta, arch),
        "tie_word_embeddings": True,
    }
    if arch != "gemma":
        raw["sliding_window"] = meta.int("attention.sliding_window", 4096 if arch == "gemma2" else _REQUIRED)
        raw["query_pre_attn_scalar"] = hidden // heads if heads and layers == DEPTH_27B[arch] else head_dim
    if arch == "gemma2":
        raw["attn_logit_softcapping"] = meta.number("attn_logit_softcapping", GEMMA2_SOFTCAPS[0])
        raw["final_logit_softcapping"] = meta.number("final_logit_softcapping", GEMMA2_SOFTCAPS[1])
    return raw


def _vocab_size(header: Header, meta: _Meta) -> int:
    """The key if the file has one, else the embedding's rows (what the model computes logits for), else the
    vocabulary's length."""
    embedding = header.tensors.get("token_embd.weight")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    fallback = embedding.shape[0] if embedding is not None else len(tokens) if isinstance(tokens, list) else None
    return meta.int("vocab_size", fallback)


def _layer_types(meta: _Meta, arch: str, layers: int) -> list[str]:
    """llama.cpp's `set_swa_pattern(n)`: layer i slides when n == 0 or i % n < n - 1 (Gemma 2: n = 2, even layers;
    Gemma 3: n = 6, five local then one global). Newer files may state the pattern, or one flag per layer."""
    if arch == "gemma":
        return ["full_attention"] * layers
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = meta.header.metadata.get(key, SLIDING_PERIOD[arch])
    if isinstance(pattern, list) and len(pattern) == layers and all(isinstance(x, bool) for x in pattern):
        sliding = pattern
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
    else:
        raise BadInput(f"{meta.header.path}: metadata key {key!r} must be a period or {layers} flags, got {pattern!r}")
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _rope(meta: _Meta, arch: str) -> dict[str, Any]:
    """transformers 5's `rope_parameters`: one for every layer (Gemma 1, 2), or per layer type (Gemma 3, whose
    local layers llama.cpp runs at base 10,000 unscaled unless the file says otherwise)."""
    theta = meta.number("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0)
    kind = meta.string("rope.scaling.type", None)
    factor = meta.number("rope.scaling.factor", None)
    if factor is None and meta.number("rope.scale_linear", None) is not None:  # the older spelling
        kind, factor = kind or "linear", meta.number("rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    elif kind == "linear" and factor is not None:
        rope = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    else:
        raise BadInput(f"{meta.header.path}: unsupported RoPE scaling {kind!r} (factor {factor}); supported: linear")
    if arch != "gemma3":
        return rope
    local = {"rope_type": "default", "rope_theta": meta.number("rope.freq_base_swa", LOCAL_ROPE_BASE)}
    return {"sliding_attention": local, "full_attention": rope}


class _Meta:
    """Typed access to `{arch}.*` and tokenizer keys; a wrong type is a one-line error naming the key."""

    def __init__(self, header: Header, arch: str) -> None:
        self.header, self.arch = header, arch

    def _get(self, key: str, default: Any) -> Any:
        if key in self.header.metadata:
            return self.header.metadata[key]
        if default is _REQUIRED:
            raise BadInput(f"{self.header.path}: GGUF metadata key {key!r} is missing")
        return default

    def _fail(self, key: str, what: str, value: Any) -> BadInput:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return BadInput(f"{self.header.path}: GGUF metadata key {key!r} must be {what}, got {shown}")

    def int(self, name: str, default: Any = _REQUIRED) -> Any:
        key = f"{self.arch}.{name}"
        v = self._get(key, default)
        if v is not None and not _is_int(v):
            raise self._fail(key, "an integer", v)
        return v

    def per_layer_int(self, name: str, default: Any = _REQUIRED) -> int:
        """A count llama.cpp lets a file give per layer (head counts); Gemma's are the same in every layer."""
        key = f"{self.arch}.{name}"
        v = self._get(key, default)
        values = v if isinstance(v, list) else [v]
        if not values or not all(_is_int(x) for x in values) or len(set(values)) > 1:
            raise self._fail(key, "an integer (the same in every layer)", v)
        return values[0]

    def number(self, name: str, default: Any = _REQUIRED) -> Any:
        key = f"{self.arch}.{name}"
        v = self._get(key, default)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
            raise self._fail(key, "a number", v)
        return float(v) if v is not None else None

    def string(self, name: str, default: Any = _REQUIRED) -> Any:
        key = f"{self.arch}.{name}"
        v = self._get(key, default)
        if v is not None and not isinstance(v, str):
            raise self._fail(key, "a string", v)
        return v

    def token_id(self, kind: str, default: int | None) -> int | None:
        key = f"tokenizer.ggml.{kind}_token_id"
        v = self._get(key, default)
        if v is not None and (not _is_int(v) or v < 0):
            raise self._fail(key, "a token id", v)
        return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- tensors -----------------------------------------------------------------------------------------------


def read_tensors(path: Path) -> GgufTensors:
    """The file's tensors under Hugging Face names, dequantized when looked up (checkpoint.read_tensors)."""
    header = read_header(path)
    arch = architecture(header)
    layers = _Meta(header, arch).int("block_count")
    _check_complete(header, arch, layers)
    return GgufTensors(header, _hf_names(header, arch))


def _hf_names(header: Header, arch: str) -> dict[str, str]:
    """Hugging Face name -> GGUF name. A tensor this mapping does not know keeps its GGUF name, so that the
    checkpoint reader reports it as one the model does not use."""
    names = {}
    for name in header.tensors:
        match = _LAYER_NAME.fullmatch(name)
        module = LAYER_TENSORS[arch].get(match.group(2)) if match else None
        hf = f"model.layers.{match.group(1)}.{module}.weight" if match and module else TOP_TENSORS.get(name, name)
        if hf in names:  # e.g. a tensor literally named like the one another tensor is mapped to
            raise BadInput(f"{header.path}: tensors {names[hf]!r} and {name!r} would both be {hf!r}")
        names[hf] = name
    return names


def _check_complete(header: Header, arch: str, layers: int) -> None:
    """Every tensor llama.cpp's Gemma graph needs, named as the file names them; and no untied LM head."""
    if "output.weight" in header.tensors:  # llama.cpp would use it; the Gemma reference ties the head
        raise BadInput(f"{header.path}: has an 'output.weight' (an LM head apart from the embedding); Gemma ties them")
    needed = [*TOP_TENSORS, *(f"blk.{i}.{t}.weight" for i in range(layers) for t in LAYER_TENSORS[arch])]
    missing = [name for name in needed if name not in header.tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BadInput(f"{header.path}: missing tensor {missing[0]!r}{more} ({arch}, {layers} layers)")


class GgufTensors(Mapping[str, "torch.Tensor"]):
    """Tensors under Hugging Face names, each dequantized to float32 when it is looked up, and not kept here: the
    caller (the model) holds the only copy. A float32 tensor is a view of a private (copy-on-write) mapping of the
    file, as safetensors' are, so its pages are the file's; every other one is a new array."""

    def __init__(self, header: Header, names: dict[str, str]) -> None:
        self.header, self.names = header, names
        self._data: np.ndarray | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch

        info = self.header.tensors[self.names[key]]
        array = _dequantize(self.header.path, self._file(), info)
        if key.endswith("norm.weight"):  # stored as 1 + w (llama.cpp's converter); HF's weight is w
            array = array - np.float32(1)
        return torch.from_numpy(array)

    def __contains__(self, key: object) -> bool:  # Mapping's default would dequantize
        return key in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def _file(self) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.header.path, dtype=np.uint8, mode="c")
        return self._data


def _dequantize(path: Path, data: np.ndarray, info: TensorInfo) -> np.ndarray:
    """One tensor as float32, in row chunks so that the gguf package's temporaries stay small."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.type_id)
    raw = data[info.start : info.start + info.nbytes]
    if qtype == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(info.shape)
    out = np.empty(info.shape, np.float32)
    if out.size == 0:
        return out
    rows = out.reshape(-1, info.shape[-1])
    raw_rows = raw.reshape(rows.shape[0], -1)
    step = max(1, DEQUANTIZE_CHUNK // info.shape[-1])
    with np.errstate(all="ignore"):  # a corrupt block scale (inf, NaN) is reported below, not warned about
        for i in range(0, rows.shape[0], step):
            try:
                rows[i : i + step] = quants.dequantize(raw_rows[i : i + step], qtype)
            except NotImplementedError:  # integer types (I8 ... I64), F64, and any type gguf cannot unpack
                raise BadInput(
                    f"{path}: tensor {info.name!r} has ggml type {qtype.name}, which has no float dequantization"
                ) from None
            if not np.isfinite(rows[i : i + step]).all():
                raise BadInput(f"{path}: tensor {info.name!r} ({qtype.name}) dequantizes to inf or NaN: corrupt blocks")
    return out


def tensor_types(header: Header) -> dict[str, int]:
    """How many tensors the file stores in each ggml type, e.g. {"F32": 109, "Q4_K": 27, ...}."""
    from gguf import GGMLQuantizationType

    counts = Counter(GGMLQuantizationType(t.type_id).name for t in header.tensors.values())
    return dict(sorted(counts.items()))


def manifest_source(checkpoint: Path) -> dict[str, Any]:
    """The manifest's `model.source` for a GGUF checkpoint (file, sha256, tensor types); {} for any other."""
    path = find_gguf(checkpoint)
    if path is None:
        return {}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    header = read_header(path)
    return {"source": {"format": "gguf", "file": path.name, "sha256": digest.hexdigest(),
                       "bytes": path.stat().st_size, "architecture": header.architecture,
                       "tensor_types": tensor_types(header)}}  # fmt: skip


# ---- tokenizer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str] | None  # "a b" pairs, when the file lists them (Gemma's files do not)
    bos: str | None
    eos: str | None
    unk: str | None
    pad: str | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_vocabulary(header: Header) -> Vocabulary | None:
    """The tokenizer the file describes (llama.cpp's `tokenizer.ggml.*` keys), or None if it carries none."""
    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":  # Gemma's SentencePiece vocabulary, which llama.cpp calls "llama"
        raise BadInput(f"{header.path}: tokenizer model {model!r} is not Gemma's SentencePiece ('llama')")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = meta.get("tokenizer.ggml.merges")
    for key, value, kind in (("tokens", tokens, str), ("token_type", types, int), ("merges", merges or [], str)):
        if not isinstance(value, list) or not all(isinstance(x, kind) for x in value):
            raise BadInput(f"{header.path}: tokenizer.ggml.{key} must be a list of {kind.__name__}")
    if len(types) != len(tokens):
        raise BadInput(f"{header.path}: tokenizer.ggml.token_type lists {len(types)} types for {len(tokens)} tokens")

    def token(kind: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{kind}_token_id")
        if i is None:
            return None
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tokens):
            raise BadInput(f"{header.path}: tokenizer.ggml.{kind}_token_id {i!r} is not a token of the vocabulary")
        return tokens[i]

    template = meta.get("tokenizer.chat_template")
    return Vocabulary(
        tokens=tokens,
        types=types,
        merges=merges,
        bos=token("bos"),
        eos=token("eos"),
        unk=token("unknown"),
        pad=token("padding"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to (as transformers assumes)
        add_bos=_flag(meta.get("tokenizer.ggml.add_bos_token"), default=True),
        add_eos=_flag(meta.get("tokenizer.ggml.add_eos_token"), default=False),
        chat_template=template if isinstance(template, str) else None,
    )


def _flag(value: Any, default: bool) -> bool:
    return bool(value) if isinstance(value, bool | int) else default


def build_tokenizer(vocab: Vocabulary) -> Tokenizer:
    """The `tokenizers` pipeline of Gemma's tokenizer (as transformers' GemmaTokenizer and its GGUF conversion
    build it): normalizer ' ' -> '▁', BPE with byte fallback over `<0xNN>` pieces, decoder '▁' -> ' ' +
    ByteFallback + Fuse, BOS prepended, control tokens special and user-defined ones matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    # A run of spaces is stored with real spaces ("  "), which the normalizer never leaves in the text: spell it
    # as the normalized text does ("▁▁").
    pieces = [SPACE * len(t) if " " in t and not t.strip() else t for t in vocab.tokens]
    ids = {piece: i for i, piece in enumerate(pieces)}
    merges = [_pair(m) for m in vocab.merges] if vocab.merges else _merges_from_order(ids)
    tok = Tokenizer(BPE(vocab=ids, merges=merges, unk_token=vocab.unk or "<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # a no-op after the normalizer, as in HF
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [t for t, kind in zip(vocab.tokens, vocab.types, strict=True) if kind == CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, kind in zip(vocab.tokens, vocab.types, strict=True) if kind == USER_DEFINED and t in ids]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    tok.post_processor = _post_processor(vocab, ids)
    return tok


def _pair(merge: str) -> tuple[str, str]:
    """A merge as the file writes it, "left right"."""
    left, space, right = merge.partition(" ")
    if not space or not left or not right:
        raise ValueError(f"merge {merge[:40]!r} is not two pieces separated by a space")
    return left, right


def _merges_from_order(ids: dict[str, int]) -> list[tuple[str, str]]:
    """A Gemma GGUF lists no merges; SentencePiece-BPE merges are recovered from the vocabulary: every split of a
    piece into two pieces, pieces in vocabulary order (Gemma's merge order; its scores do not follow it), each
    piece's splits longest left part first. This is transformers' `generate_merges` with the pieces' positions
    as scores, ordered here directly instead of by a sort."""
    merges = []
    for piece, _ in sorted(ids.items(), key=lambda item: item[1]):
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((left, right))
    return merges


def _post_processor(vocab: Vocabulary, ids: dict[str, int]) -> Any:
    """BOS (and EOS, if the file asks) around each sequence, as transformers' update_post_processor writes it."""
    from tokenizers import processors

    bos, eos = (vocab.bos if vocab.add_bos else None), (vocab.eos if vocab.add_eos else None)
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = [(t, ids[t]) for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_config(vocab: Vocabulary, max_length: int | None) -> dict[str, Any]:
    """`tokenizer_config.json` for the built tokenizer: the class onnxruntime-genai picks its implementation by,
    the named special tokens and whether BOS/EOS are added."""
    named = {"bos_token": vocab.bos, "eos_token": vocab.eos, "unk_token": vocab.unk, "pad_token": vocab.pad}
    config: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        **{key: token for key, token in named.items() if token is not None},
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
    }
    if max_length is not None:
        config["model_max_length"] = max_length
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    return config


def write_tokenizer(path: Path, folder: Path) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json built from the GGUF's vocabulary; returns the names written
    (none if the file carries no vocabulary)."""
    header = read_header(path)
    vocab = read_vocabulary(header)
    if vocab is None:
        return []
    try:
        tokenizer = build_tokenizer(vocab)
    except Exception as e:  # the tokenizers library raises plain Exception (a merge of unknown pieces, ...)
        first = next(iter(str(e).splitlines()), type(e).__name__)
        raise BadInput(f"{path}: cannot build a tokenizer from its vocabulary ({first})") from None
    tokenizer.save(str(Path(folder) / "tokenizer.json"))
    max_length = header.metadata.get(f"{header.architecture}.context_length")
    config = tokenizer_config(vocab, max_length if isinstance(max_length, int) else None)
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
