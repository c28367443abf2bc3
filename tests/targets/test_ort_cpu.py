"""`--target ort-cpu` lowering (gemma_export/targets/ort_cpu.py) and the windowed KV cache (models/gemma.py).

- each op-level conformance vector through the lowered attention (GroupQueryAttention under an If, with
  Attention-23 for what GroupQueryAttention refuses), both paths;
- the lowered artifacts of every Gemma generation: no ai.gemma node left, the kernels chosen, a truthful
  manifest, parity with the reference through both paths (one-pass and chunked prefill of a padded batch);
- `--target onnx` keeps the portable graph (ai.gemma ops and their function bodies);
- the windowed cache: local layers carry a fixed (window - 1)-slot buffer, global layers grow; the state's
  shapes stay fixed past the window, parity holds (reference and artifact, both targets), and
  `kv_cache_bytes` is what the state arrays weigh.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from gemma_export.checkpoint import load
from gemma_export.config.model_config import parse_config, parse_griffin_config
from gemma_export.dev import random_checkpoint
from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.models.gemma import GemmaModel, kv_cache_bytes
from gemma_export.models.griffin import GriffinModel
from gemma_export.ops import attention as attention_op
from gemma_export.pipeline import package
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime import session as runtime
from gemma_export.runtime.session import OrtDecoder, left_pad, positions
from gemma_export.targets import ort_cpu as lower
from gemma_export.targets.genai_config import GENAI_CONFIG
from gemma_export.verify import gate as verify
from gemma_export.verify import passes
from gemma_export.verify.reference import TorchDecoder
from tests.support import op_harness as harness
from tests.support.artifacts import built_once
from tests.support.attention_vectors import VECTORS, load_vector, row_error
from tests.support.tied_head import tied_model

TOL = 1e-4
ONNX_TOL = 1e-5


def graph_of(artifact: Path) -> onnx.ModelProto:
    return onnx.load(str(artifact / package.MODEL_FILE), load_external_data=False)


def kernels(proto: onnx.ModelProto) -> collections.Counter:
    """(domain, op_type) of every node, the If branches' included."""
    seen: collections.Counter = collections.Counter()

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            seen[(node.domain, node.op_type)] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(proto.graph)
    return seen


def build_once(checkpoint: Path, out: Path, **options) -> Path:
    build(checkpoint, out, BuildOptions(**options), Stages(quiet=True))
    return out


# --- the lowered op, on the conformance vectors ------------------------------------------------------------


