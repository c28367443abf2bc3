"""Quantize stage (optional): weight-only int8 / int4 with ONNX Runtime's `MatMulNBits`, on the optimized
portable graph (before `--target ort-cpu`'s lowering, which leaves MatMulNBits as it finds it).

What is quantized, and what is not:

* every MatMul with a constant weight (q/k/v/o, gate/up/down; RecurrentGemma's linear_x/y/out and MLP), at the
  width its role gets (`QuantSpec`): with `--quant int4-gptq`, from the codes, scales and zero points GPTQ chose in
  the calibrate stage (calibrate.py, gptq.py); otherwise rounded to nearest by onnxruntime's own kernel
  (`qbits_block_quant`, what its `MatMulNBitsQuantizer` runs: per block of `block_size` input features, one
  float32 scale and, when asymmetric, one zero point per block), laid out and named as that quantizer does;
* the tied LM head `Gemm(x, embedding, transB=1)`: the ORT quantizer only rewrites MatMul and would leave the
  largest tensor (262144 x 640 on Gemma-3-270M, 63% of its weights) in float32. Its packed layout is
  [N, k_blocks, blob] of B = embedding^T, i.e. the embedding's own rows cut into blocks along hidden: the
  same kernel (`qbits_block_quant`) quantizes it with no transposed copy kept, and one MatMulNBits reads it;
* the embedding lookup `Gather(embedding, ids)`: a `GatherBlockQuantized` that reads the *same* packed
  bytes, scales and zero points (a Reshape of the LM head's weight), as onnxruntime-genai does for tied
  models. Keeping a float32 copy for the lookup would cost vocab x hidden x 4 bytes (671 MB on 270M, more
  than all the quantized layers together); the price is the lookup's quantization error, which the
  agreement gate measures like every other;
* every other float32 table looked up by `input_ids` alone (Gemma 4's per-layer embeddings): a
  `GatherBlockQuantized` at the embedding's width;
* kept in float32: norms, biases, RoPE tables, RecurrentGemma's Conv1D and block-diagonal RG-LRU gates
  (Einsum, not MatMul), and every activation: MatMulNBits computes in float32 (or, with accuracy_level 4,
  int8 activations per block with float32 accumulation), so residuals, norms and logits stay float32.

The `ai.gemma` nodes (Attention, RGLRU) and their function bodies are not MatMul nodes and are left alone.
The stage rewrites the IR in place, one weight at a time (never the whole model as a ModelProto: on a
multi-billion-parameter checkpoint that copy alone exceeded the machine's memory), and the package stage
writes it as it writes every model (one external-data file, one writer, same bytes for the same inputs).
Round-to-nearest and GPTQ are deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import onnx_ir as ir
from onnx_ir import convenience
from onnx_ir.tape import Tape

from gemma_export.pipeline import gptq, graph_patterns, memory, vocab_parts
from gemma_export.pipeline.vocab_parts import Part

QUANTS = ("none", "int8", "int4", "int4-gptq", "int4-rtn", "int4-plain")
MS_DOMAIN = "com.microsoft"
RTN_METHOD = "onnxruntime MatMulNBits, round-to-nearest per block (matmul_nbits_quantizer)"
GPTQ_METHOD = "gptq: the projections by GPTQ on calibration text (pipeline/gptq.py); the embedding round-to-nearest"


@dataclass(frozen=True)
class Width:
    """How one weight is stored by MatMulNBits."""

    bits: int  # 4 or 8
    block_size: int  # input features per scale; a power of two >= 16 (MatMulNBits' constraint)
    symmetric: bool  # False: a zero point per block (1/64 more bytes at int4, block 32)

    def with_block(self, block_size: int | None) -> Width:
        return self if block_size is None else Width(self.bits, block_size, self.symmetric)

    @property
    def name(self) -> str:
        """`int8 b128`: bits and block size, as the manifest's summaries write them."""
        return f"int{self.bits} b{self.block_size}"


@dataclass(frozen=True)
class GptqSettings:
    """GPTQ of the projections (pipeline/gptq.py, calibrate.py); the tied embedding stays round-to-nearest."""

    damp: float = 0.01  # added to the Hessian's diagonal, as a fraction of its mean
    act_order: bool = True  # features quantized in decreasing diag(H) order (grids fixed up front)
    range_steps: int = 10  # shrink factors of each block's range tried, 1.0 down to 0.6 (0: ORT's grid as is)
    tokens: int = 8192  # calibration tokens, in sequences of up to 1024 (fewer if the model's context is shorter)
    sequence_length: int = 1024


