"""The TensorRT-ready graph: each `ai.gemma` op becomes a plugin node that keeps its ONNX function body.

    ai.gemma::Attention(q, k, v, mask; scale, softcap, window, causal, kv_num_heads)
        -> ai.gemma::GemmaAttention(same inputs and attributes; plugin_version "1", plugin_namespace "ai.gemma")
    ai.gemma::RGLRU(x, log_a, reset, h0)   -> ai.gemma::GemmaRGLRU(...; plugin_version, plugin_namespace)

Why new names: TensorRT's ONNX parser takes any node named `Attention`, whatever its domain, for ONNX's
built-in Attention-23 and rejects a softcap there. A node TensorRT does not know is looked up in the plugin
registry by (op_type, plugin_version, plugin_namespace); when no plugin is registered under that name the
parser inlines the model-local function of the same (domain, name), so the functions are re-attached under the
new names: the same file builds with our plugins (plugins.py), builds without them (the bodies inlined), and
runs on ONNX Runtime, which inlines the bodies too (the build's parity gate runs it so).

Reduced precision (`--precision fp16|bf16`): every MatMul / Gemm whose weight is an initializer computes in the
16-bit type (weights stored in it, the activation cast in, the product cast back to float32). Everything else
stays float32: embeddings, RMSNorms, the residual stream, RoPE, attention (scores, softcap, softmax) and the
RG-LRU state, the final softcap. TensorRT builds such a graph as a strongly typed network (the types in the
file are the types it runs), so nothing is left to the builder's precision heuristics.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gemma_export.ops import attention, rglru

DOMAIN = attention.DOMAIN
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = DOMAIN
PLUGIN_NAMES = {"Attention": "GemmaAttention", "RGLRU": "GemmaRGLRU"}  # ai.gemma op -> TensorRT plugin name
PRECISION_TYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}


def to_plugin_nodes(model: ir.Model, opset: int) -> list[str]:
    """Rename every ai.gemma op to its plugin name (in place), with the plugin attributes and the renamed
    function bodies; returns the plugin names used."""
    used: set[str] = set()
    for node in model.graph.all_nodes():
        if node.domain == DOMAIN and node.op_type in PLUGIN_NAMES:
            used.add(node.op_type)
            node.op_type = PLUGIN_NAMES[node.op_type]
            node.attributes["plugin_version"] = ir.AttrString("plugin_version", PLUGIN_VERSION)
            node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE)
    for key in [k for k in model.functions if k[0] == DOMAIN]:
        del model.functions[key]
    for proto in [*attention.function_protos(opset), *rglru.function_protos(opset)]:
        if proto.name in used:
            proto.name = PLUGIN_NAMES[proto.name]
            fn = ir.serde.deserialize_function(proto)
            model.functions[fn.identifier()] = fn
    return sorted(PLUGIN_NAMES[name] for name in used)


def reduce_precision(model: ir.Model, precision: str) -> int:
    """MatMul / Gemm with an initializer weight -> the same product in `precision` (weights converted, the
    activation cast in and the product cast back to float32). Returns how many products were rewritten."""
    if precision == "fp32":
        return 0
    low = PRECISION_TYPES[precision]
    graph, converted, rewritten = model.graph, {}, 0
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain != "":
            continue
        weights = [i for i, v in enumerate(node.inputs[:2]) if v is not None and v.const_value is not None]
        if len(weights) != 1 or node.inputs[weights[0]].dtype != ir.DataType.FLOAT:
            continue
        w_index = weights[0]
        x_index = 1 - w_index
        weight = node.inputs[w_index]
        if weight.name not in converted:
            converted[weight.name] = _converted(graph, weight, low)
        cast_in = ir.node("Cast", [node.inputs[x_index]], {"to": low}, name=f"{node.name}_cast_in")
        graph.insert_before(node, cast_in)
        node.replace_input_with(x_index, cast_in.outputs[0])
        node.replace_input_with(w_index, converted[weight.name])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is not None:  # Gemm's C, added in the product's type
            if bias.name not in converted:
                converted[bias.name] = _converted(graph, bias, low)
            node.replace_input_with(2, converted[bias.name])
        _cast_output_to_float(graph, node, ir.TensorType(low))
        cast_in.outputs[0].type = ir.TensorType(low)
        cast_in.outputs[0].shape = cast_in.inputs[0].shape
        rewritten += 1
    _gather_from_converted(graph, converted)
    for name in converted:  # the float32 originals, unless something else still reads them
        original = graph.initializers.get(name)
        if original is not None and not original.uses() and original not in graph.inputs:
            del graph.initializers[name]
    return rewritten


def _gather_from_converted(graph: ir.Graph, converted: dict[str, ir.Value]) -> None:
    """A Gather from a table that a product now reads in 16 bits (the tied embedding / LM head) gathers from the
    16-bit copy and casts the rows to float32, so that the float32 table is not kept beside it (two thirds of
    Gemma-3-270M's weights). The embedding rows are then bf16-rounded, as in a bf16 checkpoint; the residual
    stream they start stays float32."""
    for node in list(graph):
        table = node.inputs[0] if node.op_type == "Gather" and node.domain == "" and node.inputs else None
        if table is None or table.name not in converted:
            continue
        node.replace_input_with(0, converted[table.name])
        _cast_output_to_float(graph, node, converted[table.name].type)


def _cast_output_to_float(graph: ir.Graph, node: ir.Node, low: ir.TypeProtocol) -> None:
    """`node` now computes its output in the 16-bit type `low`; a Cast after it gives its readers (and any graph
    output) the float32 value they read before, under a new name."""
    out = node.outputs[0]
    result = ir.Value(name=f"{out.name}_float", type=out.type, shape=out.shape)
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    cast = ir.Node("", "Cast", [out], {"to": ir.AttrInt64("to", ir.DataType.FLOAT)}, outputs=[result],
                   name=f"{node.name}_cast_out")  # fmt: skip
    graph.insert_after(node, cast)
    out.type = low


def _converted(graph: ir.Graph, weight: ir.Value, low: ir.DataType) -> ir.Value:
    """An initializer holding `weight` in the 16-bit type (rounded to nearest even)."""
    array = weight.const_value.numpy().astype(np.float32)
    if low == ir.DataType.FLOAT16:
        tensor = ir.tensor(array.astype(np.float16), name=f"{weight.name}_fp16")
    else:
        import ml_dtypes

        tensor = ir.tensor(array.astype(ml_dtypes.bfloat16), name=f"{weight.name}_bf16")
    value = ir.Value(name=tensor.name, type=ir.TensorType(low), shape=ir.Shape(array.shape), const_value=tensor)
    graph.register_initializer(value)
    return value