def lowered_one_node(attrs: dict, heads: int, head_dim: int) -> onnx.ModelProto:
    """key/value = Concat(past, new) -> ai.gemma::Attention, as in a decoder layer, then lowered."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Concat", ["past_key", "new_key"], ["key"], axis=2),
        helper.make_node("Concat", ["past_value", "new_value"], ["value"], axis=2),
        helper.make_node("Attention", ["query", "key", "value", "attention_mask"], ["output"],
                         domain=attention_op.DOMAIN, **attrs),
    ]  # fmt: skip
    query_shape, kv = ["B", heads, "S", head_dim], attrs["kv_num_heads"]  # head counts are static in a model
    inputs = [
        helper.make_tensor_value_info("query", f, query_shape),
        *(helper.make_tensor_value_info(n, f, ["B", kv, "P", head_dim]) for n in ("past_key", "past_value")),
        *(helper.make_tensor_value_info(n, f, ["B", kv, "S", head_dim]) for n in ("new_key", "new_value")),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
    ]
    outputs = [helper.make_tensor_value_info("output", f, query_shape),
               *(helper.make_tensor_value_info(n, f, ["B", kv, "T", head_dim]) for n in ("key", "value"))]  # fmt: skip
    model = helper.make_model(
        helper.make_graph(nodes, "layer", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(attention_op.DOMAIN, 1)],
        ir_version=harness.IR_VERSION,
    )
    lowered = ir.serde.serialize_model(lower.lower(ir.serde.deserialize_model(model)))
    onnx.checker.check_model(lowered, full_check=True)
    return lowered


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_lowered_attention_reproduces_vector(path: Path) -> None:
    """The whole batch (several new tokens with a past at batch > 1 takes Attention-23) and each row alone
    (GroupQueryAttention wherever it applies): both reproduce the vector."""
    case = load_vector(path)
    attrs, x = case["attributes"], case["arrays"]
    _, heads, seq, head_dim = x["query"].shape
    past = x["key"].shape[2] - seq
    model = lowered_one_node(
        {**attrs, "scale": float(attrs["scale"]), "softcap": float(attrs["softcap"])}, heads, head_dim
    )
    found = kernels(model)
    assert (attention_op.DOMAIN, "Attention") not in found and found[("", "Attention")] == 1
    # GroupQueryAttention (with Attention-23 as the If's other path) is causal-only and needs head_dim % 8 == 0
    gqa = bool(attrs["causal"]) and head_dim % 8 == 0 and not attrs.get("blocks")  # (blocks: Attention-23)
    assert found[("com.microsoft", "GroupQueryAttention")] == found[("", "If")] == int(gqa)
    sess = harness.session(model)

    def run(rows: slice) -> np.ndarray:
        feeds = {
            "query": x["query"][rows],
            "past_key": np.ascontiguousarray(x["key"][rows, :, :past]),
            "new_key": np.ascontiguousarray(x["key"][rows, :, past:]),
            "past_value": np.ascontiguousarray(x["value"][rows, :, :past]),
            "new_value": np.ascontiguousarray(x["value"][rows, :, past:]),
            "attention_mask": x["attention_mask"][rows],
        }
        out, key, value = sess.run(None, feeds)
        np.testing.assert_array_equal(key, x["key"][rows])  # the present cache is past + new, unchanged
        np.testing.assert_array_equal(value, x["value"][rows])
        return out

    assert row_error(run(slice(None)), x["output"], case["excluded"]) <= ONNX_TOL
    for b in range(x["query"].shape[0]):
        rows = slice(b, b + 1)
        assert row_error(run(rows), x["output"][rows], case["excluded"][rows]) <= ONNX_TOL


# --- lowered artifacts (conftest's `artifact`: the default build, ort-cpu, full cache) --------------------------


def test_lowered_artifact_has_no_ai_gemma_node_and_a_truthful_manifest(artifact, checkpoint) -> None:
    cfg, _ = load.load_model(checkpoint)
    manifest = Manifest.read(artifact)
    proto = graph_of(artifact)
    found = kernels(proto)
    layers = cfg.num_hidden_layers
    assert not any(domain == attention_op.DOMAIN for domain, _ in found) and not proto.functions
    assert found[("com.microsoft", "GroupQueryAttention")] == layers  # one per layer, in the If's else branch
    assert found[("", "Attention")] == layers and found[("", "If")] == layers
    assert found[("", "RMSNormalization")] + found[("com.microsoft", "SkipSimplifiedLayerNormalization")] > 0
    assert found[("", "RotaryEmbedding")] == 2 * layers
    assert found[("com.microsoft", "FusedMatMul")] == 1 and ("", "Gemm") not in found  # the head, on 3-D input
    assert not {"Pow", "ReduceMean", "Softmax", "Neg"} & {op for _, op in found}  # decompositions gone
    # q, k, v reach GroupQueryAttention as [batch, seq, heads * dim] and its output leaves so: no Transpose but
    # the Attention-23 branch's own
    assert not [n for n in proto.graph.node if n.op_type == "Transpose"]
    assert found[("", "Transpose")] == 4 * layers
    imports = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
    assert manifest.build.target == "ort-cpu"
    assert manifest.build.domains == imports == {"ai.onnx": 23, "com.microsoft": 1}
    assert manifest.build.cache_layout == "full"
    # each layer's GroupQueryAttention has its layer's window and the model's softcap and scale
    gqa = [n for n in _branch_nodes(proto) if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert [max(a["local_window_size"], 0) for a in attrs] == [cfg.window_of(i) for i in range(layers)]
    assert all(a["softcap"] == pytest.approx(cfg.attn_logit_softcapping) for a in attrs)
    assert all(a["scale"] == pytest.approx(cfg.attention_scale) for a in attrs)
    assert manifest.parity.passed and max(manifest.parity.prefill, manifest.parity.decode) <= TOL


def _branch_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of every If branch, in graph order."""
    return [n for node in proto.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
            for n in a.g.node]  # fmt: skip


