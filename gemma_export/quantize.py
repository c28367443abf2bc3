"""Quantize stage (optional): weight-only int8 / int4 with ONNX Runtime's `MatMulNBits`, on the optimized
portable graph (before `--target ort-cpu`'s lowering, which leaves MatMulNBits as it finds it).

What is quantized, and what is not:

* every MatMul with a constant weight (q/k/v/o, gate/up/down; RecurrentGemma's linear_x/y/out and MLP): by
  onnxruntime's own `MatMulNBitsQuantizer` (round-to-nearest per block of `block_size` input features, one
  float32 scale and, when asymmetric, one zero point per block);
* the tied LM head `Gemm(x, embedding, transB=1)`: the ORT quantizer only rewrites MatMul and would leave the
  largest tensor (262144 x 640 on Gemma-3-270M, 63% of its weights) in float32. Its packed layout is
  [N, k_blocks, blob] of B = embedding^T, i.e. the embedding's own rows cut into blocks along hidden: the
  same kernel (`qbits_block_quant`) quantizes it with no transposed copy kept, and one MatMulNBits reads it;
* the embedding lookup `Gather(embedding, ids)`: a `GatherBlockQuantized` that reads the *same* packed
  bytes, scales and zero points (a Reshape of the LM head's weight), as onnxruntime-genai does for tied
  models. Keeping a float32 copy for the lookup would cost vocab x hidden x 4 bytes (671 MB on 270M, more
  than all the quantized layers together); the price is the lookup's quantization error, which the
  agreement gate measures like every other;
* kept in float32: norms, biases, RoPE tables, RecurrentGemma's Conv1D and block-diagonal RG-LRU gates
  (Einsum, not MatMul), and every activation: MatMulNBits computes in float32 (or, with accuracy_level 4,
  int8 activations per block with float32 accumulation), so residuals, norms and logits stay float32.

The `ai.gemma` nodes (Attention, RGLRU) and their function bodies are not MatMul nodes and are left alone.
The ORT quantizer works on a ModelProto: the IR model is serialised in memory, quantized and read back, so
that the package stage writes it as it writes every model (one external-data file, one writer, same bytes
for the same inputs). Round-to-nearest is deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from gemma_export import memory

QUANTS = ("none", "int8", "int4")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block_size: int  # input features per scale; a power of two >= 16 (MatMulNBits' constraint)
    symmetric: bool  # False: a zero point per block (1/64 more bytes at int4, block 32)
    accuracy_level: int  # MatMulNBits: 0 = float32 activations, 4 = int8 activations (the fast CPU path)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Defaults per --quant. Block 32 and int8 activations are what onnxruntime-genai's CPU int4 builds use; without
# int8 activations, 8-bit weights decoded >20x slower (Gemma-3-270M shape, 2 threads). Asymmetric: lower KL to
# the fp32 reference than symmetric on most models measured (int4 prefill, tiny gemma3_text 0.057 vs 0.062,
# recurrent_gemma 0.036 vs 0.047), at no measurable decode cost; blocks of 64 or 128 decoded no faster
# (within the noise) and block 128 gave higher KL (0.073 vs 0.057).
DEFAULTS: dict[str, QuantSpec] = {
    "int8": QuantSpec(bits=8, block_size=32, symmetric=False, accuracy_level=4),
    "int4": QuantSpec(bits=4, block_size=32, symmetric=False, accuracy_level=4),
}


def spec_for(quant: str, block_size: int | None = None) -> QuantSpec:
    base = DEFAULTS[quant]
    return base if block_size is None else QuantSpec(base.bits, block_size, base.symmetric, base.accuracy_level)


def is_valid_block_size(block_size: int) -> bool:
    return block_size >= 16 and block_size & (block_size - 1) == 0


def quantize(model: ir.Model, spec: QuantSpec) -> tuple[ir.Model, dict[str, Any]]:
    """The model with its weights quantized, and the manifest's `quantization` record."""
    before = _initializer_bytes(model.graph)
    ir.external_data.load_to_model(model)  # the ORT quantizer reads weights from the proto, not from files
    proto = ir.to_proto(model)
    # the proto holds a copy now: the checkpoint's pages it was read from need not stay resident (memory.py)
    memory.drop_resident(getattr(v.const_value, "raw", None) for v in model.graph.initializers.values())
    matmuls = sum(1 for n in proto.graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx"))
    quantizer = _ort_quantizer().MatMulNBitsQuantizer(
        proto,
        bits=spec.bits,
        block_size=spec.block_size,
        is_symmetric=spec.symmetric,
        accuracy_level=spec.accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    proto = quantizer.model.model
    quantized_matmuls = sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits")
    tied = quantize_tied_embedding(proto, spec)
    out = ir.from_proto(proto)
    after = _initializer_bytes(out.graph)
    record = {
        "method": "onnxruntime MatMulNBits, round-to-nearest per block (matmul_nbits_quantizer)",
        **spec.to_json(),
        "quantized": {
            "matmul": quantized_matmuls,
            "matmul_kept_float": matmuls - quantized_matmuls,  # a MatMul whose weight is not a constant
            "lm_head": "MatMulNBits on the tied embedding" if tied else "float32 (no tied Gemm head found)",
            "embedding": "GatherBlockQuantized on the LM head's quantized weight" if tied else "float32",
        },
        "kept_float32": "norms, biases, RoPE, Conv1D, RG-LRU gates, activations, logits",
        "weight_bytes": {"before": before, "after": after},
    }
    return out, record


def quantize_tied_embedding(proto: onnx.ModelProto, spec: QuantSpec) -> bool:
    """Gemm(x, E, transB=1) -> MatMulNBits(x, Q(E)) and Gather(E, ids) -> GatherBlockQuantized(Q(E), ids).

    Returns whether a tied head was found. E stays float32 when the head is not the plain Gemm that
    `models.gemma.tied_lm_head` traces to (no bias, alpha 1, E an initializer).
    """
    ort_quantizer = _ort_quantizer()
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)  # held, so that id() names each node until the graph is rewritten
    heads = [n for n in nodes if _is_tied_head(n, inits)]
    if len(heads) != 1:
        return False
    head = heads[0]
    name = head.input[1]
    users = [n for n in nodes if name in n.input]
    lookups = [n for n in users if n.op_type == "Gather" and n.domain == "" and n.input[0] == name]
    expected = {id(head), *map(id, lookups)}
    if any(id(n) not in expected for n in users) or any(_attr(n, "axis", 0) != 0 for n in lookups):
        return False  # E serves something else too: leave it float32 rather than guess
    weight = numpy_helper.to_array(inits[name])  # [vocab, hidden]
    vocab, hidden = weight.shape
    config = ort_quantizer.DefaultWeightOnlyQuantConfig(
        block_size=spec.block_size, is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level, bits=spec.bits
    )
    # B = E^T is [K=hidden, N=vocab]; the kernel wants it C-contiguous (a transient copy, freed on return).
    kernel = ort_quantizer.DefaultWeightOnlyQuantizer(config)
    packed, scales, zero_points = kernel.qbits_block_quant(np.ascontiguousarray(weight.T))
    del weight
    k_blocks = packed.shape[1]
    q_name, s_name, z_name = f"{name}_Q{spec.bits}", f"{name}_scales", f"{name}_zero_points"
    new_inits = [numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)]
    quant_inputs = [q_name, s_name]
    if not spec.symmetric:
        new_inits.append(numpy_helper.from_array(zero_points, z_name))
        quant_inputs.append(z_name)

    attrs: dict[str, Any] = {"K": hidden, "N": vocab, "bits": spec.bits, "block_size": spec.block_size}
    if spec.accuracy_level:
        attrs["accuracy_level"] = spec.accuracy_level
    matmul = helper.make_node("MatMulNBits", [head.input[0], *quant_inputs], list(head.output), head.name + "_nbits",
                              domain=MS_DOMAIN, **attrs)  # fmt: skip
    replacements = {id(head): [matmul]}
    # The lookup sees the packed [vocab, k_blocks, blob] bytes as [vocab, k_blocks * blob] rows (no copy on
    # disk); rows are whole blocks, so a hidden size that is not a multiple of the block is sliced back.
    flat_shape = f"{name}_rows_shape"
    new_inits.append(numpy_helper.from_array(np.array([vocab, k_blocks * packed.shape[2]], np.int64), flat_shape))
    padded = k_blocks * spec.block_size != hidden
    if padded:
        bounds = [f"{name}_unpad_{b}" for b in ("starts", "ends", "axes")]
        values = ([0], [hidden], [-1])
        new_inits += [numpy_helper.from_array(np.array(v, np.int64), b) for b, v in zip(bounds, values, strict=True)]
    for gather in lookups:
        out = gather.output[0]
        lookup = helper.make_node(
            "GatherBlockQuantized",
            [f"{out}_rows", gather.input[1], s_name, *([] if spec.symmetric else [z_name])],
            [f"{out}_padded" if padded else out],
            gather.name + "_nbits",
            domain=MS_DOMAIN,
            bits=spec.bits,
            block_size=spec.block_size,
            gather_axis=0,
            quantize_axis=1,
        )
        rows = helper.make_node("Reshape", [q_name, flat_shape], [f"{out}_rows"], f"{gather.name}_rows")
        replacements[id(gather)] = [rows, lookup]
        if padded:
            unpad = helper.make_node("Slice", [f"{out}_padded", *bounds], [out], f"{gather.name}_unpad")
            replacements[id(gather)].append(unpad)

    rewritten = [m for n in nodes for m in replacements.get(id(n), [n])]
    graph.ClearField("node")
    graph.node.extend(rewritten)
    kept = [t for t in graph.initializer if t.name != name]
    graph.ClearField("initializer")
    graph.initializer.extend([*kept, *new_inits])
    return True


def _is_tied_head(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    return (
        node.op_type == "Gemm"
        and node.domain == ""
        and len(node.input) == 2
        and node.input[1] in inits
        and len(inits[node.input[1]].dims) == 2
        and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
        and _attr(node, "transA", 0) == 0
        and _attr(node, "transB", 0) == 1
        and _attr(node, "alpha", 1.0) == 1.0
    )


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    attr = next((a for a in node.attribute if a.name == name), None)
    return default if attr is None else helper.get_attribute_value(attr)


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
