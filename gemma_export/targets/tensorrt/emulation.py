"""bf16 on ONNX Runtime CPU, for the build's parity check: the artifact's graph with each bf16 product emulated.

ONNX Runtime's CPU provider has no bf16 MatMul. A GPU's bf16 GEMM reads bf16 operands, accumulates in float32
and rounds the result to bf16; so does this rewrite of every MatMul / Gemm with a bf16 operand:

    Y = MatMul(A_bf16, B_bf16)   ->   Y = Cast<bf16>(MatMul(Cast<float>(A_bf16), Cast<float>(B_bf16)))

Only the products change; the weights stay in the artifact's external data file, which the emulated graph
(written beside the graph, deleted after the check) reads in place.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

EMULATED = "verify-bf16-emulated.onnx"


def emulate(proto: onnx.ModelProto) -> int:
    """Rewrite `proto`'s bf16 products in place (main graph); returns how many."""
    g = proto.graph
    bf16 = {t.name for t in g.initializer if t.data_type == TensorProto.BFLOAT16}
    bf16 |= {n.output[0] for n in g.node if n.op_type == "Cast" and _to(n) == TensorProto.BFLOAT16}
    nodes, count = [], 0
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or not any(i in bf16 for i in node.input):
            nodes.append(node)
            continue
        inputs = []
        for k, name in enumerate(node.input):
            if name in bf16:
                cast = helper.make_node("Cast", [name], [f"{node.name}_emul_in{k}"], to=TensorProto.FLOAT)
                nodes.append(cast)
                inputs.append(cast.output[0])
            else:
                inputs.append(name)
        out = node.output[0]
        product = helper.make_node(node.op_type, inputs, [f"{out}_emul_float"], name=node.name)
        product.attribute.extend(node.attribute)
        nodes.append(product)
        nodes.append(helper.make_node("Cast", [product.output[0]], [out], to=TensorProto.BFLOAT16))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return count


def write(folder: Path) -> Path:
    """The emulated graph of `folder`'s model.onnx, written beside it (same external data file)."""
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    emulate(proto)
    path = folder / EMULATED
    onnx.save(proto, str(path))
    return path


def _to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), -1)
