"""The tied LM head as the graph stages find it, matched in one place (on onnx_ir).

models/layers.py's `tied_lm_head` traces, after the optimizer, to

    logits = Reshape(Gemm(Reshape(x, [-1, hidden]), E, transB=1), out_shape)     x: [batch, seq, hidden]

with E the embedding table, a constant [vocab, hidden] (and a soft-cap after it on Gemma 2 and RecurrentGemma).
Three stages rewrite it: logits_to_keep.py slices x first and restores [batch, kept rows]; quantize.py
replaces the Gemm by MatMulNBits on E's packed bytes (and the embedding lookup by a read of the same bytes);
the ort-cpu target drops the two Reshapes (targets/ort_cpu.py `fuse_head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

MS_DOMAIN = "com.microsoft"
LOGITS = "logits"  # the graph output the head computes (through the soft-cap, if any)


def is_tied_gemm(node: ir.Node) -> bool:
    """`Gemm(x, E, transB=1)`: x @ E^T and nothing else (no bias, alpha 1), E a constant matrix."""
    if node.op_type != "Gemm" or node.domain != "" or len(node.inputs) != 2:
        return False
    a, table = node.attributes, node.inputs[1]
    plain = a.get_int("transA", 0) == 0 and a.get_int("transB", 0) == 1 and a.get_float("alpha", 1.0) == 1.0
    return plain and table is not None and table.const_value is not None and len(table.const_value.shape) == 2


def tied_gemm(graph: ir.Graph) -> ir.Node | None:
    """The graph's one tied Gemm, wherever it sits; None when there is none or more than one."""
    found = [node for node in graph if is_tied_gemm(node)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class TiedHead:
    flatten: ir.Node  # Reshape(x, [-1, hidden])
    matmul: ir.Node  # the tied Gemm, or (quantized) com.microsoft.MatMulNBits, or a Concat of those (`parts`)
    restore: ir.Node  # Reshape(..., out_shape): [batch, seq, vocab] again

    @property
    def parts(self) -> list[ir.Node]:
        """The MatMul nodes: `matmul`, or the MatMulNBits whose logits it concatenates (quantize.py: a table
        stored in parts of rows at different widths)."""
        return _parts(self.matmul) or []

    @property
    def hidden(self) -> ir.Value:
        """x, the final-normed hidden states [batch, seq, hidden] (logits_to_keep.py: its kept rows)."""
        return self.flatten.inputs[0]


def tied_head(graph: ir.Graph) -> TiedHead | None:
    """The one tied LM head that feeds the `logits` output; None when there is none or more than one."""
    found = [head for node in graph if (head := _head_of(node)) is not None and _feeds_logits(head.restore)]
    return found[0] if len(found) == 1 else None


def _head_of(matmul: ir.Node) -> TiedHead | None:
    """The head around `matmul`, if it is one: a Reshape that only flattens x before it, and one that only
    restores x's [batch, seq] after it, each used by nothing else (a rewrite removes all three)."""
    parts = _parts(matmul)
    if not parts or len(matmul.outputs[0].uses()) != 1:
        return None
    flat = parts[0].inputs[0]
    flatten = flat.producer() if flat is not None else None
    if not _is_reshape(flatten) or len(flat.uses()) != len(parts):
        return None
    x = flatten.inputs[0]
    restore, index = matmul.outputs[0].uses()[0]
    logits = restore.outputs[0]
    if not _is_reshape(restore) or index != 0 or not (_rank3(x) and _rank3(logits)):
        return None
    flattens = _ints(flatten.inputs[1]) == [-1, x.shape[2]]
    restores = list(logits.shape[:2]) == list(x.shape[:2]) or _leading_dims_then_rest(restore.inputs[1], x)
    return TiedHead(flatten, matmul, restore) if flattens and restores else None


def _parts(node: ir.Node) -> list[ir.Node] | None:
    """[node] when it is a tied Gemm or a MatMulNBits; the MatMulNBits nodes a Concat joins along the last axis
    when they all read the same input and feed nothing else; None otherwise."""
    if is_tied_gemm(node) or _is_nbits(node):
        return [node]
    if node.op_type != "Concat" or node.domain != "" or node.attributes.get_int("axis") not in (-1, 1):
        return None
    parts = [v.producer() if v is not None else None for v in node.inputs]
    if not all(_is_nbits(p) and len(p.outputs[0].uses()) == 1 for p in parts):
        return None
    return parts if len({id(p.inputs[0]) for p in parts}) == 1 else None


def _is_nbits(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN


def _feeds_logits(node: ir.Node) -> bool:
    """Whether the `logits` graph output is computed from `node`'s output."""
    return any(v.is_graph_output() and v.name == LOGITS for v in downstream(node.outputs[0]))


def downstream(value: ir.Value) -> list[ir.Value]:
    """`value` and every value computed from it, in a deterministic order."""
    seen, order, todo = set(), [], [value]
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        order.append(v)
        todo.extend(out for use in v.uses() for out in use.node.outputs)
    return order


def _leading_dims_then_rest(shape: ir.Value | None, x: ir.Value) -> bool:
    """`shape` is Concat(Shape(x, start=0, end=2), [-1]): x's [batch, seq], then whatever the rest makes
    (what logits_to_keep.py restores the kept rows with)."""
    concat = shape.producer() if shape is not None else None
    if concat is None or concat.op_type != "Concat" or concat.domain != "" or len(concat.inputs) != 2:
        return False
    dims, rest = concat.inputs
    of = dims.producer() if dims is not None else None
    if of is None or of.op_type != "Shape" or of.domain != "" or of.inputs[0] is not x or rest is None:
        return False
    return of.attributes.get_int("start", 0) == 0 and of.attributes.get_int("end") == 2 and _ints(rest) == [-1]


def _is_reshape(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Reshape" and node.domain == ""


def _rank3(value: ir.Value | None) -> bool:
    return value is not None and value.shape is not None and value.shape.rank() == 3


def _ints(value: ir.Value | None) -> list[int] | None:
    const = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if const is None else [int(v) for v in const.numpy().reshape(-1)]
