"""Lower stage (`--target ort-cpu` only): the portable graph -> ONNX Runtime's CPU kernels, where exact.

The portable graph (`--target onnx`) carries one `ai.gemma::Attention` node per layer, defined by its
function body. Here each becomes ONNX Runtime kernels that compute the same thing (graphs/attention.md);
the node's attributes (scale, softcap, window, causal, kv_num_heads) are the only source of what to compute:

    causal, key = Concat(past, new) ->  If(batch > 1 and seq > 1 and past > 0,
                                           then: Concat + Attention-23(q, k, v, visible),
                                           else: com.microsoft.GroupQueryAttention(q, new, past, bias))
    anything else                   ->  Concat + Attention-23(q, k, v, visible)

- GroupQueryAttention skips the blocks outside a sliding window (the fastest prefill: on 18 Gemma-3-270M-shaped
  layers, a 1024-token prompt, 2 threads, 25-40% less attention time than Attention-23 and up to 2x less than
  the function body; one decode step costs the same with all three), but takes no key mask: left padding goes in as
  an additive `attention_bias` (0 or the float32 lowest), which it adds after the soft-cap, as the spec
  requires; `seqlens_k` counts every slot. It refuses several new tokens with a past at batch > 1 (chunked
  prefill of a batch): the If takes Attention-23 then.
  RoPE stays outside it (`do_rotary` assumes contiguous positions from each row's first, which left padding
  breaks; Gemma 3's q/k norms come before RoPE anyway).
- Attention-23 takes the boolean visibility `visible` [batch, 1, seq, total] (padding, causality, window),
  softcap before the mask, a float32 softmax; its fully masked rows give zeros, which the spec allows.
- `visible` (and the bias made from it) is built once per distinct (mask, window, causal) and shared by
  every layer that has them, not once per layer as the function body does.

Then, with onnxscript's rewriter: RMSNorm -> RMSNormalization-23, residual Add + RMSNorm ->
com.microsoft.SkipSimplifiedLayerNormalization, rotate-half RoPE -> RotaryEmbedding-23, and the tied LM head
on the 3-D hidden states (no copy of the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir import convenience
from onnx_ir.tape import Tape
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from gemma_export.ops import attention
from gemma_export.optimize import strip_metadata

MS_DOMAIN = "com.microsoft"
FLOAT_SOFTMAX = 1  # Attention-23 softmax_precision: TensorProto.FLOAT
MASKED = float(np.finfo(np.float32).min)  # additive bias of an invisible key (graphs/attention.md: not -inf)
GQA_HEAD_DIM_MULTIPLE = 8  # ONNX Runtime 1.31's CPU GroupQueryAttention needs head_dim % 8 == 0


@dataclass(frozen=True)
class AttentionAttrs:
    scale: float
    softcap: float
    window: int
    causal: int
    kv_num_heads: int

    @classmethod
    def of(cls, node: ir.Node) -> AttentionAttrs:
        a = node.attributes
        return cls(a["scale"].as_float(), a["softcap"].as_float(), a["window"].as_int(), a["causal"].as_int(),
                   a["kv_num_heads"].as_int())  # fmt: skip


def lower(model: ir.Model) -> ir.Model:
    """Rewrite every `ai.gemma::Attention` node, fuse norms and RoPE; drop what is no longer used."""
    graph = model.graph
    masks = _SharedMasks(graph)
    for node in [n for n in graph if n.domain == attention.DOMAIN and n.op_type == "Attention"]:
        _lower_attention(graph, node, masks)
    fuse_norms(model)
    fuse_rotary(model)
    fuse_head(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.CommonSubexpressionEliminationPass()(model)  # e.g. the RoPE tables' slices, once per table
    common_passes.RemoveUnusedFunctionsPass()(model)
    if any(n.domain == MS_DOMAIN for n in graph.all_nodes()):
        model.opset_imports[MS_DOMAIN] = 1
    common_passes.RemoveUnusedOpsetsPass()(model)
    common_passes.NameFixPass()(model)  # names unique across the If branches and the main graph (SSA)
    strip_metadata(model)  # the rewriter tags what it made with its rule names
    return model


# --- attention -------------------------------------------------------------------------------------------


def _lower_attention(graph: ir.Graph, node: ir.Node, masks: _SharedMasks) -> None:
    query, key, value, _ = node.inputs
    a = AttentionAttrs.of(node)
    visible = masks.visible(node)
    split = _past_and_new(key), _past_and_new(value)
    head_dim = query.shape[3] if query.shape is not None else None
    gqa_fits = (
        a.causal
        and a.scale != 0  # GroupQueryAttention reads scale 0 as 1/sqrt(head_dim)
        and None not in split
        and isinstance(head_dim, int)
        and head_dim % GQA_HEAD_DIM_MULTIPLE == 0
        and isinstance(query.shape[1], int)
    )
    if not gqa_fits:
        tape = Tape()
        out = _attention23(tape, query, key, value, visible, a)
        graph.insert_before(node, tape.nodes)
        _replace(node.outputs[0], out)
        graph.remove(node, safe=True)
        return

    (past_k, new_k), (past_v, new_v) = split
    then_tape, else_tape = Tape(), Tape()
    k = then_tape.op("Concat", [past_k, new_k], {"axis": 2})
    v = then_tape.op("Concat", [past_v, new_v], {"axis": 2})
    then_out = [_attention23(then_tape, query, k, v, visible, a), k, v]
    else_out = _gqa(else_tape, query, past_k, new_k, past_v, new_v, masks.bias(node), masks.lengths(node), a)
    for outs in (then_out, else_out):
        for out, like in zip(outs, (node.outputs[0], key, value), strict=True):
            out.shape, out.type = like.shape, like.type

    tape = Tape()
    results = tape.op_multi_out(
        "If",
        [masks.gqa_refuses(node)],
        {
            "then_branch": ir.Graph((), then_out, nodes=then_tape.nodes, name=f"{node.name}_attention23"),
            "else_branch": ir.Graph((), else_out, nodes=else_tape.nodes, name=f"{node.name}_gqa"),
        },
        num_outputs=3,
    )
    graph.insert_before(node, tape.nodes)
    for old, new in zip((node.outputs[0], key, value), results, strict=True):
        _replace(old, new)
    graph.remove(node, safe=True)


def _past_and_new(kv: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(past, new) when the key or value is Concat(past, new) along the sequence axis, as every decoder layer's."""
    node = kv.producer()
    if node is None or node.op_type != "Concat" or node.domain != "" or len(node.inputs) != 2:
        return None
    axis = node.attributes["axis"].as_int()
    return (node.inputs[0], node.inputs[1]) if axis in (2, -2) else None


