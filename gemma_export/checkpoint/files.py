"""Read a Hugging Face-format checkpoint's tensors and match them to the model's parameter names.

Safetensors is the format read: it is memory-mapped (a 27B checkpoint does not have to fit in RAM) and, unlike
pickle (`*.bin`, `*.pt`), loading it cannot run code. Each file's header is checked here before the
`safetensors` library sees it, so that a truncated download or a corrupt file is a one-line `BadInput`
naming the file and the fault, not a Rust panic message or a crash deep in torch.

Pickled weights (`pytorch_model.bin`, its sharded index, `*.ckpt`, `*.pt`, `*.pth`) are refused unless the
caller passes `allow_pickle=True` (the CLI's `--allow-pickle`), and even then they are read only by torch's
weights-only unpickler (`torch.load(weights_only=True)`), which builds tensors and plain containers and refuses
any other global, so a file whose pickle would call a function is a `BadInput`, not code run.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gemma_export.checkpoint import gguf as gguf_checkpoint
from gemma_export.errors import BadInput

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ALLOW_PICKLE_HINT = (
    "pass --allow-pickle to read them with torch.load(weights_only=True), or convert them to safetensors"
)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_REPORTED = 5

# Bytes per element of the dtypes torch can hold; anything else in a header is refused up front.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def read_tensors(checkpoint_dir: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, memory-mapped via safetensors (pickle only if `allow_pickle`).

    `model.safetensors.index.json` wins over `model.safetensors` when both exist, as in transformers, and
    safetensors wins over pickled weights. Tensors are returned in the dtype stored on disk; the caller casts.
    A GGUF file (or a folder's one GGUF) gives float32 tensors under Hugging Face names, each dequantized when
    looked up (gguf_checkpoint.GgufTensors, a read-only mapping).
    """
    gguf = gguf_checkpoint.find_gguf(checkpoint_dir)
    if gguf is not None:
        return gguf_checkpoint.read_tensors(gguf)  # a read-only Mapping, used like the dict
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise BadInput(f"{root}: checkpoint directory does not exist")
    index, files, read = _layout(root, allow_pickle)
    weight_map = _read_index(index) if index is not None else {}
    if index is not None:
        files = [_shard_path(root, index, shard) for shard in dict.fromkeys(weight_map.values())]

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        for name, tensor in read(path).items():
            if name in origin:
                raise BadInput(f"{root}: tensor {name!r} is stored twice, in {origin[name].name!r} and {path.name!r}")
            tensors[name], origin[name] = tensor, path
    for name, shard in weight_map.items():
        if origin.get(name) != root / shard:
            raise BadInput(f"{index}: tensor {name!r} is mapped to {shard!r}, which does not contain it")
    return tensors


def _layout(
    root: Path, allow_pickle: bool
) -> tuple[Path | None, list[Path], Callable[[Path], dict[str, torch.Tensor]]]:
    """(index file or None, the files when there is no index, the reader of one file), in transformers' order."""
    if (root / INDEX_FILE).is_file():
        return root / INDEX_FILE, [], _read_file
    if (root / SINGLE_FILE).is_file():
        return None, [root / SINGLE_FILE], _read_file
    if not allow_pickle:
        raise BadInput(_no_safetensors_message(root))
    if (root / PICKLE_INDEX_FILE).is_file():
        return root / PICKLE_INDEX_FILE, [], _read_pickle
    if (root / PICKLE_FILE).is_file():
        return None, [root / PICKLE_FILE], _read_pickle
    pickled = _pickled_files(root)
    if len(pickled) > 1:
        names = ", ".join(p.name for p in pickled[:MAX_REPORTED])
        raise BadInput(
            f"{root}: several pickled weight files ({names}) and no {PICKLE_INDEX_FILE} saying which to read"
        )
    if not pickled:
        raise BadInput(_no_safetensors_message(root))
    return None, pickled, _read_pickle


