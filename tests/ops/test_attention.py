"""`ai.gemma::Attention` (graphs/attention.md): the conformance vectors against every face of the op.

- the PyTorch reference and the ONNX function body (run by ONNX Runtime) reproduce every vector;
- the exporter emits one `ai.gemma::Attention` node that, with its function attached, runs at any length;
- a property test over random shapes and attributes, the function against the reference;
- the vectors on disk are exactly what graphs/attention/make_vectors.py writes now (image blocks in both
  modes of the attribute `blocks` among them);
- the lowerings graphs/attention.md documents (com.microsoft.GroupQueryAttention, opset-23 Attention) hold.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from gemma_export.ops import attention as attention_op
from gemma_export.ops.visibility import visible as visibility  # [batch, seq, total], graphs/attention.md
from gemma_export.pipeline.optimize import attach_functions
from gemma_export.pipeline.trace import OPSET
from tests.support import ROOT
from tests.support import op_harness as harness
from tests.support.attention_vectors import ATTRIBUTES, INPUTS, VECTOR_DIR, VECTORS, load_vector, row_error

REFERENCE_TOL = 1e-6
ONNX_TOL = 1e-5


def run_reference(arrays: dict[str, np.ndarray], attrs: dict) -> np.ndarray:
    args = [torch.from_numpy(arrays[n]) for n in INPUTS]
    with torch.no_grad():
        out = attention_op.attention_reference(
            *args, attrs["scale"], attrs["softcap"], attrs["window"], bool(attrs["causal"]), attrs.get("blocks", 0)
        )
    return out.numpy()


# --- one-node models ---------------------------------------------------------------------------------------


def one_node_model(attrs: dict, elem: int = TensorProto.FLOAT, mask_elem: int = TensorProto.INT64) -> onnx.ModelProto:
    """`ai.gemma::Attention` over dynamic-shape inputs, its function body attached, checked."""
    node = helper.make_node("Attention", list(INPUTS), ["output"], domain=attention_op.DOMAIN, **attrs)
    dims = {"query": ["B", "H", "S", "D"], "key": ["B", "KV", "T", "D"], "value": ["B", "KV", "T", "D"]}
    inputs = [helper.make_tensor_value_info(n, elem, dims[n]) for n in INPUTS[:3]]
    inputs.append(helper.make_tensor_value_info("attention_mask", mask_elem, ["B", "T"]))
    output = helper.make_tensor_value_info("output", elem, ["B", "H", "S", "D"])
    return harness.one_node_model(node, inputs, [output], attention_op.function_protos(OPSET))


@functools.lru_cache(maxsize=64)
def function_session(attr_items: tuple, mask_elem: int = TensorProto.INT64) -> ort.InferenceSession:
    return harness.session(one_node_model(dict(attr_items), mask_elem=mask_elem))


def run_function(arrays: dict[str, np.ndarray], attrs: dict, mask_elem: int = TensorProto.INT64) -> np.ndarray:
    sess = function_session(tuple(sorted(attrs.items())), mask_elem)
    return sess.run(None, {n: arrays[n] for n in INPUTS})[0]


# --- (a) the vectors ---------------------------------------------------------------------------------------


def test_vectors_cover_the_spec() -> None:
    """The cases graphs/attention/README.md promises are all there."""
    cases = [load_vector(p) for p in VECTORS]
    assert len(cases) >= 10

    def some(pred) -> bool:
        return any(pred(c["attributes"], c["arrays"], c["excluded"]) for c in cases)

    assert some(lambda a, x, e: a["kv_num_heads"] == x["query"].shape[1])  # MHA
    assert some(lambda a, x, e: 1 < a["kv_num_heads"] < x["query"].shape[1])  # GQA
    assert some(lambda a, x, e: a["kv_num_heads"] == 1 < x["query"].shape[1])  # MQA
    assert some(lambda a, x, e: a["causal"] and 0 < a["window"] < x["key"].shape[2])
    assert some(lambda a, x, e: a["causal"] and x["query"].shape[2] < x["key"].shape[2])  # past
    assert some(lambda a, x, e: x["query"].shape[2] == 1)  # decode
    assert some(lambda a, x, e: not a["causal"] and a["window"] > 0)
    assert some(lambda a, x, e: a["softcap"] > 0) and some(lambda a, x, e: a["softcap"] == 0)
    assert some(lambda a, x, e: e.any() and (x["attention_mask"] == 0).any())  # padding rows excluded
    # image blocks: both modes, a block longer than the window, left padding, a past
    for blocks in (1, 2):
        assert some(lambda a, x, e, b=blocks: a.get("blocks") == b and _block_outgrows(a, x["attention_mask"]))
        assert some(lambda a, x, e, b=blocks: a.get("blocks") == b and (x["attention_mask"] == 0).any())
    assert some(lambda a, x, e: a.get("blocks") == 2 and x["query"].shape[2] < x["key"].shape[2])
    assert some(lambda a, x, e: a.get("blocks") and a["window"] == 0)
    assert all(c["attributes"].get("blocks", 0) or c["arrays"]["attention_mask"].max() <= 1 for c in cases)


def _block_outgrows(attrs: dict, mask: np.ndarray) -> bool:
    """Some block spans more key slots than the window: where the two block modes differ."""
    spans = [np.flatnonzero(row == v) for row in mask for v in set(row.tolist()) if v >= 2]
    return attrs["window"] > 0 and any(s[-1] - s[0] + 1 > attrs["window"] for s in spans)


def test_the_block_modes_give_different_outputs_on_the_same_mask() -> None:
    inside, past = (load_vector(VECTOR_DIR / f"blocks_{n}_window.json") for n in ("in", "past"))
    np.testing.assert_array_equal(inside["arrays"]["attention_mask"], past["arrays"]["attention_mask"])
    arrays = past["arrays"]  # its inputs under the other mode: the spec's two rules, not the same numbers
    other = run_reference(arrays, {**past["attributes"], "blocks": 1})
    assert row_error(other, arrays["output"], past["excluded"]) > 1e-2


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_excluded_rows_are_the_rows_without_a_visible_key(path: Path) -> None:
    case = load_vector(path)
    attrs, arrays = case["attributes"], case["arrays"]
    visible = visibility(arrays["attention_mask"], arrays["query"].shape[2], attrs["window"], attrs["causal"],
                         attrs.get("blocks", 0))  # fmt: skip
    np.testing.assert_array_equal(case["excluded"], ~visible.any(axis=-1))


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_reference_reproduces_vector(path: Path) -> None:
    case = load_vector(path)
    out = run_reference(case["arrays"], case["attributes"])
    assert row_error(out, case["arrays"]["output"], case["excluded"]) <= REFERENCE_TOL


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_onnx_function_reproduces_vector(path: Path) -> None:
    case = load_vector(path)
    out = run_function(case["arrays"], case["attributes"])
    assert out.dtype == np.float32
    assert row_error(out, case["arrays"]["output"], case["excluded"]) <= ONNX_TOL


@pytest.mark.parametrize("mask_elem", [TensorProto.INT32, TensorProto.BOOL], ids=["int32", "bool"])
def test_onnx_function_accepts_every_mask_type(mask_elem: int) -> None:
    case = load_vector(VECTOR_DIR / "left_padding_causal_softcap.json")
    arrays = dict(case["arrays"])
    arrays["attention_mask"] = arrays["attention_mask"].astype(helper.tensor_dtype_to_np_dtype(mask_elem))
    out = run_function(arrays, case["attributes"], mask_elem)
    assert row_error(out, arrays["output"], case["excluded"]) <= ONNX_TOL


def test_onnx_function_runs_float16() -> None:
    """float16 activations: scores and softmax still in float32 (graphs/attention.md, numerical notes)."""
    case = load_vector(VECTOR_DIR / "causal_past_window_softcap.json")
    arrays = {n: a.astype(np.float16) if a.dtype == np.float32 else a for n, a in case["arrays"].items()}
    sess = harness.session(one_node_model(case["attributes"], elem=TensorProto.FLOAT16))
    out = sess.run(None, {n: arrays[n] for n in INPUTS})[0]
    assert out.dtype == np.float16
    assert row_error(out, case["arrays"]["output"], case["excluded"]) <= 5e-3


# --- (b) the exported graph --------------------------------------------------------------------------------

EXPORT_ATTRS = {"scale": 0.375, "softcap": 0.75, "window": 3, "causal": 1}


class _Attend(torch.nn.Module):
    def forward(self, query, key, value, attention_mask):
        a = EXPORT_ATTRS
        return torch.ops.gemma.attention(
            query, key, value, attention_mask, a["scale"], a["softcap"], a["window"], bool(a["causal"])
        )


@pytest.fixture(scope="module")
def exported() -> onnx.ModelProto:
    b, s, t = (torch.export.Dim(n, min=1) for n in ("batch", "seq", "total"))
    heads, kv_heads, head_dim = 4, 2, 8
    example = (
        torch.randn(2, heads, 3, head_dim),
        torch.randn(2, kv_heads, 7, head_dim),
        torch.randn(2, kv_heads, 7, head_dim),
        torch.ones(2, 7, dtype=torch.int64),
    )
    dynamic = ({0: b, 2: s}, {0: b, 2: t}, {0: b, 2: t}, {0: b, 1: t})
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Attend(),
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=["output"],
            dynamic_shapes=dynamic,
            custom_translation_table=attention_op.TRANSLATION_TABLE,
            verbose=False,
        )
    return program.model_proto


def test_export_emits_one_attention_node(exported: onnx.ModelProto) -> None:
    custom = [n for n in exported.graph.node if n.domain == attention_op.DOMAIN]
    assert [n.op_type for n in custom] == ["Attention"]
    attrs = {a.name: helper.get_attribute_value(a) for a in custom[0].attribute}
    assert set(attrs) == set(ATTRIBUTES)
    assert attrs["scale"] == pytest.approx(EXPORT_ATTRS["scale"])
    assert attrs["softcap"] == pytest.approx(EXPORT_ATTRS["softcap"])
    assert (attrs["window"], attrs["causal"], attrs["kv_num_heads"]) == (EXPORT_ATTRS["window"], 1, 2)
    assert not any(f.domain == attention_op.DOMAIN for f in exported.functions)  # the body is inlined away
    assert not any(n.op_type == "Softmax" for n in exported.graph.node)  # ... and not in the graph either


@pytest.mark.parametrize(
    ("batch", "seq", "total", "left_pad"),
    [(2, 3, 7, (0, 2)), (1, 1, 9, (4,)), (3, 5, 5, (0, 1, 3)), (2, 6, 11, (5, 0))],
    ids=["prefill-past", "decode", "prompt", "long-past"],
)
def test_exported_graph_runs_at_any_length(exported: onnx.ModelProto, batch, seq, total, left_pad) -> None:
    model = ir.serde.serialize_model(attach_functions(ir.serde.deserialize_model(exported), OPSET))
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(seq * 100 + total)
    arrays = {
        "query": rng.standard_normal((batch, 4, seq, 8), dtype=np.float32),
        "key": rng.standard_normal((batch, 2, total, 8), dtype=np.float32),
        "value": rng.standard_normal((batch, 2, total, 8), dtype=np.float32),
        "attention_mask": (np.arange(total)[None] >= np.array(left_pad)[:, None]).astype(np.int64),
    }
    out = harness.session(model).run(None, {n: arrays[n] for n in INPUTS})[0]
    attrs = {**EXPORT_ATTRS, "kv_num_heads": 2}
    visible = visibility(arrays["attention_mask"], seq, attrs["window"], attrs["causal"])
    assert row_error(out, run_reference(arrays, attrs), ~visible.any(axis=-1)) <= ONNX_TOL


# --- (c) property test -------------------------------------------------------------------------------------


@st.composite
def attention_problems(draw):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    batch, seq, past = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(0, 5))
    total, head_dim = seq + past, draw(st.sampled_from([1, 2, 4, 8]))
    attrs = {
        "scale": draw(st.sampled_from([0.125, 0.25, 0.5, 1.0, 0.35355339])),
        "softcap": draw(st.sampled_from([0.0, 0.0, 0.3, 1.0, 50.0])),
        "window": draw(st.integers(0, total + 1)),
        "causal": draw(st.integers(0, 1)),
        "kv_num_heads": kv_heads,
    }
    pads = [draw(st.integers(0, total - 1)) for _ in range(batch)]
    mask_elem = draw(st.sampled_from([TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    arrays = {
        "query": rng.uniform(-2, 2, (batch, heads, seq, head_dim)).astype(np.float32),
        "key": rng.uniform(-2, 2, (batch, kv_heads, total, head_dim)).astype(np.float32),
        "value": rng.uniform(-1, 1, (batch, kv_heads, total, head_dim)).astype(np.float32),
        "attention_mask": (np.arange(total)[None] >= np.array(pads)[:, None]).astype(np.int64),
    }
    return attrs, arrays, mask_elem


@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_problems())
def test_function_matches_reference(problem) -> None:
    attrs, arrays, mask_elem = problem
    expected = run_reference(arrays, attrs)
    ort_arrays = dict(arrays)
    ort_arrays["attention_mask"] = arrays["attention_mask"].astype(helper.tensor_dtype_to_np_dtype(mask_elem))
    out = run_function(ort_arrays, attrs, mask_elem)
    visible = visibility(arrays["attention_mask"], arrays["query"].shape[2], attrs["window"], attrs["causal"])
    assert row_error(out, expected, ~visible.any(axis=-1)) <= ONNX_TOL
    assert np.isfinite(expected).all()


# --- (d) no drift ------------------------------------------------------------------------------------------


def test_vectors_on_disk_are_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "graphs" / "attention" / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    make_vectors = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = make_vectors  # dataclasses look their module up there
    try:
        spec.loader.exec_module(make_vectors)
        written = make_vectors.write_vectors(tmp_path)
    finally:
        del sys.modules[spec.name]
    fresh = {p.name: p.read_bytes() for p in written}
    on_disk = {p.name: p.read_bytes() for p in VECTORS}
    assert sorted(on_disk) == sorted(fresh), "run: .venv/bin/python graphs/attention/make_vectors.py"
    stale = [name for name in fresh if fresh[name] != on_disk[name]]
    assert not stale, f"vectors differ from make_vectors.py output: {stale}; regenerate them"


# --- lowerings documented in graphs/attention.md -----------------------------------------------------------


def _unpadded_causal(path: Path) -> bool:
    case = load_vector(path)
    a, x = case["attributes"], case["arrays"]
    return bool(a["causal"]) and (x["attention_mask"] == 1).all() and x["query"].shape[3] % 8 == 0  # no blocks


@pytest.mark.parametrize("path", [p for p in VECTORS if _unpadded_causal(p)], ids=lambda p: p.stem)
def test_group_query_attention_lowering(path: Path) -> None:
    """com.microsoft.GroupQueryAttention with softcap = softcap, local_window_size = W (or -1), past as cache."""
    case = load_vector(path)
    a, x = case["attributes"], case["arrays"]
    batch, heads, seq, head_dim = x["query"].shape
    kv, total = a["kv_num_heads"], x["key"].shape[2]
    past = total - seq

    def bsh(t: np.ndarray) -> np.ndarray:  # [b, n, s, d] -> [b, s, n * d]
        return t.transpose(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1)

    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv,
        scale=a["scale"],
        softcap=a["softcap"],
        local_window_size=a["window"] if a["window"] > 0 else -1,
    )
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    graph = helper.make_graph(
        [node],
        "gqa",
        [
            helper.make_tensor_value_info("query", f, [1, seq, heads * head_dim]),
            helper.make_tensor_value_info("key", f, [1, seq, kv * head_dim]),
            helper.make_tensor_value_info("value", f, [1, seq, kv * head_dim]),
            helper.make_tensor_value_info("past_key", f, [1, kv, past, head_dim]),
            helper.make_tensor_value_info("past_value", f, [1, kv, past, head_dim]),
            helper.make_tensor_value_info("seqlens_k", i32, [1]),
            helper.make_tensor_value_info("total_sequence_length", i32, []),
        ],
        [helper.make_tensor_value_info(n, f, None) for n in ("output", "present_key", "present_value")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        ir_version=harness.IR_VERSION,
    )
    sess = harness.session(model)
    rows = []
    for b in range(batch):  # GQA takes a batch of one when S > 1 and there is a past (graphs/attention.md)
        row = {n: x[n][b : b + 1] for n in ("query", "key", "value")}
        feeds = {
            "query": bsh(row["query"]),
            "key": bsh(row["key"][:, :, past:]),
            "value": bsh(row["value"][:, :, past:]),
            "past_key": np.ascontiguousarray(row["key"][:, :, :past]),
            "past_value": np.ascontiguousarray(row["value"][:, :, :past]),
            "seqlens_k": np.array([total - 1], dtype=np.int32),
            "total_sequence_length": np.array(total, dtype=np.int32),
        }
        rows.append(sess.run(["output"], feeds)[0].reshape(1, seq, heads, head_dim).transpose(0, 2, 1, 3))
    out = np.concatenate(rows)
    assert row_error(out, x["output"], case["excluded"]) <= ONNX_TOL


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_opset23_attention_lowering(path: Path) -> None:
    """ONNX Attention-23: scale, softcap, softmax_precision=FLOAT, visibility as a boolean attn_mask."""
    case = load_vector(path)
    a, x = case["attributes"], case["arrays"]
    seq = x["query"].shape[2]
    node = helper.make_node(
        "Attention",
        ["query", "key", "value", "visible"],
        ["output"],
        scale=a["scale"],
        softcap=a["softcap"],
        softmax_precision=TensorProto.FLOAT,
    )
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "attention23",
        [
            *(helper.make_tensor_value_info(n, f, list(x[n].shape)) for n in INPUTS[:3]),
            helper.make_tensor_value_info("visible", TensorProto.BOOL, ["B", 1, "S", "T"]),
        ],
        [helper.make_tensor_value_info("output", f, list(x["query"].shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=harness.IR_VERSION)
    onnx.checker.check_model(model)
    visible = visibility(x["attention_mask"], seq, a["window"], a["causal"], a.get("blocks", 0))[:, None]
    out = harness.session(model).run(None, {**{n: x[n] for n in INPUTS[:3]}, "visible": visible})[0]
    assert row_error(out, x["output"], case["excluded"]) <= ONNX_TOL
