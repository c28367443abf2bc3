"""Trace stage: a PyTorch reference model -> an ONNX graph whose custom ops are single `ai.gemma` nodes.

The graph's inputs and outputs are the artifact contract (README "Artifact contract"):

    input_ids        int64   [batch, sequence_length]
    attention_mask   int64   [batch, total_sequence_length]  (past + new tokens; Gemma)
                             [batch, sequence_length]        (new tokens; RecurrentGemma carries the rest)
    position_ids     int64   [batch, sequence_length]
    <state inputs>           as the model's `state_specs()` say, e.g. past_key_values.{i}.key
 -> logits           float32 [batch, sequence_length, vocab]  (the optimize stage then adds the optional input
                                                               logits_to_keep: logits_to_keep.py)
    <state outputs>          e.g. present.{i}.key, fed back as the matching input on the next call

Every size is symbolic: the exporter sees example sizes >= 2 (torch.export specialises 0 and 1), and
windows are attributes of the ops, never traced constants.
"""

from __future__ import annotations

import ast
import logging
import warnings

import onnx_ir as ir
import torch
from torch import nn

from gemma_export.models.state import StateSpec
from gemma_export.ops import attention, rglru

OPSET = 23
BATCH, SEQ, PAST, TOTAL = "batch", "sequence_length", "past_sequence_length", "total_sequence_length"
IMAGES, IMAGE_TOKENS = "num_images", "num_image_tokens"
TRANSLATION_TABLE = {**attention.TRANSLATION_TABLE, **rglru.TRANSLATION_TABLE}


class _FlatDecoder(nn.Module):
    """The model with the flat signature of the ONNX graph: one tensor per carried state (after a multimodal
    decoder's extra inputs, models/multimodal.py: token_type_ids, image_features)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.extras = len(getattr(model, "extra_inputs", ()))

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        extra, state = rest[: self.extras], rest[self.extras :]
        logits, new_state = self.model(input_ids, attention_mask, position_ids, list(state), *extra)
        return (logits, *new_state)


def export_decoder(model: nn.Module) -> ir.Model:
    """Export a `gemma_export.models` decoder (eval mode) to ONNX. Function bodies are attached later.

    The model describes its carried state (`state_specs()`) and whether its attention mask covers the past
    (`mask_covers_past`); everything else about the graph's signature is the same for every model.
    """
    specs = model.state_specs()
    batch, seq, past, total = 2, 3, 4, 7  # distinct and >= 2, so no size is specialised or confused
    mask_len = total if model.mask_covers_past else seq
    example = (
        torch.full((batch, seq), 2, dtype=torch.int64),
        torch.ones((batch, mask_len), dtype=torch.int64),
        torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq),
        *(_example_state(spec, batch, past) for spec in specs),
    )
    b, s, p, t = (torch.export.Dim(n, min=1 if n != PAST else 0) for n in (BATCH, SEQ, PAST, TOTAL))
    state_dims = tuple({0: b, spec.grows: p} if spec.grows is not None else {0: b} for spec in specs)
    dynamic = ({0: b, 1: s}, {0: b, 1: t if model.mask_covers_past else s}, {0: b, 1: s}, state_dims)
    extra_names = list(getattr(model, "extra_inputs", ()))
    if extra_names:  # a multimodal decoder: token_type_ids [batch, total], image_features [image tokens, hidden]
        example = (*example[:3], torch.zeros((batch, total), dtype=torch.int64),
                   torch.zeros((5, model.cfg.hidden_size)), *example[3:])  # fmt: skip
        images = torch.export.Dim(IMAGE_TOKENS, min=0)
        dynamic = (*dynamic[:3], ({0: b, 1: t}, {0: images}, *state_dims))  # *rest: extras then the state

    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _FlatDecoder(model).eval(),
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask", "position_ids", *extra_names, *(spec.input for spec in specs)],
            output_names=["logits", *(spec.output for spec in specs)],
            dynamic_shapes=dynamic,
            custom_translation_table=TRANSLATION_TABLE,
            optimize=False,
            verbose=False,
        )
    # The IR model references the torch weights; a ModelProto would copy every one (a second 10 GB at 2B).
    graph = program.model
    _name_output_dims(graph, specs)
    name_projections(graph)
    return graph


def export_encoder(model: nn.Module) -> ir.Model:
    """Export an EmbeddingGemma (eval mode): (input_ids, attention_mask) [batch, sequence_length] ->
    sentence_embedding [batch, dim], token_embeddings [batch, sequence_length, hidden]."""
    batch, seq = 2, 5
    example = (torch.full((batch, seq), 2, dtype=torch.int64), torch.ones((batch, seq), dtype=torch.int64))
    b, s = torch.export.Dim(BATCH, min=1), torch.export.Dim(SEQ, min=1)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding", "token_embeddings"],
            dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}),
            custom_translation_table=TRANSLATION_TABLE,
            optimize=False,
            verbose=False,
        )
    graph = program.model
    for out, names in zip(graph.graph.outputs, ({0: BATCH}, {0: BATCH, 1: SEQ}), strict=True):
        dims = list(out.shape)
        for axis, name in names.items():
            dims[axis] = ir.SymbolicDim(name)
        out.shape = ir.Shape(dims)
    return graph


def export_vision(model: nn.Module) -> ir.Model:
    """Export the vision graph (models/siglip.py): pixel_values [num_images, channels, size, size] float32 ->
    image_features [num_images, mm_tokens_per_image, text hidden] float32."""
    cfg = model.cfg
    example = (torch.zeros((2, cfg.num_channels, cfg.image_size, cfg.image_size)),)
    n = torch.export.Dim(IMAGES, min=1)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=["pixel_values"],
            output_names=["image_features"],
            dynamic_shapes=({0: n},),
            custom_translation_table=TRANSLATION_TABLE,
            optimize=False,
            verbose=False,
        )
    graph = program.model
    out = graph.graph.outputs[0]
    out.shape = ir.Shape([ir.SymbolicDim(IMAGES), *list(out.shape)[1:]])
    return graph


def name_projections(model: ir.Model) -> None:
    """Name each projection's MatMul after its module (`layers.3.self_attn.v_proj`), from the exporter's
    name-scope metadata, which the optimizer drops later: the quantize stage chooses widths by role (k-quant
    style, quantize.py), and an integrator reading the graph sees which weight each MatMul holds."""
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        hierarchy = node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "")
        if node.op_type != "MatMul" or not scopes or "torch.nn.modules.linear.Linear" not in hierarchy:
            continue
        module = ast.literal_eval(scopes)[-2]  # [..., "model.layers.0.self_attn.q_proj", "linear"]
        node.name = module.removeprefix("model.")


def _example_state(spec: StateSpec, batch: int, past: int) -> torch.Tensor:
    shape = [batch if d == "batch" else d for d in spec.shape]
    if spec.grows is not None:
        shape[spec.grows] = past
    return torch.zeros(shape, dtype=spec.dtype)


def _name_output_dims(model: ir.Model, specs: list[StateSpec]) -> None:
    """Give outputs the contract's dim names (the exporter writes expressions such as 's1 + s2')."""
    grows = {spec.output: spec.grows for spec in specs}
    for out in model.graph.outputs:
        dims = list(out.shape)
        names: dict[int, str] = {0: BATCH, 1: SEQ} if out.name == "logits" else {0: BATCH}
        if grows.get(out.name) is not None:
            names[grows[out.name]] = TOTAL
        for axis, name in names.items():
            dims[axis] = ir.SymbolicDim(name)
        out.shape = ir.Shape(dims)


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
