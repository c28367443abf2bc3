"""`gemma-export verify` on a tensorrt artifact: the graph on ONNX Runtime, and the engines where they can run.

What runs where (README "TensorRT target"):
  * the graph: everywhere, on ONNX Runtime's CPU provider (bf16 through emulation.py, in a scratch folder with a
    hard link to (or, across file systems, a copy of) the artifact's weights: ONNX Runtime refuses external data
    that resolves outside the graph's folder, so a symbolic link will not do; the artifact is not written to);
  * an engine: only on an NVIDIA GPU of a compute capability it was built for, with the TensorRT runtime that
    built it (TensorRT-RTX engines do not run on Hopper: there is no SM90 target) and PyTorch with CUDA to hold
    the tensors. Elsewhere `engine_status` says why not, and verify prints that reason instead of a result.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.manifest import FileEntry, Manifest
from gemma_export.targets.tensorrt import emulation


@contextlib.contextmanager
def graph_folder(artifact: Path, manifest: Manifest) -> Iterator[tuple[Path, Manifest]]:
    """(folder, manifest) that ONNX Runtime's CPU provider runs: the artifact itself, or for bf16 a scratch
    folder with the emulated graph beside a link to the artifact's weights."""
    if manifest.build.precision != "bf16":
        yield Path(artifact), manifest
        return
    with tempfile.TemporaryDirectory(prefix="gemma-export-bf16-") as scratch:
        folder = Path(scratch)
        weights = manifest.files["weights"].path
        try:
            os.link(Path(artifact) / weights, folder / weights)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(Path(artifact) / weights, folder / weights)
        shutil.copyfile(Path(artifact) / manifest.files["model"].path, folder / "model.onnx")
        path = emulation.write(folder)
        files = {**manifest.files, "model": FileEntry(path=path.name, sha256="-", bytes=0)}
        yield folder, manifest.model_copy(update={"files": files})


def engine_status(manifest: Manifest) -> tuple[dict[str, Any] | None, str]:
    """(the engine entry this machine can run, "") or (None, why no engine can run here)."""
    info = manifest.build.tensorrt
    if info is None or not info.engines:
        return None, "the artifact has no engines (--onnx-only)"
    try:
        importlib.import_module(info.builder)
    except ImportError:
        return None, f"no TensorRT runtime here ({info.builder} {info.builder_version} built the engines)"
    try:
        import torch
    except ImportError:
        return None, "PyTorch is needed to hold the engine's tensors on the GPU"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU here: engines run only on an NVIDIA GPU"
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}.{minor}"
    engines = [e for e in info.engines if e.compute_capability == cc]
    if not engines:
        built = ", ".join(sorted({e.compute_capability for e in info.engines}))
        hint = " (TensorRT-RTX has no Hopper target)" if cc == "9.0" else ""
        return None, f"this GPU is compute capability {cc}; the engines target {built}{hint}"
    inlined = [e for e in engines if not e.plugins]
    return (inlined or engines)[0].model_dump(), ""


class TrtDecoder:
    """An engine behind the runtime.session.Decoder interface (numpy in and out; CUDA tensors in between)."""

    def __init__(self, artifact: Path, manifest: Manifest, engine: dict[str, Any]) -> None:
        import torch

        info = manifest.build.tensorrt
        trt = importlib.import_module(info.builder)
        if engine["plugins"]:
            from gemma_export.targets.tensorrt import plugins

            plugins.register(trt)
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        plan = (Path(artifact) / manifest.files[engine["file"]].path).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(f"{info.builder} could not deserialize {manifest.files[engine['file']].path}")
        self.context = self.engine.create_execution_context()
        self.state = manifest.state
        self.vocab_size = manifest.model.config.vocab_size
        mask = next(v for v in manifest.inputs if v.name == "attention_mask")
        self.mask_covers_past = mask.shape[1] != "sequence_length"
        self.inputs = {v.name for v in manifest.inputs if not v.optional}

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros([batch if d == "batch" else d for d in s.shape], s.dtype) for s in self.state]

    def reserve(self, length: int) -> None:
        pass

    def step(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=0):
        torch = self.torch
        if not self.mask_covers_past:
            attention_mask = attention_mask[:, -input_ids.shape[1] :]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update({s.input: c for s, c in zip(self.state, cache, strict=True)})
        keep = []  # the device tensors must outlive the call
        for name, array in feed.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in ["logits", *(s.output for s in self.state)]:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = getattr(torch, _TORCH_DTYPES[str(self.engine.get_tensor_dtype(name)).split(".")[-1]])
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        logits = outputs["logits"].float().cpu().numpy()
        present = [outputs[s.output].cpu().numpy() for s in self.state]
        return (logits[:, -logits_to_keep:] if 0 < logits_to_keep < logits.shape[1] else logits), present


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                 "BOOL": "bool"}  # fmt: skip
