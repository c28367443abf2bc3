"""Trace stage: the PyTorch reference model -> an ONNX graph with one `ai.gemma::Attention` node per layer.

The graph's inputs and outputs are the artifact contract (README "Artifact contract"):

    input_ids                    int64   [batch, sequence_length]
    attention_mask               int64   [batch, total_sequence_length]      total = past + sequence
    position_ids                 int64   [batch, sequence_length]
    past_key_values.{i}.key      float32 [batch, kv_heads, past_sequence_length, head_dim]
    past_key_values.{i}.value    (same)
 -> logits                       float32 [batch, sequence_length, vocab]
    present.{i}.key / .value     float32 [batch, kv_heads, total_sequence_length, head_dim]

Every size is symbolic: the exporter sees example sizes >= 2 (torch.export specialises 0 and 1), and the
window is an attribute of the attention op, never a traced constant.
"""

from __future__ import annotations

import logging
import warnings

import onnx
import torch
from torch import nn

from gemma_export.models.gemma import GemmaModel
from gemma_export.ops import attention as attention_op

OPSET = 23
BATCH, SEQ, PAST, TOTAL = "batch", "sequence_length", "past_sequence_length", "total_sequence_length"


def input_names(num_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *(f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value"))]


class _FlatDecoder(nn.Module):
    """The model with the flat signature of the ONNX graph (one tensor per past key/value)."""

    def __init__(self, model: GemmaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = list(zip(past_flat[0::2], past_flat[1::2], strict=True))
        logits, presents = self.model(input_ids, attention_mask, position_ids, past)
        return (logits, *(t for kv in presents for t in kv))


def export_decoder(model: GemmaModel) -> onnx.ModelProto:
    """Export `model` (float32, eval mode) to ONNX. Function bodies are attached later (optimize stage)."""
    cfg = model.cfg
    batch, seq, past, total = 2, 3, 4, 7  # distinct and >= 2, so no size is specialised or confused
    dtype = model.embed_tokens.weight.dtype
    kv_shape = (batch, cfg.num_key_value_heads, past, cfg.head_dim)
    example = (
        torch.full((batch, seq), 2, dtype=torch.int64),
        torch.ones((batch, total), dtype=torch.int64),
        torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq),
        *(torch.zeros(kv_shape, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers)),
    )
    b, s, p, t = (torch.export.Dim(n, min=1 if n != PAST else 0) for n in (BATCH, SEQ, PAST, TOTAL))
    past_dims = tuple({0: b, 2: p} for _ in range(2 * cfg.num_hidden_layers))
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, past_dims)  # *past_flat is one varargs entry

    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _FlatDecoder(model).eval(),
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names(cfg.num_hidden_layers),
            output_names=output_names(cfg.num_hidden_layers),
            dynamic_shapes=dynamic,
            custom_translation_table=attention_op.TRANSLATION_TABLE,
            optimize=False,
            verbose=False,
        )
    proto = program.model_proto
    _name_output_dims(proto)
    return proto


def _name_output_dims(proto: onnx.ModelProto) -> None:
    """Give outputs the contract's dim names (the exporter writes expressions such as 's1 + s2')."""
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        names = [BATCH, SEQ, None] if out.name == "logits" else [BATCH, None, TOTAL, None]
        for dim, name in zip(dims, names, strict=True):
            if name is not None:
                dim.Clear()
                dim.dim_param = name


class _quiet_exporter:
    """torch.onnx prints its progress with print() and logs at WARNING; our CLI reports stages itself."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        self._level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("torch").setLevel(self._level)
        self._redirect.__exit__(*exc)
