"""Optimize stage: clean the traced graph, then attach the `ai.gemma` function bodies.

The onnxscript optimizer folds constants and removes dead code; it leaves our custom nodes alone. The
function bodies are attached only afterwards, because the optimizer (like the exporter) would inline them,
and the portable artifact must keep one `ai.gemma` node per op so that runtimes with a native kernel can
use it while the rest fall back to the standard-op definition.

Everything works on the onnx-ir model, which references the weights instead of copying them.
"""

from __future__ import annotations

import gc

import onnx_ir as ir
import onnxscript.optimizer
from onnxscript.rewriter import _matcher

from gemma_export.ops import attention, rglru

PRODUCER = "gemma-export"
DOMAIN, DOMAIN_VERSION = attention.DOMAIN, attention.DOMAIN_VERSION


def optimize(model: ir.Model) -> ir.Model:
    onnxscript.optimizer.optimize(model, num_iterations=2)
    strip_metadata(model)
    return model


def release_rewriter_state() -> None:
    """Make onnxscript's pattern matchers forget their last match.

    Its rewrite rules (the optimizer's defaults, the ORT fusions targets/ort_cpu.py applies) are module-level objects
    whose matchers keep the graph, node and bindings of their last match (onnxscript 0.7.2), and with them the
    whole IR model: every weight, i.e. the reference model's memory-mapped checkpoint, for the rest of the
    process. The build calls this once the graph is written, so that the verify stage can free the reference.
    """
    for obj in gc.get_objects():  # the matchers live in several modules' rule sets; ~0.2 s
        # type(), not isinstance(): ABCs read `obj.__class__`, which warns on some lazy objects (torch.distributed)
        if issubclass(type(obj), _matcher.PatternMatcher):
            for attr in ("_graph", "_match", "_current_node"):  # each is set again by the next match()
                if attr in obj.__dict__:
                    setattr(obj, attr, None)
    obj = None  # the loop variable would keep the last object alive


def strip_metadata(model: ir.Model) -> None:
    """Drop the exporter's annotations: stack traces with absolute paths, FX node dumps.

    They would make the artifact depend on where the checkout lives (no byte-identical rebuilds elsewhere)
    and they are about a third of a small model's graph file.
    """
    graph = model.graph
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    for node in graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
        values.extend(v for v in node.outputs)
    for value in values:
        value.metadata_props.clear()
        value.doc_string = None
    model.metadata_props.clear()
    graph.metadata_props.clear()
    graph.doc_string = model.doc_string = None


def attach_functions(model: ir.Model, opset: int) -> ir.Model:
    """Add the model-local functions that define every `ai.gemma` op used in the graph."""
    used = {n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN}
    for proto in [*attention.function_protos(opset), *rglru.function_protos(opset)]:
        if proto.name in used:
            fn = ir.serde.deserialize_function(proto)
            model.functions[fn.identifier()] = fn
    if used:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
    model.producer_name = PRODUCER
    model.producer_version = None
    return model
