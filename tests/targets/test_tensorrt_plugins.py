"""The Python IPluginV3 plugins (gemma_export/targets/tensorrt/plugins.py), without a GPU: fields, formats, and
the `enqueue` glue against the kernels' interface (gemma_export.ops.cuda, replaced here by a recorder).

Engine builds with the plugins are in test_tensorrt.py; running them needs a GPU and TensorRT (README)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from gemma_export.ops import cuda
from gemma_export.targets.tensorrt import builder, plugins

trt_module = next((b.module for b in [builder.find_builder()] if b is not None), None)
pytestmark = pytest.mark.skipif(trt_module is None, reason="no TensorRT builder (pip install tensorrt-rtx)")

ATTRS = {"scale": 0.25, "softcap": 50.0, "window": 16, "causal": 1, "kv_num_heads": 2}


@pytest.fixture(scope="module")
def trt():
    import importlib

    return importlib.import_module(trt_module)


def fields(trt, attrs: dict) -> object:
    fs = [trt.PluginField(k, np.array([v], np.float32), trt.PluginFieldType.FLOAT32)
          for k, v in attrs.items() if k in plugins.FLOAT_FIELDS]  # fmt: skip
    fs += [trt.PluginField(k, np.array([v], np.int32), trt.PluginFieldType.INT32)
           for k, v in attrs.items() if k in plugins.INT_FIELDS]  # fmt: skip
    return trt.PluginFieldCollection(fs)


def desc(trt, dtype, dims=None) -> object:
    d = trt.PluginTensorDesc()
    d.type, d.format = dtype, trt.TensorFormat.LINEAR
    if dims is not None:
        d.dims = trt.Dims(dims)
    return d


def dynamic(trt, dtype) -> object:
    d = trt.DynamicPluginTensorDesc()
    d.desc = desc(trt, dtype)
    return d


def create(trt, name: str, attrs: dict | None = None):
    _, creator = plugins.make_classes(trt)[name]
    return creator().create_plugin(name, fields(trt, attrs or {}), trt.TensorRTPhase.BUILD)


def test_attention_fields_survive_serialization(trt) -> None:
    plugin = create(trt, plugins.ATTENTION, ATTRS)
    assert plugin.fields == ATTRS
    again = create(trt, plugins.ATTENTION, {f.name: f.data[0].item() for f in plugin.get_fields_to_serialize()})
    assert again.fields == ATTRS
    assert (plugin.plugin_name, plugin.plugin_version, plugin.plugin_namespace) == ("GemmaAttention", "1", "ai.gemma")


def test_formats_follow_the_specs(trt) -> None:
    f, h, i64, b = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.INT64, trt.DataType.BOOL
    attention = create(trt, plugins.ATTENTION, ATTRS)
    ok = [dynamic(trt, t) for t in (f, f, f, i64, f)]  # query, key, value, mask, output
    assert all(attention.supports_format_combination(pos, ok, 4) for pos in range(5))
    mixed = [dynamic(trt, t) for t in (f, h, f, i64, f)]
    assert not attention.supports_format_combination(1, mixed, 4)  # key must have the query's type
    float_mask = [dynamic(trt, t) for t in (f, f, f, f, f)]
    assert not attention.supports_format_combination(3, float_mask, 4)
    rglru = create(trt, plugins.RGLRU)
    ok = [dynamic(trt, t) for t in (h, h, b, f, h, f)]  # x, log_a, reset, h0 | y, h_last (state float32)
    assert all(rglru.supports_format_combination(pos, ok, 4) for pos in range(6))
    half_state = [dynamic(trt, t) for t in (h, h, b, h, h, h)]
    assert not rglru.supports_format_combination(3, half_state, 4)
    assert rglru.get_output_data_types([h, h, b, f]) == [h, f]


def test_enqueue_calls_the_kernels_with_the_spec_layout(trt, monkeypatch) -> None:
    calls = []
    fake = types.SimpleNamespace(
        attention_launch=lambda *ptrs, **kw: calls.append(("attention", ptrs, kw)),
        rglru_launch=lambda *ptrs, **kw: calls.append(("rglru", ptrs, kw)),
        attention_workspace_bound=cuda.attention_workspace_bound,
    )
    monkeypatch.setitem(sys.modules, plugins.KERNELS, fake)
    f, i64, b = trt.DataType.FLOAT, trt.DataType.INT64, trt.DataType.BOOL
    attention = create(trt, plugins.ATTENTION, ATTRS)
    ins = [desc(trt, f, (2, 4, 3, 8)), desc(trt, f, (2, 2, 7, 8)), desc(trt, f, (2, 2, 7, 8)), desc(trt, i64, (2, 7))]
    attention.enqueue(ins, [desc(trt, f, (2, 4, 3, 8))], [11, 12, 13, 14], [15], 777, 99)
    kind, ptrs, kw = calls[-1]
    assert kind == "attention" and ptrs == (11, 12, 13, 14, 15)
    assert kw == {"batch": 2, "heads": 4, "kv_heads": 2, "q_len": 3, "kv_len": 7, "head_dim": 8, "scale": 0.25,
                  "softcap": 50.0, "window": 16, "causal": True, "dtype": "float32", "mask_dtype": "int64",
                  "stream": 99, "workspace_ptr": 777, "workspace_bytes": 64 * 2 * 4 * 3 * (8 + 2) * 4}  # fmt: skip
    rglru = create(trt, plugins.RGLRU)
    ins = [desc(trt, f, (3, 5, 6)), desc(trt, f, (3, 5, 6)), desc(trt, b, (3, 5)), desc(trt, f, (3, 6))]
    rglru.enqueue(ins, [desc(trt, f, (3, 5, 6)), desc(trt, f, (3, 6))], [1, 2, 3, 4], [5, 6], 0, 7)
    assert calls[-1] == ("rglru", (1, 2, 3, 4, 5, 6), {"batch": 3, "seq": 5, "width": 6, "dtype": "float32",
                                                       "stream": 7})  # fmt: skip


def test_attention_asks_for_the_decode_scratch_of_the_largest_shape(trt) -> None:
    """The workspace TensorRT hands every enqueue covers the split (decode) path at the profile's maxima, so
    no decode step allocates; queries longer than the split limit need no more than it."""
    attention = create(trt, plugins.ATTENTION, ATTRS)
    inputs = [dynamic(trt, trt.DataType.FLOAT) for _ in range(4)]
    inputs[0].min, inputs[0].max = trt.Dims((1, 4, 1, 256)), trt.Dims((2, 4, 2048, 256))
    assert attention.get_workspace_size(inputs, []) == 64 * 2 * 4 * 16 * (256 + 2) * 4
    inputs[0].max = trt.Dims((1, 4, 1, 256))  # a decode-only profile
    assert attention.get_workspace_size(inputs, []) == 64 * 4 * (256 + 2) * 4
    assert create(trt, plugins.RGLRU).get_workspace_size(inputs, []) == 0


def test_enqueue_without_the_kernels_says_which_module_is_missing(trt, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, plugins.KERNELS, None)  # import fails
    rglru = create(trt, plugins.RGLRU)
    f, b = trt.DataType.FLOAT, trt.DataType.BOOL
    ins = [desc(trt, f, (1, 1, 2)), desc(trt, f, (1, 1, 2)), desc(trt, b, (1, 1)), desc(trt, f, (1, 2))]
    with pytest.raises(RuntimeError, match=r"gemma_export\.ops\.cuda is not available"):
        rglru.enqueue(ins, ins[:1], [1, 2, 3, 4], [5, 6], 0, 0)