def select_weights(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]],
    prefixes: tuple[str, ...],
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
    anchor: str = "embed_tokens.weight",
) -> dict[str, torch.Tensor]:
    """Map checkpoint names to the model's names and validate them.

    `expected` maps model names (`layers.0.self_attn.q_proj.weight`) to (shape, dtype or None for "any
    floating dtype"). The checkpoint name is prefix + model name, for the first prefix under which the
    `anchor` tensor (`embed_tokens.weight`) exists. Every expected tensor must be there with the right shape and
    a floating dtype, and every checkpoint tensor must be used: a tensor nobody reads is a sign that the checkpoint
    is not the model the config describes, which would otherwise export silently wrong.

    An ignore prefix (`vision_tower.`, `lm_head.`) matches at the top level and also under the outermost
    component of the prefix in use, because multimodal checkpoints nest the vision tower either beside
    `language_model.model.` or inside `model.` (`model.vision_tower.` beside `model.language_model.`).
    """
    prefix = next((p for p in prefixes if p + anchor in tensors), None)
    if prefix is None:
        tried = ", ".join(repr(p + anchor) for p in prefixes)
        raise BadInput(f"{source}: no {anchor!r} tensor found (looked for {tried}); {_sample(tensors)}")

    selected: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in expected.items():
        key = prefix + name
        tensor = tensors.get(key)
        if tensor is None:
            raise BadInput(f"{source}: missing tensor {key!r}")
        if not tensor.is_floating_point():
            raise BadInput(f"{source}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
        if dtype is not None and tensor.dtype != dtype:
            raise BadInput(f"{source}: tensor {key!r} has dtype {tensor.dtype}, expected {dtype}")
        if tuple(tensor.shape) != tuple(shape):
            want, found = list(shape), list(tensor.shape)
            raise BadInput(f"{source}: tensor {key!r} has the wrong shape: expected {want}, found {found}")
        selected[name] = tensor

    outer = prefix.split(".", 1)[0] + "."
    ignored = tuple(ignore_prefixes) + tuple(outer + p for p in ignore_prefixes)
    used = {prefix + name for name in expected}
    unexpected = sorted(k for k in tensors if k not in used and not k.startswith(ignored))
    if unexpected:
        shown = ", ".join(map(repr, unexpected[:MAX_REPORTED]))
        more = f" and {len(unexpected) - MAX_REPORTED} more" if len(unexpected) > MAX_REPORTED else ""
        raise BadInput(f"{source}: {len(unexpected)} unexpected tensor(s) the model does not use: {shown}{more}")
    return selected


def _read_index(index: Path) -> dict[str, str]:
    """The index's `weight_map` (tensor name -> shard file name), type-checked."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{index}: not a readable JSON file ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise BadInput(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file name")
    if not weight_map:
        raise BadInput(f"{index}: 'weight_map' is empty")
    return weight_map


def _shard_path(root: Path, index: Path, shard: str) -> Path:
    """A shard named by the index; it must be a plain file name in the checkpoint directory."""
    if Path(shard).name != shard or shard in ("", ".", ".."):
        raise BadInput(f"{index}: shard name {shard!r} must be a file name inside the checkpoint directory")
    path = root / shard
    if not path.is_file():
        raise BadInput(f"{index}: shard {shard!r} is missing from {root}")
    return path


def _pickled_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def _no_safetensors_message(root: Path) -> str:
    pickled = [p.name for p in _pickled_files(root)]
    if (root / PICKLE_INDEX_FILE).is_file():
        pickled.insert(0, PICKLE_INDEX_FILE)
    if pickled:
        return (
            f"{root}: only pickled weights found ({', '.join(pickled[:MAX_REPORTED])}); they are refused "
            f"because unpickling can run arbitrary code; {ALLOW_PICKLE_HINT}"
        )
    others = sorted(p.name for p in root.glob("*.safetensors"))
    hint = f" (found {', '.join(others[:MAX_REPORTED])} but no index naming them)" if others else ""
    return f"no {SINGLE_FILE} or {INDEX_FILE} in {root}{hint}"


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save` file, built by torch's weights-only unpickler and nothing else.

    `weights_only=True` is passed explicitly, so no environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)
    can turn it off. The zip format that torch.save writes since 1.6 is memory-mapped; the legacy format
    cannot be, and is read into memory.
    """
    try:
        mmap = zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": stderr stays one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # what weights_only raises for a global or opcode it does not allow
        raise BadInput(
            f"{path}: holds objects other than tensors, which torch.load(weights_only=True) refuses to build "
            f"({_weights_only_reason(e)})"
        ) from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or _first_line(e)})") from None
    except Exception as e:  # a corrupt file fails in many ways (zip reader, unpickler, storage sizes)
        why = _first_line(e).split(". ")[0] if str(e) else ""
        raise BadInput(
            f"{path}: truncated or corrupt PyTorch file ({type(e).__name__}{': ' if why else ''}{why})"
        ) from None
    return _state_dict(path, obj)


