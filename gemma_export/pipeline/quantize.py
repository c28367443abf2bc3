"""Quantize stage (optional): weight-only int8 / int4 with ONNX Runtime's `MatMulNBits`, on the optimized
portable graph (before `--target ort-cpu`'s lowering, which leaves MatMulNBits as it finds it).

What is quantized, and what is not:

* every MatMul with a constant weight (q/k/v/o, gate/up/down; RecurrentGemma's linear_x/y/out and MLP), at the
  width its role gets (`QuantSpec`): with `--quant int4`, from the codes, scales and zero points GPTQ chose in
  the calibrate stage (calibrate.py, gptq.py; `write_calibrated`); otherwise by onnxruntime's own
  `MatMulNBitsQuantizer` (round-to-nearest per block of `block_size` input features, one float32 scale and,
  when asymmetric, one zero point per block; one pass of the quantizer per width, the other MatMuls excluded);
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
for the same inputs). Round-to-nearest and GPTQ are deterministic.
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

from gemma_export.pipeline import gptq, graph_patterns, memory

QUANTS = ("none", "int8", "int4", "int4-rtn", "int4-plain")
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
    trace stage names their MatMul nodes); `wider` lists the roles (`down_proj`) stored at `wide` instead."""

    projections: Width
    embedding: Width  # the tied embedding: the LM head and the lookup, one copy
    accuracy_level: int  # MatMulNBits: 0 = float32 activations, 4 = int8 activations (the fast CPU path)
    wider: tuple[str, ...] = ()
    wide: Width | None = None
    gptq: GptqSettings | None = None  # None: round-to-nearest (ONNX Runtime's quantizer) everywhere

    def width_of(self, node_name: str) -> Width:
        role = node_name.rsplit(".", 1)[-1]
        return self.wide if self.wide is not None and role in self.wider else self.projections

    @property
    def bits(self) -> int:  # the projections' (the manifest's summary; `widths` has the rest)
        return self.projections.bits

    @property
    def block_size(self) -> int:
        return self.projections.block_size

    def with_block(self, block_size: int | None) -> QuantSpec:
        wide = self.wide.with_block(block_size) if self.wide else None
        return QuantSpec(self.projections.with_block(block_size), self.embedding.with_block(block_size),
                         self.accuracy_level, self.wider, wide, self.gptq)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "symmetric": self.projections.symmetric,
            "accuracy_level": self.accuracy_level,
            "widths": {
                "projections": asdict(self.projections),
                **({role: asdict(self.wide) for role in self.wider} if self.wide else {}),
                "embedding": asdict(self.embedding),
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
# checkpoints"), measured as perplexity on GPL-2's text, not the text the tests hold out (fp32 13.58): int4
# everywhere 19.22 (+42%); the embedding alone at int4 costs +7%, at int8 (block 128: 1.04 bytes a weight)
# nothing measurable (13.57). Each projection role alone at int4: up +8.5%, down +6.9%, gate +4.9%, v +2.7%,
# q +2.1%, k +1.9%, o 0%. Within the bytes of llama.cpp's Q4_K_M file of the same model (241 MiB), the int8
# embedding leaves room for ~36M of the 100M projection weights at int8: up, k and v (ROLES_KEPT_AT_INT8).
# Rounded to nearest (`int4-rtn`) that mix is +15%; GPTQ on every projection (`int4`, the default) brings it
# within 1% (README "Weight quantization": calibrated on a text shipped with the package, or --calibration).
# `int4-plain` is int4 everywhere, rounded to nearest (the smallest and fastest).
ROLES_KEPT_AT_INT8 = ("up_proj", "k_proj", "v_proj")
_MIX = {"projections": INT4_B32, "embedding": INT8_B128, "wider": ROLES_KEPT_AT_INT8, "wide": INT8_B128}
DEFAULTS: dict[str, QuantSpec] = {
    "int8": QuantSpec(projections=INT8_B32, embedding=INT8_B32, accuracy_level=4),
    "int4": QuantSpec(**_MIX, accuracy_level=4, gptq=GptqSettings()),
    "int4-rtn": QuantSpec(**_MIX, accuracy_level=4),
    "int4-plain": QuantSpec(projections=INT4_B32, embedding=INT4_B32, accuracy_level=4),
}


def spec_for(quant: str, block_size: int | None = None) -> QuantSpec:
    return DEFAULTS[quant].with_block(block_size)


def is_valid_block_size(block_size: int) -> bool:
    return block_size >= 16 and block_size & (block_size - 1) == 0


def quantize(
    model: ir.Model, spec: QuantSpec, calibrated: gptq.Calibrated | None = None
) -> tuple[ir.Model, dict[str, Any]]:
    """The model with its weights quantized, and the manifest's `quantization` record. The MatMuls named in
    `calibrated` (the calibrate stage's GPTQ) take its weights; the others are rounded to nearest here."""
    before = _initializer_bytes(model.graph)
    head = _tied_head_output(model.graph)  # found here, on the IR; the ORT quantizer leaves the Gemm as it is
    ir.external_data.load_to_model(model)  # the ORT quantizer reads weights from the proto, not from files
    proto = ir.to_proto(model)
    # the proto holds a copy now: the checkpoint's pages it was read from need not stay resident (memory.py)
    memory.drop_resident(getattr(v.const_value, "raw", None) for v in model.graph.initializers.values())
    inits = {t.name for t in proto.graph.initializer}
    matmuls = [n.name for n in proto.graph.node
               if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in inits]  # fmt: skip
    done = write_calibrated(proto, calibrated, spec.accuracy_level) if calibrated else set()
    rounded = [name for name in matmuls if name not in done]
    widths = sorted({spec.width_of(name) for name in rounded}, key=lambda w: (w.bits, w.block_size, w.symmetric))
    for width in widths:  # one pass of onnxruntime's quantizer per width, every other MatMul left alone
        others = [name for name in matmuls if name in done or spec.width_of(name) != width]
        quantizer = _ort_quantizer().MatMulNBitsQuantizer(
            proto,
            bits=width.bits,
            block_size=width.block_size,
            is_symmetric=width.symmetric,
            accuracy_level=spec.accuracy_level,
            nodes_to_exclude=others,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        proto = quantizer.model.model
    quantized_matmuls = sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits")
    matmuls_total = sum(1 for n in proto.graph.node if n.op_type in ("MatMul", "MatMulNBits"))
    tied = head is not None and quantize_tied_embedding(proto, head, spec.embedding, spec.accuracy_level)
    out = ir.from_proto(proto)
    after = _initializer_bytes(out.graph)
    record = {
        "method": GPTQ_METHOD if done else RTN_METHOD,
        **spec.to_json(),
        "quantized": {
            "matmul": quantized_matmuls,
            **({"matmul_gptq": len(done)} if calibrated else {}),
            "matmul_kept_float": matmuls_total - quantized_matmuls,  # a MatMul whose weight is not a constant
            "lm_head": "MatMulNBits on the tied embedding" if tied else "float32 (no tied Gemm head found)",
            "embedding": "GatherBlockQuantized on the LM head's quantized weight" if tied else "float32",
        },
        "kept_float32": "norms, biases, RoPE, Conv1D, RG-LRU gates, activations, logits",
        "weight_bytes": {"before": before, "after": after},
        **(calibrated.record if done else {}),
    }
    return out, record


def write_calibrated(proto: onnx.ModelProto, calibrated: gptq.Calibrated, accuracy_level: int) -> set[str]:
    """Each MatMul named in `calibrated` -> MatMulNBits on its weights, laid out and named as ONNX Runtime's
    quantizer does (`{B}_Q4`, `{B}_scales`, `{B}_zero_points`). Returns the names rewritten.

    The graph's weight must be the reference weight the codes were computed from (B = W^T, checked exactly):
    a projection named after another module would otherwise be quantized with the wrong weights, silently."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    done: set[str] = set()
    rewritten, dropped, added = [], set(), []
    for node in graph.node:
        weight = calibrated.weights.get(node.name)
        b_name = node.input[1] if len(node.input) == 2 else ""
        if weight is None or node.op_type != "MatMul" or b_name not in inits or users[b_name] != 1:
            rewritten.append(node)
            continue
        b = numpy_helper.to_array(inits[b_name])
        if not np.array_equal(b, calibrated.originals[node.name].detach().numpy().T):
            raise RuntimeError(f"{node.name}: the graph's weight is not the calibrated module's")
        packed, scales, zero_points = weight.pack()
        names = [f"{b_name}_Q{weight.bits}", f"{b_name}_scales", f"{b_name}_zero_points"]
        added += [numpy_helper.from_array(a, n) for a, n in zip((packed, scales, zero_points), names, strict=True)]
        k, n = b.shape
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": weight.bits, "block_size": weight.block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        rewritten.append(helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                          f"{node.name}_Q{weight.bits}", domain=MS_DOMAIN, **attrs))  # fmt: skip
        dropped.add(b_name)
        done.add(node.name)
    graph.ClearField("node")
    graph.node.extend(rewritten)
    kept = [t for t in graph.initializer if t.name not in dropped]
    graph.ClearField("initializer")
    graph.initializer.extend([*kept, *added])
    return done


def quantize_tied_embedding(proto: onnx.ModelProto, head_output: str, spec: Width, accuracy_level: int) -> bool:
    """Gemm(x, E, transB=1) -> MatMulNBits(x, Q(E)) and Gather(E, ids) -> GatherBlockQuantized(Q(E), ids).

    `head_output` names the output of the tied Gemm (`_tied_head_output`). Returns whether it was quantized:
    E stays float32 when it serves anything but that head and lookups.
    """
    ort_quantizer = _ort_quantizer()
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)  # held, so that id() names each node until the graph is rewritten
    heads = [n for n in nodes if list(n.output) == [head_output] and n.op_type == "Gemm"]
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
        block_size=spec.block_size, is_symmetric=spec.symmetric, accuracy_level=accuracy_level, bits=spec.bits
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
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
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


def _tied_head_output(graph: ir.Graph) -> str | None:
    """The output name of the graph's tied head (graph_patterns.tied_gemm), when its E is a float32 initializer:
    the table quantize_tied_embedding packs. The name stays the same in the proto, which has no node handles."""
    head = graph_patterns.tied_gemm(graph)
    if head is None:
        return None
    table = head.inputs[1]
    return head.outputs[0].name if table.is_initializer() and table.dtype == ir.DataType.FLOAT else None


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