def _attention23(tape: Tape, query: ir.Value, key: ir.Value, value: ir.Value, visible: ir.Value,
                 a: AttentionAttrs) -> ir.Value:  # fmt: skip
    attrs = {"scale": a.scale, "softcap": a.softcap, "softmax_precision": FLOAT_SOFTMAX}
    return tape.op("Attention", [query, key, value, visible], attrs)


def _gqa(tape: Tape, query: ir.Value, past_k: ir.Value, new_k: ir.Value, past_v: ir.Value, new_v: ir.Value,
         bias: ir.Value, lengths: tuple[ir.Value, ir.Value], a: AttentionAttrs) -> list[ir.Value]:  # fmt: skip
    """GroupQueryAttention takes [batch, seq, heads * head_dim]; its output goes back to [batch, heads, seq, dim]."""
    heads = query.shape[1]
    to_bsnh = {"perm": [0, 2, 1, 3]}
    flat, split_heads = _const(tape, np.array([0, 0, -1])), _const(tape, np.array([0, 0, heads, -1]))

    def bsh(x: ir.Value) -> ir.Value:
        return tape.op("Reshape", [tape.op("Transpose", [x], to_bsnh), flat])

    seqlens_k, total = lengths
    attrs = {"num_heads": heads, "kv_num_heads": a.kv_num_heads, "scale": a.scale, "softcap": a.softcap,
             "local_window_size": a.window if a.window > 0 else -1}  # fmt: skip
    inputs = [bsh(query), bsh(new_k), bsh(new_v), past_k, past_v, seqlens_k, total, None, None, None, bias]
    out, present_k, present_v = tape.op_multi_out("GroupQueryAttention", inputs, attrs, num_outputs=3,
                                                  domain=MS_DOMAIN)  # fmt: skip
    out = tape.op("Transpose", [tape.op("Reshape", [out, split_heads])], to_bsnh)
    return [out, present_k, present_v]


