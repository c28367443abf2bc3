"""The optional input `logits_to_keep` (gemma_export/pipeline/logits_to_keep.py): the LM head on the last k rows only.

For Gemma 3 (both targets, and int4), Gemma 2 (final soft-cap; windowed cache) and RecurrentGemma, each artifact
against the same pipeline without the pass ("today's" graph, in memory): k = 0 and the input left out give
today's logits, k = 1 and k = 3 the last rows of them, k >= the sequence length all of them; in the prefill of a
left-padded batch of 2 and in steps with a past; the carried state is the same whatever k. The head is still one
node on the 3-D hidden state (no Reshape of the logits), and the manifest lists the input as optional.
"""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from gemma_export.checkpoint import load
from gemma_export.dev import random_checkpoint
from gemma_export.manifest import Manifest
from gemma_export.pipeline import logits_to_keep, optimize, package, quantize, trace, vocab_parts
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import left_pad, positions, session_options
from gemma_export.targets import ort_cpu as lower

LAYERS = {"gemma3_text": 2, "gemma2": 2, "recurrent_gemma": 3}  # every kind of layer of each once, no more
# name -> (model type, build options)
BUILDS = {
    "gemma3-ort-cpu": ("gemma3_text", {}),
    "gemma3-onnx": ("gemma3_text", {"target": "onnx"}),
    # int4's graph (the quantized tied head); rounded to nearest, so that today's graph needs no calibration
    "gemma3-int4": ("gemma3_text", {"quant": "int4-rtn"}),
    "gemma2-softcap-windowed": ("gemma2", {"cache_layout": "windowed"}),
    "recurrentgemma": ("recurrent_gemma", {}),
}
ATOL = 1e-6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keep-checkpoints")
    out = {}
    for model_type, layers in LAYERS.items():
        config = copy.deepcopy(random_checkpoint.TINY_CONFIGS[model_type])
        config["num_hidden_layers"] = layers
        if "layer_types" in config:
            config["layer_types"] = config["layer_types"][:layers]
        out[model_type] = random_checkpoint.write_random_checkpoint(root / model_type, config)
    return out


@pytest.fixture(scope="module")
def traced():
    """The exporter is the slow stage: each model (and cache layout) traced once; every user gets a copy."""
    cache: dict[str, ir.Model] = {}
    export = trace.export_decoder

    def cached(model) -> ir.Model:
        key = json.dumps([model.cfg.to_json(), getattr(model, "cache_layout", None)], sort_keys=True)
        if key not in cache:
            cache[key] = export(model)
        return ir.from_proto(ir.to_proto(cache[key]))  # later stages rewrite the graph in place

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trace, "export_decoder", cached)
        yield cached


@pytest.fixture(scope="module")
def built(checkpoints, traced, tmp_path_factory):
    """name -> (artifact folder, today's graph: the same stages without the pass)."""
    cache: dict[str, tuple[Path, onnx.ModelProto]] = {}

    def get(name: str) -> tuple[Path, onnx.ModelProto]:
        if name not in cache:
            model_type, options = BUILDS[name]
            out = tmp_path_factory.mktemp("keep-artifacts") / name
            build(checkpoints[model_type], out, BuildOptions(**options), Stages(quiet=True))
            cache[name] = out, ir.to_proto(today(checkpoints[model_type], traced, **options))
        return cache[name]

    return get


def today(checkpoint: Path, export, target: str = "ort-cpu", quant: str = "none", cache_layout: str | None = None):
    """build()'s graph stages, without `logits_to_keep`."""
    cfg, model = load.load_model(checkpoint)
    if cache_layout is not None:
        model.use_cache_layout(cache_layout)
    graph = optimize.attach_functions(optimize.optimize(export(model)), trace.OPSET)
    if quant != "none":
        spec = quantize.spec_for(quant)
        parts = vocab_parts.of_checkpoint(checkpoint, cfg.vocab_size) if spec.embedding_tail else None
        graph, _ = quantize.quantize(graph, spec, parts=parts)
    return lower.lower(graph) if target == "ort-cpu" else graph


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])


def graph_of(artifact: Path) -> onnx.ModelProto:
    return onnx.load(str(artifact / package.MODEL_FILE), load_external_data=False)


