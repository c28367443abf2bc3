"""Soft-capped sliding-window attention, defined once.

The same op has three faces, kept together so they cannot drift apart:

1. `attention_reference`: the PyTorch reference (what the model computes).
2. `torch.ops.gemma.attention`: a `torch.library` custom op whose eager kernel *is* the reference, so the
   PyTorch model runs it and `torch.onnx.export(dynamo=True)` sees one opaque node.
3. `ai.gemma::Attention`: the ONNX op the exporter emits for it (one node, see `TRANSLATION_TABLE`), and its
   model-local function `attention_function` that decomposes it into standard ONNX ops, so any ONNX runtime
   runs the graph without a native kernel. The exporter inlines every function it creates during
   translation, so the function bodies are attached to the model after export (`attach_functions`).

Semantics (graphs/attention.md is the spec): queries are the last S of T key positions (T = past + S); which
keys each one sees (padding, causality, window) is ops/visibility.py's rule, which the reference applies as
it is and tests/ops/test_visibility.py checks the function body against.
Scores `q.k * scale` are soft-capped `softcap * tanh(s / softcap)` (softcap > 0) in float32 before the mask,
masked with the float32 minimum (so a fully masked padding row stays finite), softmaxed in float32.
"""

from __future__ import annotations

import onnx.defs
import torch
from onnx import FunctionProto
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from gemma_export.models import layers
from gemma_export.ops import visibility

DOMAIN = "ai.gemma"
DOMAIN_VERSION = 1


def _register_schema() -> None:
    """Declare `ai.gemma::Attention` to onnx, so the checker, shape inference and onnxscript know it."""
    if onnx.defs.has("Attention", DOMAIN_VERSION, DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        "Attention",
        DOMAIN,
        DOMAIN_VERSION,
        "Soft-capped, optionally sliding-window, grouped-query attention (graphs/attention.md).",
        inputs=[
            param("query", "T", "[batch, heads, seq, head_dim]"),
            param("key", "T", "[batch, kv_heads, total, head_dim]; total = past + seq"),
            param("value", "T", "[batch, kv_heads, total, head_dim]"),
            param("attention_mask", "M", "[batch, total]; nonzero marks a real token"),
        ],
        outputs=[param("output", "T", "[batch, heads, seq, head_dim]")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("M", ["tensor(int64)", "tensor(int32)", "tensor(bool)"], "key padding mask"),
        ],
        attributes=[
            attr("scale", kind.FLOAT, "multiplier of q.k"),
            attr("softcap", kind.FLOAT, "softcap * tanh(s / softcap) before the mask; 0 = none"),
            attr("window", kind.INT, "keys visible to a query, the current one included; 0 = all"),
            attr("causal", kind.INT, "1 = causal, 0 = bidirectional"),
            attr("kv_num_heads", kind.INT, "number of key/value heads (grouped-query attention)"),
            attr(
                "blocks",
                kind.INT,
                "the mask may carry values >= 2 (image blocks): 1 bounded by the window, 2 not; absent: 0",
                required=False,
            ),
        ],
    )
    onnx.defs.register_schema(schema)


_register_schema()
gemma = Opset(DOMAIN, DOMAIN_VERSION)

_MASKED = torch.finfo(torch.float32).min


def attention_reference(
    query: torch.Tensor,  # [batch, heads, seq, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, total, head_dim]
    value: torch.Tensor,  # [batch, kv_heads, total, head_dim]
    attention_mask: torch.Tensor,  # [batch, total], nonzero = a real token
    scale: float,
    softcap: float,
    window: int,
    causal: bool,
    blocks: int = visibility.BLOCKS_NONE,
) -> torch.Tensor:
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group, seq, head_dim)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).float() * scale  # [b, kv, g, s, t]
    scores = layers.softcap(scores, softcap)  # in float32, before the mask

    visible = visibility.visible(attention_mask, seq, window, causal, blocks)[:, None, None]  # [b, 1, 1, s, t]
    scores = scores.masked_fill(~visible, _MASKED)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value.unsqueeze(2))  # [b, kv, g, s, d]
    return out.reshape(batch, heads, seq, head_dim)


@torch.library.custom_op("gemma::attention", mutates_args=())
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scale: float,
    softcap: float,
    window: int,
    causal: bool,
    blocks: int = visibility.BLOCKS_NONE,
) -> torch.Tensor:
    return attention_reference(query, key, value, attention_mask, scale, softcap, window, causal, blocks)


@attention.register_fake
def _(query, key, value, attention_mask, scale, softcap, window, causal, blocks=visibility.BLOCKS_NONE):
    # Shapes only. Deliberately no check that attention_mask.shape[1] == key.shape[2]: it would tie two
    # symbolic sizes together at export time; the ONNX op checks it at run time instead.
    return torch.empty_like(query)


# --- ONNX: the one-node translation the exporter emits, and the function body that defines it -------------