class _SharedMasks:
    """What the lowered kernels take instead of the key mask, built once per (mask, query length, window,
    causal) before the first node that needs it, and shared by every later one."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.built: dict[tuple, object] = {}

    def _get(self, node: ir.Node, what: str, build: Callable[[Tape], Any], per_window: bool = True) -> Any:
        query, mask = node.inputs[0], node.inputs[3]
        seq = query.shape[2] if query.shape is not None else None
        if not (isinstance(seq, int) or (isinstance(seq, ir.SymbolicDim) and seq.value)):
            seq = id(query)  # a query length no other node is known to share
        a = AttentionAttrs.of(node)
        key = (what, id(mask), seq, *((a.window, a.causal) if per_window else ()))
        if key not in self.built:
            tape = Tape()
            self.built[key] = build(tape)
            self.graph.insert_before(node, tape.nodes)
        return self.built[key]

    def visible(self, node: ir.Node) -> ir.Value:
        """graphs/attention.md section 3: boolean [batch, 1, seq, total]."""
        a = AttentionAttrs.of(node)
        query, mask = node.inputs[0], node.inputs[3]
        return self._get(node, "visible", lambda tape: _visibility(tape, query, mask, a.window, a.causal))

    def bias(self, node: ir.Node) -> ir.Value:
        """The visibility as an additive float32 bias [batch, 1, seq, total]: 0 or the float32 lowest."""
        visible = self.visible(node)
        zero, lowest = np.float32(0), np.float32(MASKED)
        return self._get(
            node, "bias", lambda tape: tape.op("Where", [visible, _const(tape, zero), _const(tape, lowest)])
        )

    def lengths(self, node: ir.Node) -> tuple[ir.Value, ir.Value]:
        """GroupQueryAttention's seqlens_k (every slot counts: T - 1 per row, int32) and total_sequence_length."""
        mask = node.inputs[3]

        def build(tape: Tape) -> tuple[ir.Value, ir.Value]:
            total = tape.op("Shape", [mask], {"start": 1, "end": 2})
            batch = tape.op("Shape", [mask], {"start": 0, "end": 1})
            last = tape.op("Sub", [total, _const(tape, np.array([1]))])
            seqlens_k = tape.op("Cast", [tape.op("Expand", [last, batch])], {"to": ir.DataType.INT32})
            return seqlens_k, tape.op("Cast", [tape.op("Squeeze", [total])], {"to": ir.DataType.INT32})

        return self._get(node, "lengths", build, per_window=False)

    def gqa_refuses(self, node: ir.Node) -> ir.Value:
        """batch > 1 and seq > 1 and past > 0 (past = T - S): several new tokens with a past, in a batch, which
        ONNX Runtime 1.31's CPU GroupQueryAttention refuses. A one-element boolean, as If takes it."""
        query, mask = node.inputs[0], node.inputs[3]

        def build(tape: Tape) -> ir.Value:
            zero, one = _const(tape, np.array([0])), _const(tape, np.array([1]))
            batch = tape.op("Shape", [mask], {"start": 0, "end": 1})
            seq = tape.op("Shape", [query], {"start": 2, "end": 3})
            past = tape.op("Sub", [tape.op("Shape", [mask], {"start": 1, "end": 2}), seq])
            several = tape.op("And", [tape.op("Greater", [batch, one]), tape.op("Greater", [seq, one])])
            refused = tape.op("And", [several, tape.op("Greater", [past, zero])])
            return tape.op("Squeeze", [refused])

        return self._get(node, "gqa_refuses", build, per_window=False)