@dataclass(frozen=True)
class QuantSpec:
    """Which width each weight gets. Projections are named by their module (`layers.3.mlp.down_proj`, as the
    trace stage names their MatMul nodes); `other_roles` lists the roles (`o_proj`) stored at `other` instead.
    `embedding_tail`: the tied embedding's less common rows are stored at this width, the common ones at
    `embedding` (vocab_parts.py: a quarter of the vocabulary by the tokenizer's merge ranks; without a tokenizer,
    the first half of the ids); None: every row at `embedding`."""

    projections: Width
    embedding: Width  # the tied embedding: the LM head and the lookup, one copy
    accuracy_level: int  # MatMulNBits: 0 = float32 activations, 4 = int8 activations (the fast CPU path)
    other_roles: tuple[str, ...] = ()
    other: Width | None = None
    gptq: GptqSettings | None = None  # None: round-to-nearest (ONNX Runtime's quantizer) everywhere
    embedding_tail: Width | None = None

    def width_of(self, node_name: str) -> Width:
        role = node_name.rsplit(".", 1)[-1]
        return self.other if self.other is not None and role in self.other_roles else self.projections

    @property
    def narrowest(self) -> Width:
        """The narrowest width any weight gets: the manifest's summary (`bits`, `block_size`: what `--quant` names,
        and what a compared system is built at), `widths` having every role's."""
        widths = [self.projections, self.other, self.embedding, self.embedding_tail]
        return min((w for w in widths if w is not None), key=lambda w: (w.bits, w.block_size))

    @property
    def bits(self) -> int:
        return self.narrowest.bits

    @property
    def block_size(self) -> int:
        return self.narrowest.block_size

    def with_block(self, block_size: int | None) -> QuantSpec:
        """Every weight at `block_size` (--block-size), its bits kept."""
        if block_size is None:
            return self
        block = lambda width: width.with_block(block_size) if width is not None else None  # noqa: E731
        return dataclasses.replace(self, projections=block(self.projections), embedding=block(self.embedding),
                                   other=block(self.other), embedding_tail=block(self.embedding_tail))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "symmetric": self.narrowest.symmetric,
            "accuracy_level": self.accuracy_level,
            "widths": {
                "projections": asdict(self.projections),
                **({role: asdict(self.other) for role in self.other_roles} if self.other else {}),
                "embedding": asdict(self.embedding),
                **({"embedding_tail": asdict(self.embedding_tail)} if self.embedding_tail else {}),
            },
        }


INT4_B32 = Width(bits=4, block_size=32, symmetric=False)
INT8_B32 = Width(bits=8, block_size=32, symmetric=False)
INT8_B128 = Width(bits=8, block_size=128, symmetric=False)

# Defaults per --quant. Block 32 and int8 activations are what onnxruntime-genai's CPU int4 builds use; without
# int8 activations, 8-bit weights decoded >20x slower (Gemma-3-270M shape, 2 threads). Asymmetric int4: lower KL
# to the fp32 reference than symmetric on most models measured, at no measurable decode cost.
#
# The int4 widths are a mix, as llama.cpp's k-quants are, chosen on the real Gemma-3-270M (README "Real
# checkpoints") within the bytes of llama.cpp's Q4_K_M file of the same model (241 MiB), measured as perplexity
# on GPL-2's text, not the text the tests hold out (fp32 13.58; PyTorch, ONNX Runtime's rounding). The tied
# embedding is 63% of the weights and read whole every token by the LM head: at int8 (block 128, 1.04 bytes a
# weight) it costs nothing measurable (13.59), at int4 +10% (14.89); its second half of the vocabulary (by id) at
# int4, the first at int8, +1.5% (13.78), which leaves room for the projections at int8 (13.61 with the whole
# embedding at int8). Each projection role alone at int4: up +8.5%, down +6.9%, gate +4.9%, v +2.7%, q +2.1%,
# k +1.9%, o 0%: o stays at int4 (ROLES_AT_INT4). Built and measured on the held-out text (fp32 14.412): with the
# embedding split by id, this mix 14.668 (1.018x, 229 MiB), with q and k at int4 too 14.884 (1.033x, 224 MiB).
#
# `int4` rounds to nearest. `int4-gptq` chooses the same widths' integers by GPTQ on calibration text: on these
# widths it measured worse on the held-out text (14.521 against 14.429; with the id split 14.829 against 14.668),
# though closer on the gate's random-token prompts (KL 0.20 vs 0.30): its gain was on the MLP projections, which
# this mix keeps at int8 (the previous mix, gate/down/q/o at int4: GPTQ 15.23 vs 16.38 rounded to nearest).
# `int4-rtn` is `int4` under its earlier name. `int4-plain` is int4 everywhere, rounded to nearest (the smallest
# and fastest).
#
# Which rows of the embedding get int8 matters more than how many: the common tokens by the tokenizer's BPE merge
# ranks, a quarter of the vocabulary, measured 13.679 on GPL-2 against the first half of the ids' 13.764, and
# built 14.429 on the held-out text (1.001x fp32) against 14.668, 15 MiB smaller (vocab_parts.py).
ROLES_AT_INT4 = ("o_proj",)
_MIX = {"projections": INT8_B128, "other_roles": ROLES_AT_INT4, "other": INT4_B32, "embedding": INT8_B128,
        "embedding_tail": INT4_B32}  # fmt: skip