@script(gemma, default_opset=op)
def Attention(
    query: FLOAT["batch", "heads", "seq", "head_dim"],
    key: FLOAT["batch", "kv_heads", "total", "head_dim"],
    value: FLOAT["batch", "kv_heads", "total", "head_dim"],
    attention_mask: INT64["batch", "total"],
    scale: float,
    softcap: float,
    window: int,
    causal: int,
    kv_num_heads: int,
    blocks: int = 0,
) -> FLOAT["batch", "heads", "seq", "head_dim"]:
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    q_shape = op.Shape(query)
    batch = op.Shape(query, start=0, end=1)
    seq = op.Shape(query, start=2, end=3)
    head_dim = op.Shape(query, start=3, end=4)
    total = op.Shape(key, start=2, end=3)
    kvh = op.Shape(key, start=1, end=2)  # == kv_num_heads for valid inputs; the tensor is the truth
    group = op.Div(op.Shape(query, start=1, end=2), kvh)

    # Grouped-query attention without copying K/V: queries [b, kv, g, s, d] against keys [b, kv, 1, d, t].
    q = op.Reshape(query, op.Concat(batch, kvh, group, seq, head_dim, axis=0), allowzero=1)
    k = op.Unsqueeze(op.Transpose(key, perm=[0, 1, 3, 2]), [2])
    v = op.Unsqueeze(value, [2])
    scores = op.Mul(op.Cast(op.MatMul(q, k), to=1), op.Constant(value_float=scale))

    # Soft-cap in float32, before the mask. Where() keeps the graph free of attribute-dependent structure.
    cap = op.Constant(value_float=softcap)
    capped = op.Mul(cap, op.Tanh(op.Div(scores, cap)))
    scores = op.Where(op.Greater(cap, op.Constant(value_float=0.0)), capped, scores)

    # ops/visibility.py's rule in ONNX ops: key j visible to query i at absolute position p = total - seq + i.
    total_s = op.Squeeze(total, [0])
    q_pos = op.Unsqueeze(op.Range(op.Sub(total_s, op.Squeeze(seq, [0])), total_s, one), [1])  # [s, 1]
    k_pos = op.Unsqueeze(op.Range(zero, total_s, one), [0])  # [1, t]
    dist = op.Sub(q_pos, k_pos)  # [s, t]
    win = op.Constant(value_int=window)
    no_window = op.LessOrEqual(win, zero)
    is_causal = op.Greater(op.Constant(value_int=causal), zero)
    below_hi = op.Or(no_window, op.Less(dist, win))  # d < W (or no window)
    # d >= lo: 0 when causal, 1 - W when bidirectional. (ONNX Runtime has no boolean Where kernel: And/Or.)
    above_lo = op.Or(op.And(is_causal, op.GreaterOrEqual(dist, zero)),
                     op.And(op.Not(is_causal), op.Or(no_window, op.Less(op.Neg(dist), win))))  # fmt: skip
    # blocks: a key of the query's own block (equal mask values >= 2) is visible whatever the lower bound
    ids = op.Cast(attention_mask, to=7)  # int64, whatever M is
    own = op.Unsqueeze(op.Slice(ids, op.Sub(total, seq), total, op.Constant(value_ints=[1])), [2])  # [b, s, 1]
    same = op.And(op.Equal(own, op.Unsqueeze(ids, [1])), op.GreaterOrEqual(own, op.Constant(value_int=2)))
    # `blocks` 2 (blocks past the window) as a boolean: row 0 of EyeLike(k = blocks) over [1, 3] is the one-hot of
    # blocks in (0, 1, 2). An absent attribute takes EyeLike's own default k = 0 (onnx's inliner drops a function
    # attribute's default, so a plain Constant(value_int=blocks) would be left without a value in text graphs).
    one_hot = op.EyeLike(op.Unsqueeze(op.Constant(value_floats=[0.0, 0.0, 0.0]), [0]), k=blocks)  # [1, 3] float
    past_window = op.Cast(op.Gather(op.Squeeze(one_hot, [0]), op.Constant(value_int=2)), to=9)  # bool, []
    # AND(window, OR(causal, block)), or with blocks 2 also every key of the block: OR(AND(window, causal), block)
    visible = op.Or(op.And(below_hi, op.Or(above_lo, same)), op.And(past_window, same))  # [b, s, t]
    keep = op.Unsqueeze(op.Not(op.Equal(attention_mask, op.CastLike(zero, attention_mask))), [1])
    visible = op.Unsqueeze(op.And(visible, keep), [1, 2])  # [b, 1, 1, s, t]

    scores = op.Where(visible, scores, op.Constant(value_float=-3.4028234663852886e38))
    probs = op.CastLike(op.Softmax(scores, axis=-1), value)
    out = op.MatMul(probs, v)  # [b, kv, g, s, d]
    return op.Reshape(out, q_shape, allowzero=1)  # allowzero: an empty query (S = 0) stays empty


def _translate_attention(
    query: FLOAT,
    key: FLOAT,
    value: FLOAT,
    attention_mask: INT64,
    scale: float,
    softcap: float,
    window: int,
    causal: bool,
    blocks: int = visibility.BLOCKS_NONE,
) -> FLOAT:
    """What torch.onnx emits for `torch.ops.gemma.attention`: a single `ai.gemma::Attention` node (`blocks`
    only where nonzero, so every graph without image blocks is as before)."""
    kv_num_heads = key.shape[1] if key.shape is not None else None
    if not isinstance(kv_num_heads, int):
        raise ValueError("the number of key/value heads must be static at export time")
    return gemma.Attention(
        query,
        key,
        value,
        attention_mask,
        scale=float(scale),
        softcap=float(softcap),
        window=int(window),
        causal=int(bool(causal)),
        kv_num_heads=kv_num_heads,
        **({"blocks": int(blocks)} if blocks else {}),
    )


TRANSLATION_TABLE = {torch.ops.gemma.attention.default: _translate_attention}


def function_protos(opset: int) -> list[FunctionProto]:
    """The model-local functions that define the `ai.gemma` ops in standard ONNX.

    A function must import the model's default-domain opset or onnx.checker rejects it; the ops used here
    mean the same from opset 18 on.
    """
    proto = Attention.to_function_proto()
    for imp in proto.opset_import:
        if imp.domain == "":
            imp.version = opset
    return [proto]