def _visibility(tape: Tape, query: ir.Value, mask: ir.Value, window: int, causal: int) -> ir.Value:
    """Key j visible to query i (absolute position p = T - S + i): mask[b, j] != 0 and the causal / window rule."""
    zero, one = _const(tape, np.int64(0)), _const(tape, np.int64(1))
    total = tape.op("Squeeze", [tape.op("Shape", [mask], {"start": 1, "end": 2})])  # T = the mask's width
    seq = tape.op("Squeeze", [tape.op("Shape", [query], {"start": 2, "end": 3})])  # S
    q_pos = tape.op("Unsqueeze", [tape.op("Range", [tape.op("Sub", [total, seq]), total, one]), one])  # [S, 1]
    dist = tape.op("Sub", [q_pos, tape.op("Range", [zero, total, one])])  # [S, T]: p - j
    win = _const(tape, np.int64(window))
    if causal:
        rule = tape.op("GreaterOrEqual", [dist, zero])
        if window > 0:
            rule = tape.op("And", [rule, tape.op("Less", [dist, win])])
    elif window > 0:
        rule = tape.op("Less", [tape.op("Abs", [dist]), win])
    else:
        rule = None
    keep = tape.op("Unsqueeze", [tape.op("Cast", [mask], {"to": ir.DataType.BOOL}), _const(tape, np.array([1, 2]))])
    if rule is None:  # bidirectional, global: the padding alone, for every query (Attention-23 needs S rows)
        shape = [_const(tape, np.array([1, 1])), tape.op("Unsqueeze", [seq, zero]), tape.op("Unsqueeze", [total, zero])]
        return tape.op("Expand", [keep, tape.op("Concat", shape, {"axis": 0})])
    return tape.op("And", [keep, rule])  # [B, 1, S, T]


# --- norms and RoPE --------------------------------------------------------------------------------------


def fuse_norms(model: ir.Model) -> None:
    """RMSNorm -> RMSNormalization-23; residual Add + RMSNorm -> com.microsoft.SkipSimplifiedLayerNormalization.

    onnxscript's fusions emit ORT's SimplifiedLayerNormalization, which ORT registers in the default domain
    (onnx.checker rejects it there); those the skip fusion does not take become RMSNormalization-23, the
    standard op with the same attributes and formula.
    """
    fuse_rms_normalization(model)
    fuse_skip_rms_normalization(model)
    for node in model.graph:
        if node.domain == "" and node.op_type == "SimplifiedLayerNormalization":
            node.op_type = "RMSNormalization"


class RotaryFusion(pattern.RewriteRuleClassBase):
    """`x * cos + rotate_half(x) * sin` with `cos, sin = Cos(cat(f, f)), Sin(cat(f, f))` unsqueezed over heads
    (models/gemma.py's rope_cos_sin and apply_rope) -> RotaryEmbedding-23(x, Cos(f), Sin(f)): the same values,
    the table's duplicated half not computed. x: [batch, heads, seq, head_dim]."""

    def __init__(self) -> None:
        # the tables are shared by every layer: the matched nodes stay, the unused ones are dropped afterwards
        super().__init__(remove_nodes=False)

    def pattern(self, op, x, freqs, freqs2, heads1, heads2, s1, e1, s2, e2, axes1, axes2, steps1, steps2):
        angles = op.Concat(freqs, freqs2, axis=-1)
        cos, sin = op.Unsqueeze(op.Cos(angles), heads1), op.Unsqueeze(op.Sin(angles), heads2)
        first, second = op.Slice(x, s1, e1, axes1, steps1), op.Slice(x, s2, e2, axes2, steps2)
        return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(second), first, axis=-1), sin))

    def check(self, context, x, freqs, freqs2, heads1, heads2, s1, e1, s2, e2, axes1, axes2, steps1, steps2, **_):
        result = pattern.MatchResult()
        dim = x.shape[3] if x.shape is not None and x.shape.rank() == 4 else None
        if freqs is not freqs2 or not isinstance(dim, int) or dim % 2:
            return result.fail("not rotate-half RoPE over a 4-D [batch, heads, seq, head_dim] input")
        half = dim // 2
        want = [(heads1, [1]), (heads2, [1]), (s1, [0]), (e1, [half]), (s2, [half]), (steps1, [1]), (steps2, [1])]
        for value, expected in want:
            if _ints(value) != expected:
                return result.fail(f"{value.name} is not {expected}")
        if _ints(axes1) not in ([3], [-1]) or _ints(axes2) not in ([3], [-1]) or (_ints(e2) or [0])[0] < dim:
            return result.fail("the halves are not the last axis' halves")
        return result

    def rewrite(self, op, x, freqs, **_):
        return op.RotaryEmbedding(x, op.Cos(freqs), op.Sin(freqs), interleaved=0)