def test_lowered_artifact_matches_reference_through_both_kernels(artifact, checkpoint, monkeypatch) -> None:
    """One-pass prefill (GroupQueryAttention) and prefill in chunks of 5 tokens: a padded batch with a past takes
    Attention-23, the single long row GroupQueryAttention with a past; decoding crosses the window."""
    cfg, model = load.load_model(checkpoint)
    manifest = Manifest.read(artifact)
    one_pass = verify.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, TOL)
    monkeypatch.setattr(passes, "VERIFY_LOGITS_BUDGET_BYTES", 4 * 2 * cfg.vocab_size * 5)
    assert len(runtime.prefill_slices(20, 2, cfg.vocab_size, passes.VERIFY_LOGITS_BUDGET_BYTES)) == 4
    chunked = verify.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, TOL)
    for report in (one_pass, chunked):
        assert report.prefill_max_abs_error <= TOL and report.decode_max_abs_error <= TOL


# --- the tied embedding: one copy of its bytes, looked up under an alias --------------------------------------


def stored_spans(proto: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) in the external weights file."""
    return {t.name: (int(d["offset"]), int(d["length"])) for t in proto.graph.initializer if t.external_data
            for d in [{e.key: e.value for e in t.external_data}]}  # fmt: skip


def test_lookup_reads_an_alias_of_the_heads_bytes_written_once(artifact) -> None:
    proto = graph_of(artifact)
    (gather,) = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    (head,) = [n for n in proto.graph.node if n.op_type == "FusedMatMul"]
    spans = stored_spans(proto)
    assert gather.input[0] != head.input[1]  # ONNX Runtime may release the head's original after pre-packing
    assert spans[gather.input[0]] == spans[head.input[1]]  # ... and the lookup maps the very same bytes
    unique = set(spans.values())
    assert (artifact / package.WEIGHTS_FILE).stat().st_size == sum(length for _, length in unique)
    assert len(unique) == len(spans) - 1  # the alias is the only name that shares its bytes


def test_two_lookups_of_one_table_share_its_alias() -> None:
    model = tied_model(64, 16)
    first = next(n for n in model.graph if n.op_type == "Gather")
    second = ir.node("Gather", [first.inputs[0], first.inputs[1]])
    model.graph.insert_after(first, second)
    assert lower.alias_lookup_tables(model) == 2
    assert first.inputs[0] is second.inputs[0] and first.inputs[0].name == "E" + lower.ALIAS_SUFFIX


_RESIDENT_AFTER_LOAD = """
import sys, numpy as np, onnxruntime as ort
def rss(): return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = rss()
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
session.run(None, {"ids": np.array([[3]], np.int64)})
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(rss() - before, peak - before)
"""


def test_a_pre_packed_head_leaves_one_copy_of_the_tied_table_resident(tmp_path) -> None:
    """Measured in a fresh process: ONNX Runtime holds the head's packed copy and, without the alias, the
    original too (the lookup reads it); with the alias, the lookup's few rows. While it packs a whole head,
    both copies are resident; in slices (chunk_head), one slice's original at a time."""
    table = 8192 * 1024 * 4  # 32 MiB: well above the session's own allocations
    grown = {}
    for way in ("plain", "aliased", "sliced"):
        model = tied_model(8192, 1024)
        if way == "sliced":
            head = next(n for n in model.graph if n.op_type == "FusedMatMul")
            assert lower.chunk_head(model, head, max_bytes=table // 8) == 8
        if way != "plain":
            assert lower.alias_lookup_tables(model) == (way == "aliased")  # a sliced head needs none
        grown[way] = _load_and_look_up(tmp_path / way, model)
        assert (tmp_path / way / package.WEIGHTS_FILE).stat().st_size == table  # written once, every way
    # Without the alias both copies stay (if this fails, ONNX Runtime changed: the alias may be needless); with
    # it, one copy less (the session's own allocations, ~10 MB, in all)
    (plain, _), (aliased, aliased_peak), (sliced, sliced_peak) = grown.values()
    assert plain > 1.75 * table and plain - aliased > 0.8 * table, grown
    # the peak over what stays (the session's own allocations cancel): a whole head's second copy while it is
    # packed, or at most a slice's (an eighth; measured 0.93 and 0.04 tables)
    assert aliased_peak - aliased > 0.75 * table and sliced_peak - sliced < 0.25 * table, grown
    assert abs(sliced - aliased) < 0.2 * table, grown  # what stays is the same


def _load_and_look_up(folder: Path, model: ir.Model) -> tuple[int, int]:
    """(resident bytes after a lookup, peak resident bytes) that a fresh process gains from opening `model`."""
    import subprocess
    import sys

    folder.mkdir()
    package.write_model(model, folder)
    run = [sys.executable, "-c", _RESIDENT_AFTER_LOAD, str(folder / package.MODEL_FILE)]
    resident, peak = subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()
    return int(resident), int(peak)


def test_a_large_head_is_computed_in_slices_that_alias_its_bytes(tmp_path) -> None:
    """chunk_head: the same logits from slices of the vocabulary, each reading its rows' span of the one stored
    copy, which the lookup reads as it is (no MatMul pre-packs it now: no alias needed)."""
    vocab, hidden = 5 * lower.SLICE_ROWS, 64
    logits = {}
    for slices in (0, 5):
        model = tied_model(vocab, hidden)
        head = next(n for n in model.graph if n.op_type == "FusedMatMul")
        whole = 4 * vocab * hidden
        assert lower.chunk_head(model, head, max_bytes=whole // 5 if slices else whole) == slices
        assert lower.alias_lookup_tables(model) == (not slices)
        folder = tmp_path / str(slices)
        folder.mkdir()
        package.write_model(model, folder)
        assert (folder / package.WEIGHTS_FILE).stat().st_size == whole
        session = ort.InferenceSession(str(folder / package.MODEL_FILE), providers=["CPUExecutionProvider"])
        logits[slices] = session.run(None, {"ids": np.array([[7]], np.int64)})[0]
        proto = onnx.load(str(folder / package.MODEL_FILE), load_external_data=False)
    heads = [n for n in proto.graph.node if n.op_type == "FusedMatMul"]
    spans = stored_spans(proto)
    (gather,) = [n for n in proto.graph.node if n.op_type == "Gather"]
    assert gather.input[0] == "E" and spans["E"] == (0, whole)
    rows = whole // 5
    assert [spans[n.input[1]] for n in heads] == [(i * rows, rows) for i in range(5)]  # tiling the table
    # each logit is the same dot product (MLAS may sum a slice's last columns in another order)
    np.testing.assert_allclose(logits[5], logits[0], rtol=1e-5, atol=1e-6)


# --- the portable target, and the windowed cache -----------------------------------------------------------


@pytest.fixture(scope="module")
def portable_windowed(checkpoints, tmp_path_factory) -> Path:
    """Gemma 2 (soft-caps, alternating local/global), --target onnx, windowed cache."""
    out = tmp_path_factory.mktemp("portable") / "gemma2"
    return build_once(checkpoints["gemma2"], out, target="onnx", cache_layout="windowed")


@pytest.fixture(scope="module")
def lowered_windowed(checkpoints, tmp_path_factory) -> Path:
    """Gemma 3 (q/k norms, 5 local : 1 global), --target ort-cpu, windowed cache (the same build as
    tests/cpp's "gemma3_text-windowed" artifact: made once per run)."""
    return built_once(tmp_path_factory, "gemma3_text-windowed", checkpoints["gemma3_text"], cache_layout="windowed")


WINDOWED = {"portable_windowed": "gemma2", "lowered_windowed": "gemma3_text"}


@pytest.fixture(params=sorted(WINDOWED))
def windowed(request, checkpoints) -> tuple[Path, Path]:
    return request.getfixturevalue(request.param), checkpoints[WINDOWED[request.param]]


def test_onnx_target_keeps_the_portable_graph(portable_windowed, checkpoints) -> None:
    cfg, _ = load.load_model(checkpoints["gemma2"])
    manifest = Manifest.read(portable_windowed)
    proto = graph_of(portable_windowed)
    attention_nodes = [n for n in proto.graph.node if n.domain == attention_op.DOMAIN]
    assert [n.op_type for n in attention_nodes] == ["Attention"] * cfg.num_hidden_layers
    assert [(f.domain, f.name) for f in proto.functions] == [(attention_op.DOMAIN, "Attention")]
    assert not any(domain == "com.microsoft" for domain, _ in kernels(proto))
    assert manifest.build.target == "onnx"
    assert manifest.build.domains == {"ai.onnx": 23, "ai.gemma": 1}
    onnx.checker.check_model(str(portable_windowed / package.MODEL_FILE))


def test_windowed_manifest_describes_fixed_local_buffers(windowed) -> None:
    artifact, checkpoint = windowed
    cfg, _ = load.load_model(checkpoint)
    manifest = Manifest.read(artifact)
    assert manifest.build.cache_layout == "windowed"
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        slots = cfg.window_of(i) - 1 if cfg.window_of(i) else 0
        key = next(s for s in manifest.state if s.input == f"past_key_values.{i}.key")
        assert key.shape == ["batch", kv, slots, d], i
        out = next(o for o in manifest.outputs if o.name == f"present.{i}.key")
        lowered = manifest.build.target == "ort-cpu"  # its growing caches may be shared buffers
        grows = "present_sequence_length" if lowered else "total_sequence_length"
        assert out.shape == ["batch", kv, slots if cfg.window_of(i) else grows, d]
        assert key.shared_buffer == (lowered and not cfg.window_of(i)), i
    # onnxruntime-genai's sliding-window cache is another layout: no genai_config rather than a wrong one
    assert "genai_config" not in manifest.files and not (artifact / GENAI_CONFIG).exists()
    assert manifest.parity.passed


def test_windowed_state_stays_fixed_past_the_window_and_weighs_kv_cache_bytes(windowed) -> None:
    artifact, checkpoint = windowed
    cfg, _ = load.load_model(checkpoint)
    decoder = OrtDecoder(artifact, Manifest.read(artifact))
    ids, mask = left_pad([[2, 5, 6, 7, 8], [2, 9]], cfg.pad_token_id)
    pos = positions(mask)
    cache = decoder.empty_cache(2)
    logits, cache = decoder.step(ids, mask, pos, cache)
    local = [i for i in range(cfg.num_hidden_layers) if cfg.window_of(i)]
    assert local and len(local) < cfg.num_hidden_layers
    first = [c.shape for c in cache]
    for _ in range(cfg.max_window + 4):  # well past the window
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, cache = decoder.step(ids, mask, pos, cache)
        for i, (now, then) in enumerate(zip([c.shape for c in cache], first, strict=True)):
            layer = i // 2
            expected = then if layer in local else (*then[:2], mask.shape[1], then[3])
            assert now == expected, (layer, now)
        weighed = sum(c.nbytes for c in cache)
        assert weighed == kv_cache_bytes(cfg, mask.shape[1], batch=2, layout="windowed")
    assert weighed < kv_cache_bytes(cfg, mask.shape[1], batch=2, layout="full")


def test_windowed_artifact_matches_reference(windowed, monkeypatch) -> None:
    """Long prompt past twice the window, left-padded batch, decode across the boundary; then in chunks."""
    artifact, checkpoint = windowed
    cfg, model = load.load_model(checkpoint)
    model.use_cache_layout("windowed")
    manifest = Manifest.read(artifact)
    reports = [verify.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, TOL, decode_steps=8)]
    monkeypatch.setattr(passes, "VERIFY_LOGITS_BUDGET_BYTES", 4 * 2 * cfg.vocab_size * 7)
    reports.append(verify.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, TOL))
    for report in reports:
        assert max(len(c.prompt_lengths) for c in report.cases) == 2
        assert max(n for c in report.cases for n in c.prompt_lengths) > 2 * cfg.max_window
        assert report.prefill_max_abs_error <= TOL and report.decode_max_abs_error <= TOL


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_windowed_reference_computes_what_the_full_one_does(checkpoints, model_type) -> None:
    cfg, full = load.load_model(checkpoints[model_type])
    _, windowed = load.load_model(checkpoints[model_type])
    windowed.use_cache_layout("windowed")
    assert windowed.state_specs() != full.state_specs()
    report = verify.compare(TorchDecoder(full), TorchDecoder(windowed), cfg, TOL)  # decodes across the window
    assert report.prefill_max_abs_error <= TOL and report.decode_max_abs_error <= TOL


