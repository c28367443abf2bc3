"""Lower stage (`--target ort-cpu` only): the portable graph -> ONNX Runtime's CPU kernels, where exact.

The portable graph (`--target onnx`) carries one `ai.gemma::Attention` node per layer, defined by its
function body. Here each becomes ONNX Runtime kernels that compute the same thing (graphs/attention.md);
the node's attributes (scale, softcap, window, causal, kv_num_heads) are the only source of what to compute:

    causal, key = Concat(past, new) ->  If(batch > 1 and seq > 1 and past > 0,
                                           then: write new into past + Attention-23(q, k, v, visible),
                                           else: com.microsoft.GroupQueryAttention(q, new, past, bias))
    anything else                   ->  Concat + Attention-23(q, k, v, visible)

- Both paths take a growing cache as a shared buffer (README "Shared KV buffers"): `past` may be longer than
  the past; the new positions are written at [T - S, T) and the present is the whole buffer (the output's
  length is named `present_sequence_length`; `shared_buffers` reads it back for the manifest). Bound as both
  input and output, GroupQueryAttention writes in place; Attention-23's branch rebuilds the same buffer.
- q, k, v reach GroupQueryAttention as [batch, seq, heads * head_dim] and its output leaves so: rewrite rules
  (`cancel_transposes`) cancel the model's transposes to and from [batch, heads, seq, head_dim] against the
  lowering's (RoPE runs on the 3-D tensor); Attention-23's branch transposes for itself.

- GroupQueryAttention skips the blocks outside a sliding window (the fastest prefill: on 18 Gemma-3-270M-shaped
  layers, a 1024-token prompt, 2 threads, 25-40% less attention time than Attention-23 and up to 2x less than
  the function body; one decode step costs the same with all three), but takes no key mask: left padding goes in as
  an additive `attention_bias` (0 or the float32 lowest), which it adds after the soft-cap, as the spec
  requires; `seqlens_k` counts every slot. It refuses several new tokens with a past at batch > 1 (chunked
  prefill of a batch): the If takes Attention-23 then.
  RoPE stays outside it (`do_rotary` assumes contiguous positions from each row's first, which left padding
  breaks; Gemma 3's q/k norms come before RoPE anyway).
- Attention-23 takes the boolean visibility `visible` [batch, 1, seq, total] (ops/visibility.py's rule),
  softcap before the mask, a float32 softmax; its fully masked rows give zeros, which the spec allows.
- `visible` (and the bias made from it) is built once per distinct (mask, window, causal) and shared by
  every layer that has them, not once per layer as the function body does.

Then, with onnxscript's rewriter: RMSNorm -> RMSNormalization-23, residual Add + RMSNorm ->
com.microsoft.SkipSimplifiedLayerNormalization, rotate-half RoPE -> RotaryEmbedding-23; and the tied LM head
(pipeline/graph_patterns.py) on the 3-D hidden states (no copy of the logits), in slices of the vocabulary when its
weight is large (`chunk_head`: one slice at a time resident twice while ONNX Runtime pre-packs it). Last, the
tied embedding's lookup reads the head's weight under an alias of its bytes (`alias_lookup_tables`: one copy
resident, not two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir import convenience
from onnx_ir.tape import Tape
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from gemma_export.ops import attention, visibility
from gemma_export.pipeline import graph_patterns
from gemma_export.pipeline.optimize import strip_metadata
from gemma_export.targets import genai_config
from gemma_export.targets.base import Target

MS_DOMAIN = graph_patterns.MS_DOMAIN
FLOAT_SOFTMAX = 1  # Attention-23 softmax_precision: TensorProto.FLOAT
MASKED = float(np.finfo(np.float32).min)  # additive bias of an invisible key (graphs/attention.md: not -inf)
_INT64_MAX = np.iinfo(np.int64).max
SHARED_BUFFER_DIM = "present_sequence_length"  # a present that may be its past's buffer (README "Shared KV buffers")
GQA_HEAD_DIM_MULTIPLE = 8  # ONNX Runtime 1.31's CPU GroupQueryAttention needs head_dim % 8 == 0


@dataclass(frozen=True)
class AttentionAttrs:
    scale: float
    softcap: float
    window: int
    causal: int
    kv_num_heads: int
    blocks: int = 0  # the mask may name bidirectional blocks (values >= 2: image tokens); 2: past the window

    @classmethod
    def of(cls, node: ir.Node) -> AttentionAttrs:
        a = node.attributes
        blocks = a["blocks"].as_int() if "blocks" in a else 0
        return cls(a["scale"].as_float(), a["softcap"].as_float(), a["window"].as_int(), a["causal"].as_int(),
                   a["kv_num_heads"].as_int(), blocks)  # fmt: skip


def lower(model: ir.Model) -> ir.Model:
    """Rewrite every `ai.gemma::Attention` node, fuse norms and RoPE; drop what is no longer used."""
    graph = model.graph
    masks = _SharedMasks(graph)
    nodes = [n for n in graph if n.domain == attention.DOMAIN and n.op_type == "Attention"]
    # Each node's key and value as traced, before an earlier lowering replaces them: a Gemma 4 KV-shared layer
    # attends to the key/value Concat of the layer it reads, whose lowering makes that Concat a present buffer.
    kv = {id(n): (n.inputs[1], n.inputs[2]) for n in nodes}
    owned: set[int] = set()
    for node in nodes:
        key, value = kv[id(node)]
        _lower_attention(graph, node, masks, key, value, owns_kv=id(key) not in owned)
        owned.add(id(key))
    fuse_norms(model)
    fuse_rotary(model)
    cancel_transposes(model)
    chunk_head(model, fuse_head(model), HEAD_CHUNK_BYTES)
    alias_lookup_tables(model)
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


def _lower_attention(
    graph: ir.Graph, node: ir.Node, masks: _SharedMasks, key: ir.Value, value: ir.Value, owns_kv: bool = True
) -> None:
    """`owns_kv` False: the node reads another node's keys/values (Gemma 4 KV sharing): it computes the same
    attention from the same past and new keys, and its own present (the same buffer again) is dropped."""
    query = node.inputs[0]
    a = AttentionAttrs.of(node)
    visible = masks.visible(node)
    split = _past_and_new(key), _past_and_new(value)
    head_dim = query.shape[3] if query.shape is not None else None
    gqa_fits = (
        a.causal
        and not a.blocks  # GroupQueryAttention's own causal cut would hide an image's later tokens
        and a.scale != 0  # GroupQueryAttention reads scale 0 as 1/sqrt(head_dim)
        and None not in split
        and isinstance(head_dim, int)
        and head_dim % GQA_HEAD_DIM_MULTIPLE == 0
        and isinstance(query.shape[1], int)
    )
    if not gqa_fits:
        tape = Tape()
        out = _attention23(tape, query, node.inputs[1], node.inputs[2], visible, a)
        graph.insert_before(node, tape.nodes)
        _replace(node.outputs[0], out)
        graph.remove(node, safe=True)
        return

    (past_k, new_k), (past_v, new_v) = split
    # GroupQueryAttention's layout, [batch, seq, heads * head_dim], made in the main graph, where the transposes
    # from and back to the model's [batch, seq, heads, head_dim] cancel (BshdRules); Attention-23 takes its
    # [batch, heads, seq, head_dim] back inside its own branch.
    main, then_tape, else_tape = Tape(), Tape(), Tape()
    q3, k3, v3 = (_to_bsh(main, x) for x in (query, new_k, new_v))
    q4, k4, v4 = (_to_bhsd(then_tape, x, like) for x, like in ((q3, query), (k3, new_k), (v3, new_v)))
    mask = node.inputs[3]
    (k, present_k), (v, present_v) = (_write_into(then_tape, p, n, q4, mask) for p, n in ((past_k, k4), (past_v, v4)))
    out4 = _attention23(then_tape, q4, k, v, visible, a)
    out4.shape, out4.type = node.outputs[0].shape, node.outputs[0].type
    then_out = [_to_bsh(then_tape, out4), present_k, present_v]
    else_out = _gqa(else_tape, q3, k3, v3, past_k, past_v, masks.bias(node), masks.lengths(node), a, query.shape[1])
    for outs in (then_out, else_out):
        for out, like in zip(outs, (q3, key, value), strict=True):
            out.shape, out.type = like.shape, like.type
    graph.insert_before(node, main.nodes)

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
    out = _to_bhsd(tape, results[0], node.outputs[0])
    graph.insert_before(node, tape.nodes)
    _replace(node.outputs[0], out)
    graph.remove(node, safe=True)
    if not owns_kv:
        return
    for old, new in zip((key, value), results[1:], strict=True):
        _replace(old, new)
    for past, present in ((past_k, results[1]), (past_v, results[2])):
        if past.is_graph_input() and present.is_graph_output() and not isinstance(past.shape[2], int):
            # a growing cache whose present is the If's output: either path takes a shared buffer
            present.shape = ir.Shape([*present.shape[:2], ir.SymbolicDim(SHARED_BUFFER_DIM), *present.shape[3:]])


def shared_buffers(proto: onnx.ModelProto) -> set[str]:
    """The outputs of a lowered graph that may share their past input's buffer (their length is
    SHARED_BUFFER_DIM, not the total sequence length)."""
    return {
        o.name for o in proto.graph.output for d in o.type.tensor_type.shape.dim if d.dim_param == SHARED_BUFFER_DIM
    }


def _write_into(
    tape: Tape, past: ir.Value, new: ir.Value, query: ir.Value, mask: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """What GroupQueryAttention does with its cache, for the Attention-23 path: `past` may be a buffer longer
    than the past (README "Shared KV buffers"); its first T - S positions are the past, the new positions go at
    [T - S, T) and the rest of the buffer is kept: (the T keys attended, the present buffer). With a past of
    exactly T - S positions (the plain contract) that is Concat(past, new) for both."""
    total = tape.op("Shape", [mask], {"start": 1, "end": 2})
    past_len = tape.op("Sub", [total, tape.op("Shape", [query], {"start": 2, "end": 3})])
    axis, zero, end = _const(tape, np.array([2])), _const(tape, np.array([0])), _const(tape, np.array([_INT64_MAX]))
    attended = tape.op("Concat", [tape.op("Slice", [past, zero, past_len, axis]), new], {"axis": 2})
    rest = tape.op("Slice", [past, total, end, axis])
    return attended, tape.op("Concat", [attended, rest], {"axis": 2})


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


def _gqa(tape: Tape, q3: ir.Value, k3: ir.Value, v3: ir.Value, past_k: ir.Value, past_v: ir.Value, bias: ir.Value,
         lengths: tuple[ir.Value, ir.Value], a: AttentionAttrs, heads: int) -> list[ir.Value]:  # fmt: skip
    """GroupQueryAttention on [batch, seq, heads * head_dim] inputs; its output has that layout too."""
    seqlens_k, total = lengths
    attrs = {"num_heads": heads, "kv_num_heads": a.kv_num_heads, "scale": a.scale, "softcap": a.softcap,
             "local_window_size": a.window if a.window > 0 else -1}  # fmt: skip
    inputs = [q3, k3, v3, past_k, past_v, seqlens_k, total, None, None, None, bias]
    return tape.op_multi_out("GroupQueryAttention", inputs, attrs, num_outputs=3, domain=MS_DOMAIN)


_TO_BSNH = {"perm": [0, 2, 1, 3]}  # [batch, heads, seq, dim] <-> [batch, seq, heads, dim]: its own inverse


def _to_bsh(tape: Tape, x: ir.Value) -> ir.Value:
    """[batch, heads, seq, dim] -> [batch, seq, heads * dim]."""
    out = tape.op("Reshape", [tape.op("Transpose", [x], _TO_BSNH), _const(tape, np.array([0, 0, -1]))])
    if x.shape is not None and isinstance(x.shape[1], int) and isinstance(x.shape[3], int):
        out.shape, out.type = ir.Shape([x.shape[0], x.shape[2], x.shape[1] * x.shape[3]]), x.type
    return out


def _to_bhsd(tape: Tape, x: ir.Value, like: ir.Value) -> ir.Value:
    """[batch, seq, heads * dim] -> [batch, heads, seq, dim], `like` giving the heads."""
    split = tape.op("Reshape", [x, _const(tape, np.array([0, 0, like.shape[1], -1]))])
    out = tape.op("Transpose", [split], _TO_BSNH)
    out.shape, out.type = like.shape, like.type
    return out


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
        key = (what, id(mask), seq, *((a.window, a.causal, a.blocks) if per_window else ()))
        if key not in self.built:
            tape = Tape()
            self.built[key] = build(tape)
            self.graph.insert_before(node, tape.nodes)
        return self.built[key]

    def visible(self, node: ir.Node) -> ir.Value:
        """graphs/attention.md section 3: boolean [batch, 1, seq, total]."""
        a = AttentionAttrs.of(node)
        query, mask = node.inputs[0], node.inputs[3]
        return self._get(node, "visible", lambda tape: _visibility(tape, query, mask, a.window, a.causal, a.blocks))

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


def _visibility(tape: Tape, query: ir.Value, mask: ir.Value, window: int, causal: int, blocks: int = 0) -> ir.Value:
    """ops/visibility.py's rule in ONNX ops, for this node's window and causality only: key j visible to query i
    (absolute position p = T - S + i) when mask[b, j] != 0 and p - j is within reach (tests/ops/test_visibility.py);
    with `blocks`, also a key of the query's own block (equal mask values >= 2) beyond the lower bound, and with
    `blocks` 2 beyond the window's upper bound too."""
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
    if blocks and rule is not None:  # (bidirectional and global: every key already)
        lower = tape.op("GreaterOrEqual", [dist, zero] if causal else [tape.op("Neg", [dist]), win])
        lower = lower if causal else tape.op("Not", [lower])  # bidirectional: d > -W
        ids = tape.op("Cast", [mask], {"to": ir.DataType.INT64})
        start, end = tape.op("Unsqueeze", [tape.op("Sub", [total, seq]), zero]), tape.op("Unsqueeze", [total, zero])
        own = tape.op("Slice", [ids, start, end, _const(tape, np.array([1]))])  # [B, S]: each query's own value
        own = tape.op("Unsqueeze", [own, _const(tape, np.array([2]))])
        is_block = tape.op("GreaterOrEqual", [own, _const(tape, np.int64(2))])
        same = tape.op("And", [tape.op("Equal", [own, tape.op("Unsqueeze", [ids, one])]), is_block])  # [B, S, T]
        if blocks == visibility.BLOCKS_PAST_WINDOW:  # OR(AND(window, causal), block)
            rule = tape.op("Or", [rule, same])
        else:  # AND(window, OR(causal, block))
            upper = tape.op("Less", [dist, win]) if window > 0 else None
            rule = tape.op("Or", [lower, same])
            rule = tape.op("And", [rule, upper]) if upper is not None else rule
        rule = tape.op("Unsqueeze", [rule, one])  # [B, 1, S, T]
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
    (models/layers.py's rope_cos_sin and apply_rope) -> RotaryEmbedding-23(x, Cos(f), Sin(f)): the same values,
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


# --- GroupQueryAttention's layout without transposes ---------------------------------------------------------
# The model computes q, k, v as [batch, seq, heads, dim] and transposes them to [batch, heads, seq, dim] (RoPE
# and the attention op take that); GroupQueryAttention takes [batch, seq, heads * dim]. The lowering converts
# (_to_bsh / _to_bhsd); these rules cancel the transposes on both sides: three fewer per layer and call in, one
# out, each a copy and a kernel launch (most of a decode step's non-MatMul time).


def _is_swap(perm: ir.Attr) -> bool:
    return not perm.is_ref() and list(perm.as_ints()) == _TO_BSNH["perm"]


class RopeOnBsh(pattern.RewriteRuleClassBase):
    """`[b, s, h*d] <- Transpose(RotaryEmbedding(Transpose(y)))` (y [b, s, h, d]) -> RotaryEmbedding on the 3-D
    Reshape(y) with num_heads = h: the same rotation of each head's vector."""

    def pattern(self, op, y, cos, sin, p1, p2, flat):
        rope = op.RotaryEmbedding(op.Transpose(y, perm=p1), cos, sin, _allow_other_attributes=True, _outputs=["r"])
        return op.Reshape(op.Transpose(rope, perm=p2), flat, _allow_other_attributes=True)

    def check(self, context, y, r, p1, p2, flat, **_):
        result = pattern.MatchResult()
        if not (_is_swap(p1) and _is_swap(p2)) or _ints(flat) != [0, 0, -1] or len(r.producer().inputs) != 3:
            return result.fail("not [b, s, h, d] -> RoPE -> [b, s, h * d]")
        if y.shape is None or y.shape.rank() != 4 or not isinstance(y.shape[2], int):
            return result.fail("heads unknown")
        return result

    def rewrite(self, op, y, cos, sin, r, flat, **_):
        interleaved = r.producer().attributes.get_int("interleaved", 0)
        return op.RotaryEmbedding(op.Reshape(y, flat), cos, sin, interleaved=interleaved, num_heads=y.shape[2])


class SwapSwapReshape(pattern.RewriteRuleClassBase):
    """`Reshape(Transpose(Transpose(y, swap), swap), shape)` -> `Reshape(y, shape)` (v in, the output out)."""

    def pattern(self, op, y, p1, p2, shape):
        return op.Reshape(op.Transpose(op.Transpose(y, perm=p1), perm=p2), shape, _allow_other_attributes=True,
                          _outputs=["out"])  # fmt: skip

    def check(self, context, p1, p2, **_):
        return pattern.MatchResult() if _is_swap(p1) and _is_swap(p2) else pattern.MatchResult().fail("not swaps")

    def rewrite(self, op, y, shape, out, **_):
        return op.Reshape(y, shape, allowzero=out.producer().attributes.get_int("allowzero", 0))


class SeqOfSwapped(pattern.RewriteRuleClassBase):
    """`Shape(RotaryEmbedding(Transpose(y, swap)))[2:3]` (the masks' query length) -> `Shape(y)[1:2]`, so that
    nothing else needs the transposed query."""

    def __init__(self) -> None:
        super().__init__(remove_nodes=False)  # the RoPE and the Transpose stay for their other uses

    def pattern(self, op, y, perm, cos, sin):
        rope = op.RotaryEmbedding(op.Transpose(y, perm=perm), cos, sin, _allow_other_attributes=True)
        return op.Shape(rope, _allow_other_attributes=True, _outputs=["seq"])

    def check(self, context, perm, seq, **_):
        a = seq.producer().attributes
        ok = _is_swap(perm) and a.get_int("start", 0) == 2 and a.get_int("end", -1) == 3
        return pattern.MatchResult() if ok else pattern.MatchResult().fail("not the query length")

    def rewrite(self, op, y, **_):
        return op.Shape(y, start=1, end=2)


def cancel_transposes(model: ir.Model) -> int:
    n = pattern.RewriteRuleSet([SeqOfSwapped.rule()]).apply_to_model(model)
    return n + pattern.RewriteRuleSet([RopeOnBsh.rule(), SwapSwapReshape.rule()]).apply_to_model(model)


# --- the LM head -----------------------------------------------------------------------------------------


def fuse_head(model: ir.Model) -> ir.Node | None:
    """The tied LM head (pipeline/graph_patterns.py), `Reshape(Gemm(Reshape(x, [-1, hidden]), E, transB=1),
    [batch, seq, vocab])` -> `com.microsoft.FusedMatMul(x, E, transB=1)` on the 3-D input: the same sgemm, bit for
    bit, without ONNX Runtime's copy of the float32 logits at the final Reshape (a graph output is never a view):
    1 GB at a 1024-token prompt of a 262K vocabulary, 1.4 s of its prefill. A head quantized into MatMulNBits
    (quantize.py) keeps its op and takes the 3-D input likewise, and so does each part of one stored in parts
    (their Concat kept). Returns the fused head's last node (None: no tied head)."""
    head = graph_patterns.tied_head(model.graph)
    if head is None:
        return None
    fused = [_on_3d(part, head.hidden) for part in head.parts]
    if head.matmul.op_type == "Concat":
        fused.append(ir.node("Concat", [f.outputs[0] for f in fused], {"axis": -1}, name=head.matmul.name))
    # As onnxscript's rewriter does it: the new nodes after the last old one, the logits' name and shape kept.
    old = [head.flatten, *head.parts, *([head.matmul] if head.matmul.op_type == "Concat" else []), head.restore]
    convenience.replace_nodes_and_values(model.graph, head.restore, old, fused, head.restore.outputs,
                                         fused[-1].outputs)  # fmt: skip
    return fused[-1]


def _on_3d(matmul: ir.Node, x: ir.Value) -> ir.Node:
    """The head's MatMul on x [batch, seq, hidden]: a Gemm as FusedMatMul, a MatMulNBits as it is."""
    if matmul.op_type == "Gemm":
        plain = {"transA": 0, "transB": 1, "alpha": 1.0}
        return ir.node("FusedMatMul", [x, matmul.inputs[1]], plain, domain=MS_DOMAIN, name=matmul.name)
    attrs = {k: v.value for k, v in matmul.attributes.items()}
    return ir.node("MatMulNBits", [x, *matmul.inputs[1:]], attrs, domain=MS_DOMAIN, name=matmul.name)


HEAD_CHUNK_BYTES = 32 << 20  # the most of the head's weight resident twice at load (its original and packed copy)
SLICE_ROWS = 64  # a slice's rows are a multiple of this: whole blocks of MLAS's kernels


def chunk_head(model: ir.Model, head: ir.Node | None, max_bytes: int = HEAD_CHUNK_BYTES) -> int:
    """A fused head (`fuse_head`: one MatMul, or a Concat of parts) whose weights exceed `max_bytes` -> the same
    ops over consecutive slices of the vocabulary, their logits concatenated. Each slice reads its rows of the
    weights (and of a quantized head's scales and zero points) under an alias of their bytes
    (`meta["alias_offset"]`: package.write_model writes the head once); the head's own initializers are then read
    by the lookup alone. Returns the number of MatMuls the head has now (0: left as it was).

    Why: ONNX Runtime pre-packs each MatMul's weight at load and releases the original once it is packed; a
    whole head's original and packed copy were resident together (+640 MiB on Gemma-3-270M's float32 head: a
    1.7 GiB peak for 1.0 GiB of weights); in slices, one slice's. Decode reads the same bytes with the same
    kernels (its speed unchanged, measured); a pass that keeps every position's logits copies them once more.
    """
    if head is None:
        return 0
    parts = [v.producer() for v in head.inputs] if head.op_type == "Concat" else [head]
    sliced = [_slices(model.graph, part, max_bytes) for part in parts]
    kept = {id(part) for s, part in zip(sliced, parts, strict=True) if s == [part]}  # a small part stays as it is
    if len(kept) == len(parts):
        return 0
    nodes = [node for s in sliced for node in s]
    concat = ir.node("Concat", [n.outputs[0] for n in nodes], {"axis": -1}, name=f"{head.name}_slices")
    old = [p for p in parts if id(p) not in kept] + ([head] if head.op_type == "Concat" else [])
    new = [n for n in nodes if id(n) not in kept] + [concat]
    convenience.replace_nodes_and_values(model.graph, head, old, new, head.outputs, concat.outputs)
    return len(nodes)


def _slices(graph: ir.Graph, matmul: ir.Node, max_bytes: int) -> list[ir.Node]:
    """`matmul` over slices of its N rows, each reading aliases of its rows; [matmul] when it is small enough,
    or not a plain FusedMatMul / MatMulNBits whose weights are initializers [N, ...] that the lookup reads too
    (they stay, as the slices' storage)."""
    weights = [v for v in matmul.inputs[1:] if v is not None]
    vocab = weights[0].shape[0] if weights and weights[0].shape is not None else None
    plain = (matmul.op_type == "MatMulNBits" and len(matmul.inputs) <= 4) or matmul.op_type == "FusedMatMul"
    sliceable = (
        plain
        and isinstance(vocab, int)
        and all(w.is_initializer() and w.const_value is not None and w.const_value.shape[0] == vocab for w in weights)
        and all(len(w.uses()) > 1 for w in weights)
    )
    total = sum(w.const_value.nbytes for w in weights) if sliceable else 0
    if total <= max_bytes:
        return [matmul]
    count = -(-total // max_bytes)
    rows = -(-vocab // (count * SLICE_ROWS)) * SLICE_ROWS
    attrs = {k: v.value for k, v in matmul.attributes.items()}
    slices = []
    for start in range(0, vocab, rows):
        stop = min(start + rows, vocab)
        inputs = [matmul.inputs[0], *(_rows_alias(graph, w, start, stop) for w in weights)]
        if matmul.op_type == "MatMulNBits":
            attrs["N"] = stop - start
        slices.append(ir.node(matmul.op_type, inputs, dict(attrs), domain=matmul.domain,
                              name=f"{matmul.name}_rows{start}"))  # fmt: skip
    return slices


def _rows_alias(graph: ir.Graph, source: ir.Value, start: int, stop: int) -> ir.Value:
    """Rows [start, stop) of an initializer, as an initializer that aliases their bytes."""
    array = source.const_value.numpy()
    view = array[start:stop]  # leading-axis rows of a C-contiguous array: contiguous bytes, no copy
    return _alias(graph, source, f"{source.name}.rows{start}", view, offset=start * array[0].nbytes)


# A lookup reads a few rows of its table per call; these ops read all of a weight and pre-pack it at load.
LOOKUPS = {("", "Gather"): (0,), (MS_DOMAIN, "GatherBlockQuantized"): (0, 2, 3)}  # op -> its table inputs
ALIAS_SUFFIX = ".lookup"  # the lookup's name for a table: `{table}.lookup`
PREPACKING = {("", "MatMul"), ("", "Gemm"), (MS_DOMAIN, "FusedMatMul"), (MS_DOMAIN, "MatMulNBits")}


def alias_lookup_tables(model: ir.Model) -> int:
    """A lookup of a weight that a MatMul also reads (the tied embedding) reads it under a second initializer
    name, an alias of the same bytes: package.write_model writes the weight once and points both names at it
    (`meta["alias_of"]`). A quantized head's rows, `Reshape(packed, [vocab, bytes])`, become an alias too.

    Why: ONNX Runtime pre-packs a MatMul's constant weight at load (a copy in MLAS's layout, its fast kernels)
    and releases the original, unless another node reads it: the lookup did, so the LM head's weight stayed
    resident twice (+640 MiB on Gemma-3-270M: 1.7 GiB for 1.0 GiB of fp32 weights), and a quantized head's
    Reshape was folded at load into a copy. Under its own name, the lookup's table is a memory mapping of its
    own, of which only the rows looked up become resident. A table that no MatMul reads (a head in slices reads
    aliases of it) is read as it is, reshaped in place if need be. Returns the number of tables aliased."""
    graph = model.graph
    packed = {id(v) for n in graph for v in n.inputs[1:] if (n.domain, n.op_type) in PREPACKING and v is not None}
    aliased = 0
    for node in graph:
        for i in LOOKUPS.get((node.domain, node.op_type), ()):
            table = node.inputs[i] if i < len(node.inputs) else None
            source, shape = _stored_as(table)
            if source is None:
                continue
            if id(source) not in packed:
                if table is not source and all(user.op_type == "Reshape" for user, _ in source.uses()):
                    # a sliced head's table (chunk_head: the slices read aliases): it takes the lookup's shape
                    # itself, as ONNX Runtime would fold the Reshape into a copy at load
                    source.const_value = ir.Tensor(source.const_value.numpy().reshape(shape))
                    source.shape = ir.Shape(shape)
                    node.replace_input_with(i, source)
                continue
            alias = graph.initializers.get(source.name + ALIAS_SUFFIX)  # another lookup of the same table's
            if alias is None:
                view = source.const_value.numpy().reshape(shape)  # a view: no copy in memory or on disk
                alias = _alias(graph, source, source.name + ALIAS_SUFFIX, view)
            node.replace_input_with(i, alias)
            aliased += 1
    return aliased


def _alias(graph: ir.Graph, source: ir.Value, name: str, view: np.ndarray, offset: int = 0) -> ir.Value:
    """A new initializer `name` whose bytes are `source`'s from byte `offset` on (`view`: a numpy view of them),
    which package.write_model stores as a pointer to them, not a copy."""
    alias = ir.Value(name=name, shape=ir.Shape(view.shape), type=source.type, const_value=ir.Tensor(view))
    alias.meta["alias_of"] = source
    alias.meta["alias_offset"] = offset
    graph.register_initializer(alias)
    return alias


def _stored_as(table: ir.Value | None) -> tuple[ir.Value | None, list[int]]:
    """The initializer whose bytes `table` is (itself, or what a constant Reshape of it reads), and its shape."""
    if table is not None and table.is_initializer() and table.const_value is not None:
        return table, list(table.const_value.shape)
    node = table.producer() if table is not None else None
    if node is not None and node.op_type == "Reshape" and node.domain == "" and node.inputs[0].is_initializer():
        source, shape = node.inputs[0], _ints(node.inputs[1])
        if source.const_value is not None and shape is not None and -1 not in shape and 0 not in shape:
            return source, shape
    return None, []


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


# --- the target ------------------------------------------------------------------------------------------


class OrtCpu(Target):
    name = "ort-cpu"
    description = "ONNX Runtime's CPU kernels (GroupQueryAttention, fused norms and RoPE), where exact"
    providers = ("CPUExecutionProvider",)

    def lower(self, model: ir.Model) -> ir.Model:
        return lower(model)  # drops the function bodies it replaced

    def shared_buffers(self, proto: onnx.ModelProto) -> set[str]:
        return shared_buffers(proto)

    def write_extra_files(self, folder: Path, cfg: Any, cache_layout: str | None, max_length: int, encoder: bool
                          ) -> dict[str, str]:  # fmt: skip
        return {} if encoder else genai_config.write(folder, cfg, cache_layout, max_length)


TARGET = OrtCpu()