def fuse_rotary(model: ir.Model) -> int:
    return pattern.RewriteRuleSet([RotaryFusion.rule()]).apply_to_model(model)


# --- the LM head -----------------------------------------------------------------------------------------


class HeadWithoutReshape(pattern.RewriteRuleClassBase):
    """`Reshape(Gemm(Reshape(x, [-1, hidden]), E, transB=1), [batch, seq, vocab])` (models/gemma.py's tied_lm_head:
    no transposed copy of the embedding E) -> `com.microsoft.FusedMatMul(x, E, transB=1)` on the 3-D input:
    the same sgemm, bit for bit, without ONNX Runtime's copy of the float32 logits at the final Reshape (a graph
    output is never a view): 1 GB at a 1024-token prompt of a 262K vocabulary, 1.4 s of its prefill.
    A head quantized into MatMulNBits (quantize.py) keeps its op and takes the 3-D input likewise."""

    def pattern(self, op, x, flat_shape, weight, out_shape):
        flat = op.Reshape(x, flat_shape, _allow_other_attributes=True)
        head = pattern.OrValue(
            [
                op.Gemm(flat, weight, _allow_other_attributes=True, _outputs=["head"]),
                op.MatMulNBits(flat, weight, _domain=MS_DOMAIN, _allow_other_inputs=True,
                               _allow_other_attributes=True, _outputs=["head"]),
            ]
        )  # fmt: skip
        return op.Reshape(head, out_shape, _allow_other_attributes=True, _outputs=["logits"])

    def check(self, context, x, flat_shape, head, logits, **_):
        result = pattern.MatchResult()
        node = head.producer()
        if node.op_type == "Gemm":
            a = {k: v.value for k, v in node.attributes.items()}
            if len(node.inputs) != 2 or a.get("transA", 0) != 0 or a.get("transB", 0) != 1 or a.get("alpha", 1.0) != 1:
                return result.fail("not a plain x @ E^T")
        if x.shape is None or logits.shape is None or x.shape.rank() != 3 or logits.shape.rank() != 3:
            return result.fail("not a [batch, seq, hidden] -> [batch, seq, vocab] head")
        if _ints(flat_shape) != [-1, x.shape[2]] or list(logits.shape[:2]) != list(x.shape[:2]):
            return result.fail("the reshapes do not only flatten and restore [batch, seq]")
        return result

    def rewrite(self, op, x, head, **_):
        node = head.producer()
        if node.op_type == "Gemm":
            return op.FusedMatMul(x, node.inputs[1], transA=0, transB=1, alpha=1.0, _domain=MS_DOMAIN)
        attrs = {k: v.value for k, v in node.attributes.items()}
        return op.MatMulNBits(x, *node.inputs[1:], **attrs, _domain=MS_DOMAIN)


def fuse_head(model: ir.Model) -> int:
    return pattern.RewriteRuleSet([HeadWithoutReshape.rule()]).apply_to_model(model)


# --- helpers ---------------------------------------------------------------------------------------------


def _ints(value: ir.Value) -> list[int] | None:
    const = ir.convenience.get_const_tensor(value)
    return None if const is None else [int(v) for v in const.numpy().reshape(-1)]


def _const(tape: Tape, value: np.ndarray | np.generic) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(value))})


def _replace(old: ir.Value, new: ir.Value) -> None:
    """Every use of `old`, a graph output included (which keeps its name: it is the artifact contract)."""
    new.shape, new.type = old.shape, old.type
    convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if new.is_graph_output():
        name, old.name = old.name, None
        new.name = name
