"""Shared by the custom-op tests: a one-node model that carries its function body, and a quiet session."""

from __future__ import annotations

import onnx
import onnxruntime as ort
from onnx import FunctionProto, NodeProto, ValueInfoProto, helper

from gemma_export.ops.attention import DOMAIN, DOMAIN_VERSION
from gemma_export.pipeline.trace import OPSET

IR_VERSION = 10  # onnx.helper writes IR 14 by default; onnxruntime 1.31 reads up to 10 (ONNX 1.16 era)


def one_node_model(
    node: NodeProto, inputs: list[ValueInfoProto], outputs: list[ValueInfoProto], functions: list[FunctionProto]
) -> onnx.ModelProto:
    """`node` (an ai.gemma op) over dynamic-shape inputs, with the functions that define it; checked."""
    model = helper.make_model(
        helper.make_graph([node], node.op_type, inputs, outputs),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=functions,
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