DEFAULTS: dict[str, QuantSpec] = {
    "int8": QuantSpec(projections=INT8_B32, embedding=INT8_B32, accuracy_level=4),
    "int4": QuantSpec(**_MIX, accuracy_level=4),
    "int4-gptq": QuantSpec(**_MIX, accuracy_level=4, gptq=GptqSettings()),
    "int4-rtn": QuantSpec(**_MIX, accuracy_level=4),  # int4 under its earlier name: the same widths, rounded
    "int4-plain": QuantSpec(projections=INT4_B32, embedding=INT4_B32, accuracy_level=4),
}


def spec_for(quant: str, block_size: int | None = None) -> QuantSpec:
    return DEFAULTS[quant].with_block(block_size)


def is_valid_block_size(block_size: int) -> bool:
    return block_size >= 16 and block_size & (block_size - 1) == 0


# ---------------------------------------------------------------------------------------------------------
# The stage: one weight at a time, on the IR
# ---------------------------------------------------------------------------------------------------------

CHUNK_BYTES = 64 << 20  # float32 copied per call of the kernel: a contiguous slice of one weight, not the model


@dataclass(frozen=True)
class Packed:
    """One weight as MatMulNBits / GatherBlockQuantized store it, laid out as ONNX Runtime's quantizer writes it:
    data uint8 [N, k_blocks, blob], scales float32 [N, k_blocks], zero points uint8 (None when symmetric)."""

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None


def quantize(
    model: ir.Model, spec: QuantSpec, calibrated: gptq.Calibrated | None = None, parts: list[Part] | None = None
) -> tuple[ir.Model, dict[str, Any]]:
    """The model with its weights quantized, in place, and the manifest's `quantization` record. The MatMuls named
    in `calibrated` (the calibrate stage's GPTQ) take its weights; the others are rounded to nearest here.
    `parts`: with an `embedding_tail`, the tied embedding's runs of ids and which are wide (vocab_parts.py);
    None: the first half of the ids wide.

    One weight at a time: each is read (a view of the checkpoint's mapping), packed, and its pages dropped from
    the resident set (memory.py), so the stage's memory is the packed weights plus one weight's transient slice,
    whatever the model's size (an E2B's 9.4 GB per-layer table included)."""
    graph = model.graph
    before = _initializer_bytes(graph)
    head = graph_patterns.tied_gemm(graph)
    float_table = (
        head is not None and head.inputs[1].is_initializer() and head.inputs[1].const_value.dtype == ir.DataType.FLOAT
    )
    head = head if float_table else None
    matmuls = [n for n in graph if n.op_type == "MatMul" and n.domain == "" and _constant_matrix(n.inputs[1])]
    done: set[str] = set()
    for node in matmuls:
        if calibrated is not None and node.name in calibrated.weights:
            width, packed = _calibrated(node, calibrated)
            done.add(node.name)
        else:
            width = spec.width_of(node.name)
            b = node.inputs[1].const_value.numpy()  # [K, N]
            packed = round_to_nearest(lambda lo, hi, b=b: b[:, lo:hi], b.shape[1], width)
        _to_matmul_nbits(graph, node, packed, width, spec.accuracy_level)
    kept_float = sum(1 for n in graph if n.op_type == "MatMul")
    selection = "id"
    if head is not None and spec.embedding_tail is not None:
        fits = bool(parts) and parts[0].start == 0 and parts[-1].stop == head.inputs[1].const_value.shape[0]
        parts, selection = (parts, vocab_parts.SELECTION) if fits else (_by_id(head), "id")
    tied = head is not None and _quantize_tied_embedding(graph, head, spec, parts)
    tables = _quantize_lookup_tables(graph, spec.embedding)
    record = {
        "method": GPTQ_METHOD if done else RTN_METHOD,
        **spec.to_json(),
        "quantized": {
            "matmul": len(matmuls),
            **({"matmul_gptq": len(done)} if calibrated else {}),
            "matmul_kept_float": kept_float,  # a MatMul whose weight is not a constant (or is shared)
            "lm_head": "MatMulNBits on the tied embedding" if tied else "float32 (no tied Gemm head found)",
            "embedding": "GatherBlockQuantized on the LM head's quantized weight" if tied else "float32",
            **(_parts_record(parts, spec, selection) if tied else {}),
            **({"lookup_tables": "GatherBlockQuantized: " + ", ".join(tables)} if tables else {}),
        },
        "kept_float32": "norms, biases, RoPE, Conv1D, RG-LRU gates, activations, logits",
        "weight_bytes": {"before": before, "after": _initializer_bytes(graph)},
        **(calibrated.record if done else {}),
    }
    return model, record