def _state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """A flat dict of name -> tensor; a training checkpoint's (Lightning `.ckpt`) weights under "state_dict"."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: holds a {type(obj).__name__}, expected a dict of tensor name -> tensor")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise BadInput(
                f"{path}: entry {_short(name)} holds a {type(value).__name__}, expected a dict of tensor name -> tensor"
            )
        if value.layout != torch.strided:
            raise BadInput(f"{path}: tensor {name!r} has layout {value.layout}, expected a dense tensor")
    return {name: value.detach() for name, value in obj.items()}


def _weights_only_reason(e: BaseException) -> str:
    """The one informative line of torch's several-paragraph refusal ("Unsupported global: ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    noise = ("Weights only load failed", "Check the documentation", "Please file an issue")
    return " ".join(line for line in lines if not line.startswith(noise)) or _first_line(e)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, memory-mapped, after `_check_header` has vetted the file."""
    names = _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {_first_line(e)}") from None


def _check_header(path: Path) -> list[str]:
    """Validate the 8-byte length, the JSON header and every tensor's byte span; return the tensor names.

    Layout: u64 little-endian N, N bytes of JSON, then the data section; `data_offsets` are relative to it.
    Reading only the header is cheap even for a 10 GB shard.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise _corrupt(path, f"header length {header_len} past end of file of {size} bytes")
            if header_len > MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {header_len} over the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(header_len)
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _corrupt(path, f"header is not JSON: {_first_line(e)}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, expected an object")

    data_len = size - 8 - header_len
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_entry_problem(info, data_len)
        if problem:
            raise _corrupt(path, f"tensor {name!r}: {problem}")
        names.append(name)
    return names


def _tensor_entry_problem(info: Any, data_len: int) -> str | None:
    """Why a header entry cannot describe a tensor inside a data section of `data_len` bytes, or None."""
    if not isinstance(info, dict):
        return "entry is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        return f"unsupported dtype {_short(dtype)}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {_short(shape)} is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return f"data_offsets {_short(offsets)} is not a pair of non-negative integers"
    begin, end = offsets
    if begin > end:
        return f"data_offsets {offsets} end before they begin"
    if end > data_len:
        return f"data_offsets {offsets} past end of file (data section is {data_len} bytes)"
    if math.prod(shape) * DTYPE_BYTES[dtype] != end - begin:
        return f"shape {_short(shape)} of {dtype} does not fill data_offsets {offsets} ({end - begin} bytes)"
    return None


def _is_count(x: Any) -> bool:
    """A JSON integer that fits safetensors' u64 (bigger ones would only make huge error messages)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a name given twice in a header is ambiguous (json.loads would keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _short(value: Any, limit: int = 60) -> str:
    """A JSON value for a message: one line (repr escapes newlines) and short, whatever the file holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(e: BaseException) -> str:
    return next(iter(str(e).splitlines()), type(e).__name__)


def _corrupt(path: Path, why: str) -> BadInput:
    return BadInput(f"{path}: truncated or corrupt safetensors file ({why})")


def _sample(tensors: dict[str, torch.Tensor]) -> str:
    if not tensors:
        return "the checkpoint has no tensors"
    names = ", ".join(map(repr, sorted(tensors)[:MAX_REPORTED]))
    return f"the checkpoint has {len(tensors)} tensor(s), e.g. {names}"
