"""The optional graph input `logits_to_keep` (optimize stage, decoders): the LM head computes only the rows asked for.

A generator needs only the last position's logits, but the traced head runs on every position: at a 1024-token
prompt of a 262144-token vocabulary the tied head is most of the prefill. As transformers' `logits_to_keep`:

    logits_to_keep   int64 scalar, an overridable initializer (graph input and initializer, value 0)
                     0: every position (what a caller that does not pass it gets); k > 0: the last k positions
                     (all of them when k >= sequence_length)
 -> logits           float32 [batch, logits_length, vocab]

The traced head (models/layers.py's `tied_lm_head`, and Gemma 2's / RecurrentGemma's final soft-cap after it)
is, after the optimizer, `Reshape(Gemm(Reshape(x, [-1, hidden]), E, transB=1), out_shape)` on the final-normed
hidden state x [batch, sequence_length, hidden] (pipeline/graph_patterns.py finds it). This pass slices x before
the head,

    x_kept = Slice(x, starts=-logits_to_keep, ends=INT64_MAX, axes=[1])    (-0 = 0: every row)

and restores the head's output to `Concat(Shape(x_kept)[0:2], [-1])`, so the head's sgemm (or its MatMulNBits,
quantize.py), the soft-cap and the logits all cover the kept rows only. The norm before the slice keeps its
pattern for the ORT fusions (targets/ort_cpu.py), which fuse the head on the 3-D x_kept as before (fuse_head).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gemma_export.pipeline import graph_patterns

INPUT = "logits_to_keep"
LOGITS = graph_patterns.LOGITS
LOGITS_DIM = "logits_length"  # the logits' second dim: sequence_length, or fewer rows
DEFAULT = 0  # every position
_INT64_MAX = int(np.iinfo(np.int64).max)


def add_logits_to_keep(model: ir.Model) -> bool:
    """Add the `logits_to_keep` input in front of the tied LM head; returns whether the head was found (a graph
    without the traced head, e.g. a test's stand-in, is left as it is)."""
    graph = model.graph
    head = graph_patterns.tied_head(graph)
    if head is None or any(v.name == INPUT for v in graph.inputs) or INPUT in graph.initializers:
        return False
    flatten, restore, x = head.flatten, head.restore, head.hidden

    keep = ir.Value(name=INPUT, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(DEFAULT, np.int64), name=INPUT))  # fmt: skip
    graph.inputs.append(keep)
    graph.register_initializer(keep)  # overridable: a caller that does not feed it gets 0

    def const(suffix: str, values: list[int]) -> ir.Value:
        name = f"{INPUT}_{suffix}"
        value = ir.Value(name=name, shape=ir.Shape([len(values)]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array(values, np.int64), name=name))  # fmt: skip
        graph.register_initializer(value)
        return value

    def node(op: str, inputs: list[ir.Value], suffix: str, **attrs: int) -> ir.Value:
        out = ir.Value(name=f"{INPUT}_{suffix}")
        made = ir.node(op, inputs, attrs or None, name=f"{INPUT}_{suffix}_node", outputs=[out])
        graph.insert_before(flatten, made)
        return out

    zero = const("zero", [0])  # starts = 0 - k; not Neg, which in a lowered graph marks an unfused RoPE (tests)
    starts = node("Sub", [zero, node("Unsqueeze", [keep, zero], "as_1d")], "starts")
    kept = node("Slice", [x, starts, const("ends", [_INT64_MAX]), const("axes", [1])], "hidden")
    rows = node("Shape", [kept], "rows", start=0, end=2)
    out_shape = node("Concat", [rows, const("vocab_axis", [-1])], "out_shape", axis=0)
    for value, shape in ((starts, [1]), (rows, [2]), (out_shape, [3])):
        value.shape, value.type = ir.Shape(shape), ir.TensorType(ir.DataType.INT64)
    kept.type = x.type
    if x.shape is not None:
        kept.shape = ir.Shape([x.shape[0], ir.SymbolicDim(LOGITS_DIM), x.shape[2]])
    flatten.replace_input_with(0, kept)
    restore.replace_input_with(1, out_shape)
    _rename_rows(kept, x.shape[1] if x.shape is not None else None)
    common_passes.RemoveUnusedNodesPass()(model)  # the old out_shape computation
    return True


def _rename_rows(kept: ir.Value, seq: ir.SymbolicDim | int | None) -> None:
    """The head's values (and the logits output) have LOGITS_DIM rows where the trace wrote sequence_length."""
    name = seq.value if isinstance(seq, ir.SymbolicDim) else None
    pattern = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])") if name else None
    for value in graph_patterns.downstream(kept)[1:]:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(pattern.sub(LOGITS_DIM, d.value)) if pattern and isinstance(d, ir.SymbolicDim)
                and d.value else d for d in value.shape]  # fmt: skip
        if value.is_graph_output() and value.name == LOGITS and len(dims) == 3:
            dims[1] = ir.SymbolicDim(LOGITS_DIM)
        value.shape = ir.Shape(dims)
