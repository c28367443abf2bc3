"""Optimize stage: clean the traced graph, then attach the `ai.gemma` function bodies.

The onnxscript optimizer folds constants and removes dead code; it leaves our custom nodes alone. The
function bodies are attached only afterwards, because the optimizer (like the exporter) would inline them,
and the portable artifact must keep one `ai.gemma` node per op so that runtimes with a native kernel can
use it while the rest fall back to the standard-op definition.
"""

from __future__ import annotations

import onnx
import onnxscript.optimizer

from gemma_export.ops import attention, rglru

DOMAIN, DOMAIN_VERSION = attention.DOMAIN, attention.DOMAIN_VERSION

PRODUCER = "gemma-export"


def optimize(proto: onnx.ModelProto) -> onnx.ModelProto:
    optimized = onnxscript.optimizer.optimize(proto, num_iterations=2)
    assert isinstance(optimized, onnx.ModelProto)
    strip_metadata(optimized)
    return optimized


def strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node annotations: stack traces with absolute paths, FX node dumps.

    They would make the artifact depend on where the checkout lives (no byte-identical rebuilds elsewhere)
    and they are about a third of a small model's graph file.
    """
    graph = proto.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""
    for fn in proto.functions:
        for node in fn.node:
            del node.metadata_props[:]
    del proto.metadata_props[:]
    graph.doc_string = proto.doc_string = ""


def attach_functions(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Append the model-local functions that define every `ai.gemma` op used in the graph."""
    used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    present = {(f.domain, f.name) for f in proto.functions}
    for fn in [*attention.function_protos(opset), *rglru.function_protos(opset)]:
        if fn.name in used and (fn.domain, fn.name) not in present:
            proto.functions.append(fn)
    if used and not any(i.domain == DOMAIN for i in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    proto.producer_name = PRODUCER
    return proto
