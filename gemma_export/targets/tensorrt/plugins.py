"""TensorRT plugins for the two `ai.gemma` ops, as Python `IPluginV3` classes (TensorRT >= 10 and TensorRT-RTX).

`register(trt)` registers a creator per plugin (`GemmaAttention`, `GemmaRGLRU`, version "1", namespace
"ai.gemma": the attributes graph.py writes on each node) with the process's plugin registry; pass the module
that builds or runs the engine (`import tensorrt` or `import tensorrt_rtx as trt`). A Python plugin is not
serialized into the engine: whoever deserializes an engine built with plugins registers the creators first,
the same way (README "TensorRT target").

The plugins describe shapes and types to the builder (what TensorRT needs to build an engine, on a machine
without a GPU too) and run our CUDA kernels at `enqueue`, through `gemma_export.ops.cuda` (`attention_launch`,
`rglru_launch`: device pointers, the sizes, a dtype name and the CUDA stream; layouts as graphs/attention.md and
graphs/rglru.md specify). Without that module `enqueue` raises a one-line error naming it.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from gemma_export.targets.tensorrt.graph import PLUGIN_NAMESPACE, PLUGIN_VERSION

ATTENTION, RGLRU = "GemmaAttention", "GemmaRGLRU"
FLOAT_FIELDS = ("scale", "softcap")
INT_FIELDS = ("window", "causal", "kv_num_heads")
KERNELS = "gemma_export.ops.cuda"


def kernels() -> Any:
    """The CUDA kernels' launch functions (the kernels' own module); a clear error where they are missing."""
    try:
        return importlib.import_module(KERNELS)
    except ImportError as e:
        raise RuntimeError(f"{KERNELS} is not available ({e}): the Gemma plugins cannot run their kernels") from e


def _dtype_names(trt: Any) -> dict[Any, str]:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT32: "int32",
             trt.DataType.BOOL: "bool", trt.DataType.INT64: "int64"}  # fmt: skip
    if hasattr(trt.DataType, "BF16"):
        names[trt.DataType.BF16] = "bfloat16"
    return names


def _fields(fc: Any) -> dict[str, Any]:
    """A PluginFieldCollection -> {name: first scalar}; the parser also passes the plugin_* attributes."""
    out = {}
    for f in fc if fc is not None else []:
        if f.name in FLOAT_FIELDS:
            out[f.name] = float(np.asarray(f.data, dtype=np.float64).ravel()[0])
        elif f.name in INT_FIELDS:
            out[f.name] = int(np.asarray(f.data).ravel()[0])
    return out


def make_classes(trt: Any) -> dict[str, tuple[type, type]]:
    """{plugin name: (plugin class, creator class)} built on `trt`'s base classes (either TensorRT)."""
    names = _dtype_names(trt)
    floats = {trt.DataType.FLOAT, trt.DataType.HALF} | ({trt.DataType.BF16} if hasattr(trt.DataType, "BF16") else set())
    masks = {trt.DataType.INT64, trt.DataType.INT32, trt.DataType.BOOL}

    class _Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        name: str = ""
        outputs: int = 1

        def __init__(self, fields: dict[str, Any] | None = None, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = self.outputs
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_name = self.name
            self.plugin_version = PLUGIN_VERSION
            self.timing_cache_id = ""
            self.fields = dict(fields or {})
            self.phase = phase

        def get_capability_interface(self, kind: Any) -> Any:
            return self

        def get_fields_to_serialize(self) -> Any:
            fs = [trt.PluginField(k, np.array([v], np.float32), trt.PluginFieldType.FLOAT32)
                  for k, v in self.fields.items() if k in FLOAT_FIELDS]  # fmt: skip
            fs += [trt.PluginField(k, np.array([v], np.int32), trt.PluginFieldType.INT32)
                   for k, v in self.fields.items() if k in INT_FIELDS]  # fmt: skip
            return trt.PluginFieldCollection(fs)

        def configure_plugin(self, inputs: Any, outputs: Any) -> None:
            pass

        def on_shape_change(self, inputs: Any, outputs: Any) -> None:
            pass

        def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
            return 0

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def set_tactic(self, tactic: int) -> None:
            pass

        def clone(self) -> Any:
            copy = type(self)(self.fields, self.phase)
            copy.__dict__.update(self.__dict__)
            return copy

    class AttentionPlugin(_Plugin):
        """ai.gemma::Attention: query [B, H, S, D], key/value [B, Hkv, T, D], mask [B, T] -> [B, H, S, D]."""

        name = ATTENTION

        def get_output_data_types(self, input_types: Any) -> list[Any]:
            return [input_types[0]]

        def get_output_shapes(self, inputs: Any, shape_inputs: Any, builder: Any) -> list[Any]:
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos: int, in_out: Any, num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in floats
            if pos == 3:
                return desc.type in masks
            return desc.type == in_out[0].desc.type  # key, value and the output: the query's type

        def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
            # The decode path's key-split scratch, for the profile's largest query: TensorRT hands it to every
            # enqueue, so no step allocates (the kernel falls back to cudaMallocAsync without it).
            b, h, s, d = tuple(inputs[0].max)
            return kernels().attention_workspace_bound(batch=b, heads=h, max_q_len=s, head_dim=d)

        def enqueue(self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, workspace: int,
                    stream: int) -> None:  # fmt: skip
            b, h, s, d = tuple(input_desc[0].dims)
            _, hkv, t, _ = tuple(input_desc[1].dims)
            f, k = self.fields, kernels()
            k.attention_launch(
                inputs[0], inputs[1], inputs[2], inputs[3], outputs[0],
                batch=b, heads=h, kv_heads=hkv, q_len=s, kv_len=t, head_dim=d,
                scale=f["scale"], softcap=f["softcap"], window=f["window"], causal=bool(f["causal"]),
                dtype=names[input_desc[0].type], mask_dtype=names[input_desc[3].type], stream=int(stream),
                workspace_ptr=int(workspace),  # at least this shape's bound: get_workspace_size's is the maximum's
                workspace_bytes=k.attention_workspace_bound(batch=b, heads=h, max_q_len=s, head_dim=d),
            )  # fmt: skip

    class RglruPlugin(_Plugin):
        """ai.gemma::RGLRU: x, log_a [B, S, W], reset [B, S], h0 [B, W] float32 -> y [B, S, W], h_last [B, W]."""

        name = RGLRU
        outputs = 2

        def get_output_data_types(self, input_types: Any) -> list[Any]:
            return [input_types[0], trt.DataType.FLOAT]  # the state is float32 whatever x is (rglru.md)

        def get_output_shapes(self, inputs: Any, shape_inputs: Any, builder: Any) -> list[Any]:
            return [trt.DimsExprs(inputs[0]), trt.DimsExprs(inputs[3])]

        def supports_format_combination(self, pos: int, in_out: Any, num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in floats
            if pos == 2:
                return desc.type == trt.DataType.BOOL
            if pos in (3, 5):
                return desc.type == trt.DataType.FLOAT
            return desc.type == in_out[0].desc.type  # log_a and y: x's type

        def enqueue(self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, workspace: int,
                    stream: int) -> None:  # fmt: skip
            b, s, w = tuple(input_desc[0].dims)
            kernels().rglru_launch(inputs[0], inputs[1], inputs[2], inputs[3], outputs[0], outputs[1],
                                   batch=b, seq=s, width=w, dtype=names[input_desc[0].type],
                                   stream=int(stream))  # fmt: skip

    def creator(plugin: type) -> type:
        class Creator(trt.IPluginCreatorV3One):
            def __init__(self) -> None:
                trt.IPluginCreatorV3One.__init__(self)
                self.name = plugin.name
                self.plugin_namespace = PLUGIN_NAMESPACE
                self.plugin_version = PLUGIN_VERSION
                fields = FLOAT_FIELDS + INT_FIELDS if plugin is AttentionPlugin else ()
                self.field_names = trt.PluginFieldCollection(
                    [
                        trt.PluginField(
                            n,
                            np.array([]),
                            trt.PluginFieldType.FLOAT32 if n in FLOAT_FIELDS else trt.PluginFieldType.INT32,
                        )
                        for n in fields
                    ]
                )

            def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
                return plugin(_fields(fc), phase)

        Creator.__name__ = f"{plugin.name}Creator"
        return Creator

    return {cls.name: (cls, creator(cls)) for cls in (AttentionPlugin, RglruPlugin)}


_REGISTERED: dict[int, list[Any]] = {}  # id(trt) -> the creators (kept alive: the registry holds raw pointers)


def register(trt: Any) -> list[str]:
    """Register both creators with `trt`'s plugin registry (once per module); returns the plugin names."""
    if id(trt) not in _REGISTERED:
        creators = [creator() for _, creator in make_classes(trt).values()]
        registry = trt.get_plugin_registry()
        for c in creators:
            if not registry.register_creator(c, PLUGIN_NAMESPACE):
                raise RuntimeError(f"TensorRT refused to register the {c.name} plugin creator")
        _REGISTERED[id(trt)] = creators
    return [c.name for c in _REGISTERED[id(trt)]]