def test_kv_cache_bytes_weighs_the_full_cache(artifact, checkpoint) -> None:
    cfg, _ = load.load_model(checkpoint)
    decoder = OrtDecoder(artifact, Manifest.read(artifact))
    ids, mask = left_pad([[2, 5, 6, 7, 8, 9, 10]], cfg.pad_token_id)
    _, cache = decoder.step(ids, mask, positions(mask), decoder.empty_cache(1))
    assert sum(c.nbytes for c in cache) == kv_cache_bytes(cfg, ids.shape[1], batch=1, layout="full")


@pytest.mark.parametrize("name", ["gemma-3-270m", "gemma-3-1b", "gemma-3-4b", "gemma-2-2b"])
def test_kv_cache_bytes_of_published_shapes(name) -> None:
    """What state_specs lays out (a model on the meta device: no weights) at 8K and 32K tokens, and Gemma 3's
    point: its local layers keep 1 / 6 of its caches' growth, so the windowed cache is several times smaller."""
    cfg = parse_config(random_checkpoint.PUBLISHED_CONFIGS[name])
    with torch.device("meta"):
        model = GemmaModel(cfg).use_cache_layout("windowed")
    for context in (8192, 32768):
        specs = model.state_specs()
        laid_out = sum(
            math.prod(3 if d == "batch" else context if axis == s.grows else d for axis, d in enumerate(s.shape)) * 4
            for s in specs
        )
        assert kv_cache_bytes(cfg, context, batch=3, layout="windowed") == laid_out
        full = kv_cache_bytes(cfg, context, batch=3, layout="full")
        assert full == 2 * 3 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * 4
    ratio = kv_cache_bytes(cfg, 32768, layout="full") / kv_cache_bytes(cfg, 32768, layout="windowed")
    if cfg.family.window_every == 6:  # Gemma 3
        assert ratio > 4
    else:  # Gemma 2: every other layer global, window 4096
        assert 1.5 < ratio < 2


def test_cache_layout_bad_input() -> None:
    with pytest.raises(BadInput, match="--cache-layout 'ring'"):
        BuildOptions(cache_layout="ring").check()
    with torch.device("meta"):
        gemma = GemmaModel(parse_config(random_checkpoint.TINY_CONFIGS["gemma2"]))
        griffin = GriffinModel(parse_griffin_config(random_checkpoint.TINY_CONFIGS["recurrent_gemma"]))
    with pytest.raises(BadInput, match="--cache-layout 'ring'"):
        gemma.use_cache_layout("ring")
    with pytest.raises(BadInput, match="RecurrentGemma"):  # its attention layers only ever keep their window
        griffin.use_cache_layout("full")
    assert griffin.use_cache_layout("windowed").cache_layout == "windowed"