class Runner:
    """The artifact's session and today's, fed the contract's inputs (state from the manifest)."""

    def __init__(self, artifact: Path, before: onnx.ModelProto) -> None:
        self.manifest = Manifest.read(artifact)
        self.now, self.before = session(artifact / package.MODEL_FILE), session(before)
        self.state = self.manifest.state
        self.outputs = [o.name for o in self.manifest.outputs]
        mask = next(v for v in self.manifest.inputs if v.name == "attention_mask")
        self.mask_covers_past = mask.shape[1] != "sequence_length"

    def empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros([batch if d == "batch" else d for d in s.shape], s.dtype) for s in self.state]

    def feed(self, ids, mask, pos, cache) -> dict[str, np.ndarray]:
        if not self.mask_covers_past:
            mask = mask[:, -ids.shape[1] :]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        return {**feed, **{s.input: c for s, c in zip(self.state, cache, strict=True)}}

    def check_step(self, ids, mask, pos, cache) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every k against today's graph; returns today's (logits, state)."""
        feed = self.feed(ids, mask, pos, cache)
        names = {s.output for s in self.state}
        base = dict(zip(self.outputs, self.before.run(self.outputs, feed), strict=True))
        seq = ids.shape[1]
        for k in (None, 0, 1, 3, seq, seq + 5):
            got = dict(zip(self.outputs, self.now.run(self.outputs, feed if k is None else {
                **feed, logits_to_keep.INPUT: np.array(k, np.int64)}), strict=True))  # fmt: skip
            rows = min(k, seq) if k else seq
            assert got["logits"].shape == (ids.shape[0], rows, base["logits"].shape[2]), k
            np.testing.assert_allclose(got["logits"], base["logits"][:, seq - rows :], rtol=0, atol=ATOL, err_msg=k)
            if not k:
                np.testing.assert_array_equal(got["logits"], base["logits"])  # today's, bit for bit
            for name in names:  # the carried state does not depend on k
                np.testing.assert_array_equal(got[name], base[name], err_msg=f"{name} k={k}")
        return base["logits"], [base[s.output] for s in self.state]


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_kept_rows_are_the_last_rows_of_todays_logits(built, name) -> None:
    """Prefill of a left-padded batch of 2, then steps with a past: a chunk of 4 tokens (several new tokens with
    a past: Attention-23 in ort-cpu graphs) and a decode step of one token."""
    runner = Runner(*built(name))
    pad = runner.manifest.model.config.pad_token_id
    ids, mask = left_pad([[2, 17, 31, 5, 99, 123, 7, 8, 40], [2, 45, 6, 77, 12]], pad)
    pos = positions(mask)
    logits, cache = runner.check_step(ids, mask, pos, runner.empty(2))
    for width in (4, 1):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        ids = np.concatenate([nxt, (nxt + np.arange(1, width)) % 100 + 3], axis=1)
        mask = np.concatenate([mask, np.ones((2, width), np.int64)], axis=1)
        pos = pos[:, -1:] + 1 + np.arange(width)
        logits, cache = runner.check_step(ids, mask, pos, cache)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_manifest_lists_the_optional_input_and_the_head_is_one_node(built, name) -> None:
    artifact, before = built(name)
    manifest = Manifest.read(artifact)
    vocab = manifest.model.config.vocab_size
    inputs = {v.name: v for v in manifest.inputs}
    assert inputs[logits_to_keep.INPUT].model_dump() == {
        "name": "logits_to_keep",
        "dtype": "int64",
        "shape": [],
        "optional": True,
        "default": 0,
    }
    assert all(not v.optional for n, v in inputs.items() if n != logits_to_keep.INPUT)
    logits = next(o for o in manifest.outputs if o.name == "logits")
    assert logits.shape == ["batch", "logits_length", vocab]
    assert manifest.parity.passed
    # ONNX Runtime sees an overridable initializer: not a required input
    runner = session(artifact / package.MODEL_FILE)
    assert logits_to_keep.INPUT not in {i.name for i in runner.get_inputs()}
    assert [i.name for i in runner.get_overridable_initializers()] == [logits_to_keep.INPUT]
    onnx.checker.check_model(str(artifact / package.MODEL_FILE))

    proto = graph_of(artifact)
    heads = [n for n in proto.graph.node if _is_head(n, vocab)]
    # one head, on the kept rows: Slice -> head -> (soft-cap) -> logits, no Reshape; an int4 embedding stored in two
    # parts of rows (quantize.py) is one MatMulNBits per part, their logits concatenated
    split = manifest.quantization is not None and "embedding_tail" in manifest.quantization.widths
    parts = manifest.quantization.quantized["embedding_parts"].split(", ") if split else [""]
    assert len(heads) == len(parts)
    assert len({n.input[0] for n in heads}) == 1
    producers = {out: n for n in proto.graph.node for out in n.output}
    hidden = producers[heads[0].input[0]]
    if hidden.op_type == "Reshape" and heads[0].op_type == "Gemm":  # --target onnx: the traced head, flattened
        hidden = producers[hidden.input[0]]
    starts = producers[hidden.input[1]]  # 0 - Unsqueeze(logits_to_keep)
    assert hidden.op_type == "Slice" and producers[starts.input[1]].input[0] == logits_to_keep.INPUT
    chain, value = [], heads[0].output[0]
    if split:
        (concat,) = [n for n in proto.graph.node if value in n.input]
        assert concat.op_type == "Concat" and list(concat.input) == [n.output[0] for n in heads]
        value = concat.output[0]
    while value != "logits":
        (consumer,) = [n for n in proto.graph.node if value in n.input]
        chain.append(consumer.op_type)
        value = consumer.output[0]
    if heads[0].op_type == "Gemm":
        assert chain.pop(0) == "Reshape"  # --target onnx keeps the traced [batch * rows, vocab] -> 3-D Reshape
    cfg = manifest.model.config
    softcap = cfg.get("final_logit_softcapping") or cfg.get("logits_soft_cap")  # Gemma 2, RecurrentGemma
    assert chain == (["Div", "Tanh", "Mul"] if softcap else [])
    kind = BUILDS[name][1]
    expected = ("com.microsoft", "MatMulNBits") if kind.get("quant") else ("", "Gemm")
    if kind.get("target", "ort-cpu") == "ort-cpu" and not kind.get("quant"):
        expected = ("com.microsoft", "FusedMatMul")
    assert (heads[0].domain, heads[0].op_type) == expected
    # today's graph has the same head and the same Reshapes: the slice adds no copy of the logits
    ops, ops_before = _ops(proto), _ops(before)
    for op in (expected, ("", "Reshape"), ("", "Gemm"), ("com.microsoft", "FusedMatMul")):
        assert ops[op] == ops_before[op], op
    assert ops[("", "Slice")] == ops_before[("", "Slice")] + 1


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in proto.graph.node)


def _is_head(node: onnx.NodeProto, vocab: int) -> bool:
    if node.op_type == "MatMulNBits":  # the head, or a part of its rows (the tied embedding's bytes)
        return helper.get_node_attr_value(node, "N") == vocab or "embed_tokens" in node.input[1]
    return node.op_type in ("Gemm", "FusedMatMul")
