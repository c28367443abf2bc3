"""A tied embedding alone, as the ort-cpu target's memory tests need it: Gather(E, ids) and the LM head
FusedMatMul(x, E, transB=1) on one float32 table E [vocab, hidden]."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper


def tied_model(vocab: int, hidden: int) -> ir.Model:
    """Gather(E, ids) -> x, FusedMatMul(x, E, transB=1) -> logits [1, 1, vocab]; E standard normal (seed 0)."""
    e = np.random.default_rng(0).standard_normal((vocab, hidden), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["x"]),
         helper.make_node("FusedMatMul", ["x", "E"], ["logits"], domain="com.microsoft", transB=1)],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, vocab])],
        [onnx.numpy_helper.from_array(e, "E")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    return ir.from_proto(helper.make_model(graph, opset_imports=opsets, ir_version=10))