def round_to_nearest(columns: Callable[[int, int], np.ndarray], n: int, width: Width) -> Packed:
    """ONNX Runtime's round-to-nearest kernel (`qbits_block_quant`) on a [K, N] weight given by its column
    slices (`columns(lo, hi)`: [K, hi - lo]), a slice at a time: columns are quantized independently (blocks run
    along K), so the result is the kernel's on the whole weight, without a contiguous copy of all of it, and
    without the weight resident at once (each slice's pages are dropped once it is packed: memory.py)."""
    config = _ort_quantizer().DefaultWeightOnlyQuantConfig(
        block_size=width.block_size, is_symmetric=width.symmetric, bits=width.bits
    )
    kernel = _ort_quantizer().DefaultWeightOnlyQuantizer(config)
    k = columns(0, 1).shape[0]
    step = max(1, CHUNK_BYTES // (4 * k))
    parts = []
    for lo in range(0, n, step):
        part = columns(lo, min(lo + step, n))
        parts.append(kernel.qbits_block_quant(np.ascontiguousarray(part, np.float32)))
        memory.drop_resident([part])  # a slice of the checkpoint's mapping, read: out of the resident set again
    data, scales, zero_points = (np.concatenate(p) if len(p) > 1 else p[0] for p in zip(*parts, strict=True))
    return Packed(data, scales, None if width.symmetric else zero_points)


def _calibrated(node: ir.Node, calibrated: gptq.Calibrated) -> tuple[Width, Packed]:
    """GPTQ's codes for this MatMul. The graph's weight must be the reference weight the codes were computed from
    (B = W^T, checked exactly): a projection named after another module would otherwise be quantized with the
    wrong weights, silently."""
    weight = calibrated.weights[node.name]
    if not np.array_equal(node.inputs[1].const_value.numpy(), calibrated.originals[node.name].detach().numpy().T):
        raise RuntimeError(f"{node.name}: the graph's weight is not the calibrated module's")
    data, scales, zero_points = weight.pack()
    return Width(weight.bits, weight.block_size, symmetric=False), Packed(data, scales, zero_points)


def _to_matmul_nbits(graph: ir.Graph, node: ir.Node, packed: Packed, width: Width, accuracy_level: int) -> None:
    """MatMul(x, B) (or the tied Gemm(x, E, transB=1), B = E^T) -> MatMulNBits(x, B_Q, B_scales[, B_zero_points]),
    named as ONNX Runtime's quantizer names them; B leaves the graph (once unused) and its pages the resident set."""
    b = node.inputs[1]
    k = b.const_value.shape[0] if node.op_type == "MatMul" else b.const_value.shape[1]  # Gemm: B = E^T
    nbits = _matmul_nbits(graph, node.inputs[0], b.name, k, packed, width, accuracy_level, f"{node.name}_Q{width.bits}")
    convenience.replace_nodes_and_values(graph, node, [node], [nbits], node.outputs, nbits.outputs)
    _remove_initializer(graph, b)


def _matmul_nbits(graph: ir.Graph, x: ir.Value, name: str, k: int, packed: Packed, width: Width, accuracy_level: int,
                  node_name: str) -> ir.Node:  # fmt: skip
    """MatMulNBits(x, {name}_Q{bits}, {name}_scales[, {name}_zero_points]), its initializers registered."""
    attrs: dict[str, Any] = {"K": k, "N": packed.data.shape[0], "bits": width.bits, "block_size": width.block_size}
    if accuracy_level:  # optional: 0 is the default, and most execution providers do not know the attribute
        attrs["accuracy_level"] = accuracy_level
    inputs = [x, *_packed_initializers(graph, name, packed, width)]
    return ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=node_name)


