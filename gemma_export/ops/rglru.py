"""The RG-LRU recurrence of Griffin (RecurrentGemma), defined once.

Like `attention.py`, three faces kept together:

1. `rglru_reference`: the PyTorch reference, a loop over time (eager only; never traced);
2. `torch.ops.gemma.rglru`: the custom op the model calls, opaque to `torch.onnx.export`;
3. `ai.gemma::RGLRU`: the ONNX op it becomes (one node), and its function body: elementwise gate maths and
   one `Scan` over time, so the graph's size does not depend on the sequence length.

Semantics (graphs/rglru.md), per channel, accumulated in float32:

    a_t     = exp(log_a_t)
    x_hat_t = x_t * (1 if reset_t else sqrt(1 - a_t^2))      (the normalisation some exporters drop)
    h_t     = a_t * (0 if reset_t else h_{t-1}) + x_hat_t     (reset: a document starts at t)

Inputs: x [batch, seq, width] (the gated input `u * sigmoid(W_x u + b_x)`), log_a [batch, seq, width]
(`-8 * sigmoid(W_a u + b_a) * softplus(Lambda)`, <= 0), reset [batch, seq] bool, h0 [batch, width] float32.
Outputs: y [batch, seq, width] (h_t in x's dtype) and h_last [batch, width] float32, the next call's h0.
"""

from __future__ import annotations

import onnx.defs
import torch
from onnx import FunctionProto
from onnxscript import BOOL, FLOAT, graph, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from gemma_export.ops.attention import DOMAIN, DOMAIN_VERSION


def _register_schema() -> None:
    if onnx.defs.has("RGLRU", DOMAIN_VERSION, DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        "RGLRU",
        DOMAIN,
        DOMAIN_VERSION,
        "Griffin's real-gated linear recurrent unit over a sequence, with document resets (graphs/rglru.md).",
        inputs=[
            param("x", "T", "[batch, seq, width] gated input"),
            param("log_a", "T", "[batch, seq, width] log of the recurrence gate, <= 0"),
            param("reset", "B", "[batch, seq] true where a document starts"),
            param("h0", "S", "[batch, width] state before the first step"),
        ],
        outputs=[
            param("y", "T", "[batch, seq, width] the state after each step"),
            param("h_last", "S", "[batch, width] the state after the last step"),
        ],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("B", ["tensor(bool)"], "reset mask"),
            ("S", ["tensor(float)"], "recurrent state, always float32"),
        ],
    )
    onnx.defs.register_schema(schema)


_register_schema()
gemma = Opset(DOMAIN, DOMAIN_VERSION)


def rglru_reference(
    x: torch.Tensor, log_a: torch.Tensor, reset: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.exp(log_a.float())
    keep = ~reset[:, :, None]
    x_hat = x.float() * torch.where(keep, torch.sqrt(1 - a * a), torch.ones_like(a))
    a = a * keep
    h = h0.float()
    ys = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x_hat[:, t]
        ys.append(h)
    y = torch.stack(ys, dim=1) if ys else x.float()[:, :0]
    return y.to(x.dtype), h


@torch.library.custom_op("gemma::rglru", mutates_args=())
def rglru(
    x: torch.Tensor, log_a: torch.Tensor, reset: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rglru_reference(x, log_a, reset, h0)


@rglru.register_fake
def _(x, log_a, reset, h0):
    return torch.empty_like(x), torch.empty_like(h0, dtype=torch.float32)


@script(gemma, default_opset=op)
def RGLRU(
    x: FLOAT["batch", "seq", "width"],
    log_a: FLOAT["batch", "seq", "width"],
    reset: BOOL["batch", "seq"],
    h0: FLOAT["batch", "width"],
):
    xf = op.Cast(x, to=1)
    a = op.Exp(op.Cast(log_a, to=1))
    one = op.Constant(value_float=1.0)
    starts = op.Unsqueeze(reset, [2])
    x_hat = op.Mul(xf, op.Where(starts, one, op.Sqrt(op.Sub(one, op.Mul(a, a)))))
    a_kept = op.Where(starts, op.Constant(value_float=0.0), a)

    @graph()
    def step(h: FLOAT["batch", "width"], a_t: FLOAT["batch", "width"], x_t: FLOAT["batch", "width"]):
        h_next = op.Add(op.Mul(a_t, h), x_t)
        y_t = op.Identity(h_next)
        return h_next, y_t

    h_last, y = op.Scan(h0, a_kept, x_hat, body=step, num_scan_inputs=2, scan_input_axes=[1, 1], scan_output_axes=[1])
    y_out = op.CastLike(y, x)  # named like the schema's output
    return y_out, h_last


def _translate_rglru(x: FLOAT, log_a: FLOAT, reset: BOOL, h0: FLOAT) -> tuple[FLOAT, FLOAT]:
    """What torch.onnx emits for `torch.ops.gemma.rglru`: a single `ai.gemma::RGLRU` node."""
    return gemma.RGLRU(x, log_a, reset, h0)


TRANSLATION_TABLE = {torch.ops.gemma.rglru.default: _translate_rglru}


def function_protos(opset: int) -> list[FunctionProto]:
    proto = RGLRU.to_function_proto()
    for imp in proto.opset_import:
        if imp.domain == "":
            imp.version = opset
    return [proto]
