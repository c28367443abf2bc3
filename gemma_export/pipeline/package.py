"""Package stage: write the artifact folder and its manifest, atomically.

The folder is assembled in a temporary sibling directory and renamed into place only when complete, so a
failed or interrupted build never leaves a half-written OUT_DIR (and `--force` never destroys the old one
before the new one exists). Nothing time- or machine-dependent goes into `model.onnx` or the manifest's
hashed content, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from gemma_export import __version__
from gemma_export.checkpoint import gguf as gguf_checkpoint
from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.pipeline import memory

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
VERSIONED = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime")
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT32: "int32"}  # fmt: skip


# Failures of the disk rather than of the build: reported as one line (exit 2), not as an internal error.
WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO") if hasattr(errno, name)
)


@contextlib.contextmanager
def staging_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, renamed to `out_dir` if the block completes, removed otherwise.

    A write that fails for want of space (ENOSPC, EDQUOT, EFBIG) or on a read-only or failing disk (EROFS, EIO)
    becomes a one-line `BadInput` naming the file in OUT_DIR's terms; the staging folder is removed either way.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise BadInput(f"{out_dir}: output directory exists (pass --force to replace it)")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as e:
        raise BadInput(f"{out_dir}: cannot create the output directory ({e.strerror})") from None
    try:
        yield tmp
        _publishable(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "replaced")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno not in WRITE_ERRNOS:
            raise
        raise BadInput(f"cannot write {_in_out_dir(e.filename, tmp, out_dir)}: {e.strerror or e}") from None
    except BaseException:  # includes KeyboardInterrupt: never leave a partial artifact behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _in_out_dir(filename: str | bytes | int | None, tmp: Path, out_dir: Path) -> Path:
    """The file a failed write was for, named as it would be in OUT_DIR (the staging folder is gone)."""
    if not isinstance(filename, str):
        return out_dir
    try:
        return out_dir / Path(filename).resolve().relative_to(tmp.resolve())
    except ValueError:
        return Path(filename)


def check_writable(out_dir: Path) -> None:
    """Can a folder be made where OUT_DIR goes? Tried for real (a probe folder made and removed) in the nearest
    existing ancestor: file modes do not stop root, while a read-only mount, /proc or a full disk do."""
    out_dir = Path(out_dir)
    parent = next((p for p in out_dir.resolve().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise BadInput(f"{out_dir}: cannot create the output directory here ({parent} is not a writable folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=parent))
    except OSError as e:
        raise BadInput(
            f"{out_dir}: cannot create the output directory here ({parent} is not a writable folder: {e.strerror})"
        ) from None


def _publishable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; the artifact gets the modes any new folder would get."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def write_model(model: ir.Model, folder: Path, progress: Callable[[int], None] | None = None) -> None:
    """model.onnx with every weight in one external file (protobuf caps a single file at 2 GB).

    The tensors stream from the IR model to disk one by one; `progress` gets the bytes written so far. Weights
    read from the memory-mapped checkpoint do not stay resident (memory.py): one that is a span of the file is
    copied from it by the kernel (`_copied_from_files`); any other view of it (a transposed weight the optimizer
    folded) has its pages dropped from this process once written.
    """
    written = 0
    mappings = memory.FileMappings()
    last: list[tuple[int, int]] = []  # the tensor being written (the callback comes before each write)

    def on_tensor(tensor: ir.TensorProtocol, info: object) -> None:
        nonlocal written
        mappings.drop(last)
        last[:] = [span] if (span := memory.extent(getattr(tensor, "raw", None))) else []
        written += tensor.nbytes
        if progress is not None:
            progress(written)

    aliases = _detach_aliases(model.graph)
    swapped = _copied_from_files(model, mappings, EXTERNAL_THRESHOLD_BYTES)
    try:
        ir.save(
            model,
            folder / MODEL_FILE,
            external_data=WEIGHTS_FILE,
            size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES,
            callback=on_tensor,
            max_workers=1,  # one writer: the same bytes in the same order, every time
        )
    except OSError as e:
        # numpy's tofile reports a short write as "problem writing element N to file", without the errno.
        # onnx_ir has removed its partial file by now, so the space it took is free again: the disk was full
        # if the weights written so far (the failed tensor included) do not fit in what is free now.
        free = shutil.disk_usage(folder).free
        if e.errno is None and written > free:
            why = f"{os.strerror(errno.ENOSPC)} ({written} bytes of weights, {free} bytes free)"
            raise OSError(errno.ENOSPC, why, str(folder / WEIGHTS_FILE)) from e
        raise
    finally:
        mappings.drop(last)
        for value, tensor in swapped:
            value.const_value = tensor
        for alias, _ in aliases:
            model.graph.register_initializer(alias)
    if aliases:
        _attach_aliases(folder / MODEL_FILE, aliases)


def _detach_aliases(graph: ir.Graph) -> list[tuple[ir.Value, str]]:
    """Initializers that alias another one's bytes (`meta["alias_of"]`: targets/ort_cpu.py's lookup tables),
    taken out of `graph` before it is saved, each with the name of the one it aliases: its bytes are written once.
    """
    aliases = [(v, v.meta["alias_of"].name) for v in graph.initializers.values() if "alias_of" in v.meta]
    for alias, _ in aliases:
        graph.initializers.pop(alias.name)
    return aliases


def _attach_aliases(model_file: Path, aliases: list[tuple[ir.Value, str]]) -> None:
    """Each alias as an initializer of its own name and shape that points at its original's bytes: the same
    `external_data` location, at the original's offset plus the alias's own (`meta["alias_offset"]`, 0 unless
    it is a slice), for its length; added to the saved graph (small: its weights are external)."""
    proto = onnx.load(str(model_file), load_external_data=False)
    saved = {t.name: t for t in proto.graph.initializer}
    for alias, origin in aliases:
        tensor = proto.graph.initializer.add()
        tensor.CopyFrom(saved[origin])
        tensor.name = alias.name
        tensor.ClearField("dims")
        tensor.dims.extend(alias.const_value.shape)
        offset, length = alias.meta.get("alias_offset", 0), alias.const_value.nbytes
        if tensor.external_data:
            entries = {e.key: e.value for e in tensor.external_data}
            entries.update(offset=str(int(entries.get("offset", 0)) + offset), length=str(length))
            tensor.ClearField("external_data")
            for key, value in entries.items():
                tensor.external_data.add(key=key, value=value)
        else:  # stored inline (small): its own slice of the original's bytes
            tensor.raw_data = saved[origin].raw_data[offset : offset + length]
    onnx.save(proto, str(model_file))


EXTERNAL_THRESHOLD_BYTES = 1024  # larger weights go to model.onnx.data; small constants (shapes, axes) stay inline


def _copied_from_files(
    model: ir.Model, mappings: memory.FileMappings, threshold: int
) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    """Point each weight whose bytes are a clean memory-mapped file span (the reference model's weights, views
    of the safetensors file: memory.FileMappings) at that span instead, as an ir.ExternalTensor, which onnx_ir
    writes with copy_file_range: the same bytes, copied in the kernel. Read through the mapping, every page would
    stay resident until the model is freed (the whole checkpoint, for the rest of the build). Returns the
    (initializer, original tensor) pairs, to put back."""
    if sys.byteorder != "little":  # the file holds little-endian bytes; so does ONNX
        return []
    swapped = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes <= threshold:
                continue
            span = mappings.file_span(getattr(tensor, "raw", None))
            if span is None or span[2] != tensor.nbytes:
                continue
            path, offset, length = span
            # base_dir "": an absolute location, outside any folder onnx_ir would confine it to
            value.const_value = ir.ExternalTensor(path, offset, length, tensor.dtype, shape=ir.Shape(tensor.shape),
                                                  name=tensor.name, base_dir="")  # fmt: skip
            swapped.append((value, tensor))
    return swapped


def graph_proto(folder: Path) -> onnx.ModelProto:
    """The saved graph without its weights (cheap to read back, for the manifest's input/output table)."""
    return onnx.load(str(folder / MODEL_FILE), load_external_data=False)


def copy_tokenizer(checkpoint_dir: Path, folder: Path) -> list[str]:
    """The checkpoint's tokenizer files copied into the artifact; for a GGUF, tokenizer.json (and
    tokenizer_config.json) built from the vocabulary it carries. Returns the names written."""
    gguf = gguf_checkpoint.find_gguf(checkpoint_dir)
    if gguf is not None:
        return gguf_checkpoint.write_tokenizer(gguf, folder)
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(checkpoint_dir) / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    return copied


def io_spec(proto: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Graph inputs and outputs; an input that is also an initializer (e.g. `logits_to_keep`) is optional, and
    its initializer is its `default`."""
    defaults = {t.name: t for t in proto.graph.initializer if not t.external_data}

    def describe(v: onnx.ValueInfoProto) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        out = {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}
        if v.name in defaults:
            out.update(optional=True, default=onnx.numpy_helper.to_array(defaults[v.name]).tolist())
        return out

    return {"inputs": [describe(v) for v in proto.graph.input], "outputs": [describe(v) for v in proto.graph.output]}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path, roles: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        role: {"path": name, "sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
        for role, name in roles.items()
    }


def versions() -> dict[str, str]:
    out = {"gemma-export": __version__}
    for dist in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def changed_files(artifact_dir: Path, manifest: Manifest) -> list[str]:
    """Files whose bytes no longer match the manifest's sha256 (or that are missing)."""
    changed = []
    for role, entry in manifest.files.items():
        path = Path(artifact_dir) / entry.path
        if not path.is_file() or sha256(path) != entry.sha256:
            changed.append(f"{entry.path} ({role})")
    return changed