def _parts_record(parts: list[Part] | None, spec: QuantSpec, selection: str) -> dict[str, str]:
    """The manifest's `embedding_parts` and `embedding_selection`, for a tied embedding stored in parts."""
    if not parts or spec.embedding_tail is None:
        return {}
    described = vocab_parts.describe(parts, spec.embedding.name, spec.embedding_tail.name)
    return {"embedding_parts": described, "embedding_selection": selection}


def _by_id(head: ir.Node) -> list[Part] | None:
    """Without the tokenizer's word: the first half of the ids wide, the rest not."""
    vocab = head.inputs[1].const_value.shape[0]
    return [Part(0, vocab // 2, True), Part(vocab // 2, vocab, False)] if vocab >= 2 else None


def _quantize_tied_embedding(graph: ir.Graph, head: ir.Node, spec: QuantSpec, parts: list[Part] | None) -> bool:
    """Gemm(x, E, transB=1) -> MatMulNBits(x, Q(E)) and Gather(E, ids) -> GatherBlockQuantized(Q(E), ids), one
    copy of the packed bytes for both. With `parts` (and an `embedding_tail`), E is stored in parts, runs of ids,
    each at its width: the head is Concat(MatMulNBits(x, part) for each part) along the vocabulary, its logits in
    id order, and the lookup reads each row from its part (`_split_lookup`). Returns whether it was quantized: E
    stays float32 when it serves anything but that head and lookups."""
    table = head.inputs[1]
    lookups = [user for user, _ in table.uses() if user is not head]
    if not all(_is_lookup(user, table) for user in lookups):
        return False  # E serves something else too: leave it float32 rather than guess
    e = table.const_value.numpy()  # [vocab, hidden]: B = E^T is [K = hidden, N = vocab]
    vocab, hidden = e.shape
    if not parts or spec.embedding_tail is None:
        packed = round_to_nearest(lambda lo, hi: e[lo:hi].T, vocab, spec.embedding)
        _to_matmul_nbits(graph, head, packed, spec.embedding, spec.accuracy_level)
        data = graph.initializers[f"{table.name}_Q{spec.embedding.bits}"]
        for gather in lookups:
            _to_gather_block_quantized(graph, gather, data, packed, spec.embedding, table.name, hidden)
        _remove_initializer(graph, table)
        return True
    stored = []
    for start, stop, wide in parts:
        width = spec.embedding if wide else spec.embedding_tail
        packed = round_to_nearest(lambda lo, hi, start=start: e[start + lo : start + hi].T, stop - start, width)
        name = f"{table.name}_rows{start}"
        node = _matmul_nbits(graph, head.inputs[0], name, hidden, packed, width, spec.accuracy_level,
                             f"{head.name}_rows{start}_Q{width.bits}")  # fmt: skip
        stored.append(_Part(name, start, width, packed, node))
    concat = ir.node("Concat", [p.head.outputs[0] for p in stored], {"axis": -1}, name=f"{head.name}_concat")
    new = [p.head for p in stored] + [concat]
    convenience.replace_nodes_and_values(graph, head, [head], new, head.outputs, concat.outputs)
    for gather in lookups:
        _split_lookup(graph, gather, stored, hidden)
    _remove_initializer(graph, table)
    return True


class _Part(NamedTuple):
    """One part of rows of a tied embedding stored in parts: its initializers' name prefix, first id, width,
    packed bytes, and the head's MatMulNBits over it."""

    name: str
    start: int
    width: Width
    packed: Packed
    head: ir.Node


def _split_lookup(graph: ir.Graph, gather: ir.Node, parts: list[_Part], hidden: int) -> None:
    """Gather(E, ids) of a table stored in parts, runs of ids from each part's `start` on: each part looked up at
    Clip(ids - start, 0, its rows - 1) (a GatherBlockQuantized on its packed bytes, `_lookup_nodes`), and each id's
    row taken from the last part whose start it reaches: Where(ids >= start, this part's, the parts' before)."""
    ids = gather.inputs[1]
    zero = _initializer(graph, f"{gather.name}_zero", np.array(0, np.int64))
    axes = _initializer(graph, f"{gather.name}_hidden_axis", np.array([-1], np.int64))
    nodes: list[ir.Node] = []
    row: ir.Value | None = None
    for part in parts:
        start = _initializer(graph, f"{gather.name}_from{part.start}", np.array(part.start, np.int64))
        last = _initializer(graph, f"{gather.name}_last{part.start}", np.array(part.packed.data.shape[0] - 1, np.int64))
        tape = Tape()
        index = tape.op("Clip", [tape.op("Sub", [ids, start]), zero, last])
        nodes += tape.nodes
        part_nodes, looked = _lookup_nodes(graph, gather, part.head.inputs[1], index, part.packed, part.width,
                                           part.name, hidden)  # fmt: skip
        nodes += part_nodes
        if row is not None:
            tape = Tape()
            row = tape.op("Where", [tape.op("Unsqueeze", [tape.op("GreaterOrEqual", [ids, start]), axes]), looked, row])
            nodes += tape.nodes
        else:
            row = looked
    convenience.replace_nodes_and_values(graph, gather, [gather], nodes, gather.outputs, nodes[-1].outputs)


def _quantize_lookup_tables(graph: ir.Graph, width: Width) -> list[str]:
    """Every other float32 table looked up by the token ids and by nothing else (Gemma 4's per-layer embeddings:
    262144 x 8960 on E2B, half its weights) -> GatherBlockQuantized at the embedding's width. Returns their names.
    Tables looked up by anything but `input_ids` (RoPE's, by position) are not embeddings: they stay float32."""
    names = []
    for value in list(graph.initializers.values()):
        users = [user for user, _ in value.uses()]
        tensor = value.const_value
        if not users or tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            continue
        if not all(_is_lookup(user, value) and _is_token_ids(user.inputs[1]) for user in users):
            continue
        table = tensor.numpy()
        packed = round_to_nearest(lambda lo, hi, table=table: table[lo:hi].T, table.shape[0], width)
        vocab, k_blocks, blob = packed.data.shape  # stored as the rows the lookup reads: no MatMul reads them
        rows = Packed(packed.data.reshape(vocab, k_blocks * blob), packed.scales, packed.zero_points)
        rows_value, *scales_and_zeros = _packed_initializers(graph, value.name, rows, width)
        for gather in users:
            nodes, out = _lookup(graph, gather, rows_value, gather.inputs[1], scales_and_zeros, width, value.name,
                                 table.shape[1])  # fmt: skip
            convenience.replace_nodes_and_values(graph, gather, [gather], nodes, gather.outputs, [out])
        _remove_initializer(graph, value)
        names.append(value.name)
    return names


def _to_gather_block_quantized(
    graph: ir.Graph, gather: ir.Node, data: ir.Value, packed: Packed, width: Width, name: str, hidden: int
) -> None:
    """A lookup of the tied table: the packed [vocab, k_blocks, blob] bytes of the LM head seen as
    [vocab, k_blocks * blob] rows (a Reshape: no copy on disk), and its scales and zero points."""
    nodes, out = _lookup_nodes(graph, gather, data, gather.inputs[1], packed, width, name, hidden)
    convenience.replace_nodes_and_values(graph, gather, [gather], nodes, gather.outputs, [out])


def _lookup_nodes(graph: ir.Graph, gather: ir.Node, data: ir.Value, ids: ir.Value, packed: Packed, width: Width,
                  name: str, hidden: int) -> tuple[list[ir.Node], ir.Value]:  # fmt: skip
    """GatherBlockQuantized(Reshape(data, [rows, k_blocks * blob]), ids, {name}_scales[, {name}_zero_points]): the
    head's packed rows, looked up (not yet in the graph: the nodes, and the looked-up rows [..., hidden])."""
    vocab, k_blocks, blob = packed.data.shape
    shape = _initializer(graph, f"{name}_rows_shape", np.array([vocab, k_blocks * blob], np.int64), reuse=True)
    rows = ir.node("Reshape", [data, shape], name=f"{gather.name}_{name}_rows")
    rows.outputs[0].name = f"{gather.outputs[0].name}_{name}_rows"
    scales_and_zeros = [graph.initializers[f"{name}_scales"]]
    if packed.zero_points is not None:
        scales_and_zeros.append(graph.initializers[f"{name}_zero_points"])
    nodes, out = _lookup(graph, gather, rows.outputs[0], ids, scales_and_zeros, width, name, hidden)
    return [rows, *nodes], out


def _lookup(graph: ir.Graph, gather: ir.Node, rows: ir.Value, ids: ir.Value, scales_and_zeros: list[ir.Value],
            width: Width, name: str, hidden: int) -> tuple[list[ir.Node], ir.Value]:  # fmt: skip
    """GatherBlockQuantized(rows, ids, scales[, zero points]) for `gather`; rows are whole blocks, so a hidden size
    that is not a multiple of the block is sliced back. Returns the nodes (not yet in the graph) and the rows."""
    attrs = {"bits": width.bits, "block_size": width.block_size, "gather_axis": 0, "quantize_axis": 1}
    lookup = ir.node("GatherBlockQuantized", [rows, ids, *scales_and_zeros], attrs,
                     domain=MS_DOMAIN, name=f"{gather.name}_{name}_nbits")  # fmt: skip
    new = [lookup]
    blocks = -(-hidden // width.block_size)
    if blocks * width.block_size != hidden:
        bounds = [_initializer(graph, f"{name}_unpad_{b}", np.array(v, np.int64), reuse=True)
                  for b, v in (("starts", [0]), ("ends", [hidden]), ("axes", [-1]))]  # fmt: skip
        lookup.outputs[0].name = f"{gather.outputs[0].name}_{name}_padded"
        new.append(ir.node("Slice", [lookup.outputs[0], *bounds], name=f"{gather.name}_{name}_unpad"))
    return new, new[-1].outputs[0]


def _packed_initializers(graph: ir.Graph, name: str, packed: Packed, width: Width) -> list[ir.Value]:
    """`{name}_Q{bits}`, `{name}_scales` and (asymmetric) `{name}_zero_points`, as ONNX Runtime names them."""
    values = [_initializer(graph, f"{name}_Q{width.bits}", packed.data),
              _initializer(graph, f"{name}_scales", packed.scales)]  # fmt: skip
    if packed.zero_points is not None:
        values.append(_initializer(graph, f"{name}_zero_points", packed.zero_points))
    return values


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, reuse: bool = False) -> ir.Value:
    if reuse and name in graph.initializers:
        return graph.initializers[name]
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _remove_initializer(graph: ir.Graph, value: ir.Value) -> None:
    """Once unused: out of the graph, and its pages (a view of the checkpoint's mapping) out of the resident set."""
    if value.uses() or value.name not in graph.initializers:
        return
    memory.drop_resident([getattr(value.const_value, "raw", None)])
    graph.initializers.pop(value.name)


def _is_lookup(node: ir.Node, table: ir.Value) -> bool:
    return (node.op_type == "Gather" and node.domain == "" and node.inputs[0] is table
            and node.attributes.get_int("axis", 0) == 0)  # fmt: skip


def _is_token_ids(value: ir.Value | None) -> bool:
    return value is not None and value.is_graph_input() and value.name == "input_ids"


def _constant_matrix(value: ir.Value | None) -> bool:
    """A 2-D float32 constant used by this one node (ONNX Runtime's quantizer's scope, less its N-D cases)."""
    tensor = value.const_value if value is not None else None
    return (tensor is not None and value.is_initializer() and tensor.dtype == ir.DataType.FLOAT
            and len(tensor.shape) == 2 and len(value.uses()) == 1)  # fmt: skip


def _initializer_bytes(graph: ir.Graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)


def _ort_quantizer() -> ModuleType:
    """onnxruntime's quantizer module runs `logging.basicConfig(level=INFO)` when imported, and then logs every
    node: import it leaving the process's logging as it was, and keep its own logger to warnings."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.setLevel(level)
    root.handlers[:] = handlers
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer
