"""`--target tensorrt` (gemma_export/targets/tensorrt/): the plugin-node graph, its parity on ONNX Runtime, engines.

What CI checks here (no GPU): for tiny Gemma 1, 2, 3 and RecurrentGemma, the artifact's graph (GemmaAttention /
GemmaRGLRU plugin nodes that keep their function bodies) passes the fp32 parity gate on ONNX Runtime, and
TensorRT-RTX builds engines from it with our plugins (the network holds one plugin layer per node) and without
them (the bodies inlined, no plugin layer); one test builds every compute capability; a bf16 build keeps norms
and residuals in float32 and passes the agreement gate through emulation; bad inputs are one-line errors.
What needs a GPU (engine parity) is skipped by `verify`, which says why.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.pipeline import package
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.targets.tensorrt import Settings as TrtSettings
from gemma_export.targets.tensorrt import TensorRT, builder, emulation, graph, profiles
from tests.support import cli
from tests.support.checkpoints import FIXTURE_OVERRIDES, save_hf_checkpoint

FAMILIES = ("gemma", "gemma2", "gemma3_text", "recurrent_gemma")
ONE_CC = "8.6"  # each family's engines target one GPU; test_every_compute_capability builds them all
HAS_BUILDER = builder.find_builder() is not None
needs_builder = pytest.mark.skipif(not HAS_BUILDER, reason="no TensorRT builder (pip install tensorrt-rtx)")


def plugin_nodes(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node if n.op_type in graph.PLUGIN_NAMES.values())


# --- fixtures: one tensorrt artifact per family, built once per session -----------------------------------


@pytest.fixture(scope="session")
def trt_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """conftest's tiny Gemma 1/2/3 checkpoints (shared with the other tests) and a tiny RecurrentGemma."""
    root = tmp_path_factory.mktemp("trt-checkpoints")
    extra = {
        t: save_hf_checkpoint(root / t, t, **FIXTURE_OVERRIDES.get(t, {})) for t in FAMILIES if t not in checkpoints
    }
    return {**checkpoints, **extra}


@pytest.fixture(scope="session")
def trt_artifacts(trt_checkpoints, tmp_path_factory) -> dict[str, Path]:
    return {}


@pytest.fixture(scope="session", params=FAMILIES)
def trt_artifact(request, trt_checkpoints, trt_artifacts, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    if family not in trt_artifacts:
        out = tmp_path_factory.mktemp("trt-artifacts") / family
        options = BuildOptions(target="tensorrt", compute_capabilities=ONE_CC, onnx_only=not HAS_BUILDER)
        build(trt_checkpoints[family], out, options, Stages(quiet=True))
        trt_artifacts[family] = out
    return family, trt_artifacts[family]


# --- the graph -----------------------------------------------------------------------------------------------


def test_graph_has_plugin_nodes_that_keep_their_bodies(trt_artifact) -> None:
    family, out = trt_artifact
    proto = package.graph_proto(out)
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert ("ai.gemma", "Attention") not in ops and ("ai.gemma", "RGLRU") not in ops  # TensorRT would misread them
    nodes = [n for n in proto.graph.node if n.op_type in graph.PLUGIN_NAMES.values()]
    cfg = Manifest.read(out).model.config
    if family == "recurrent_gemma":  # one node per block: (recurrent, recurrent, attention) repeated
        blocks = [cfg.get("block_types")[i % len(cfg.get("block_types"))] for i in range(cfg.num_hidden_layers)]
        expected = {"GemmaRGLRU": blocks.count("recurrent"), "GemmaAttention": blocks.count("attention")}
    else:
        expected = {"GemmaAttention": cfg.num_hidden_layers}
    assert plugin_nodes(proto) == expected
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "ai.gemma"
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"ai.gemma"
    functions = {(f.domain, f.name) for f in proto.functions}
    assert {("ai.gemma", n.op_type) for n in nodes} == functions  # each plugin node has its body, nothing else


def test_graph_passes_the_parity_gate_and_verify_skips_engines_with_the_reason(
    trt_artifact, trt_checkpoints, capsys
) -> None:
    family, out = trt_artifact
    manifest = Manifest.read(out)
    assert manifest.build.target == "tensorrt" and manifest.parity.passed
    code, stdout, _ = cli.run(capsys, "verify", out, "--checkpoint", trt_checkpoints[family], "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["parity"]["passed"] and result["parity"]["metric"] == "relative_logit_error"
    assert result["parity"]["prefill"] <= result["parity"]["tolerance"]
    engines = result["engine_parity"]
    if not engines["ran"]:  # CI: no GPU (or one TensorRT-RTX cannot target); the reason is said
        assert engines["reason"]


# --- engines ---------------------------------------------------------------------------------------------------


@needs_builder
def test_engines_with_and_without_plugins_are_listed(trt_artifact) -> None:
    _, out = trt_artifact
    manifest = Manifest.read(out)
    info = manifest.build.tensorrt
    nodes = sum(plugin_nodes(package.graph_proto(out)).values())
    assert info.builder in builder.BUILDERS and info.builder_version
    forms = {e.plugins: e for e in info.engines}
    assert set(forms) == {False, True} and all(e.compute_capability == ONE_CC for e in info.engines)
    assert forms[True].plugin_layers == nodes > 0  # the plugin form holds one plugin layer per node
    assert forms[False].plugin_layers == 0  # the bodies inlined: standard layers only
    assert forms[False].layers > forms[True].layers
    for e in info.engines:
        entry = manifest.files[e.file]
        assert entry.path.endswith(".engine") and (out / entry.path).stat().st_size == entry.bytes > 0
        assert package.sha256(out / entry.path) == entry.sha256
    assert {p.name for p in info.plugins} == set(plugin_nodes(package.graph_proto(out)))
    assert "register" in info.load and info.trtexec.startswith("trtexec --onnx=model.onnx")


@needs_builder
def test_every_compute_capability(trt_artifacts, trt_artifact, tmp_path) -> None:
    """The one test that builds all four targets, both forms (on a copy of one artifact's graph)."""
    family, out = trt_artifact
    if family != "gemma2":
        pytest.skip("one family suffices: the compute capability does not depend on it")
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    for engine in folder.glob("*.engine"):
        engine.unlink()
    manifest = Manifest.read(out)
    target = TensorRT(TrtSettings(compute_capabilities=tuple(builder.COMPUTE_CAPABILITIES)))
    target.builder, target.plugin_nodes = builder.find_builder(), sum(plugin_nodes(package.graph_proto(out)).values())
    target.plugin_names = sorted(plugin_nodes(package.graph_proto(out)))
    roles = target.compile(folder, [i.model_dump() for i in manifest.inputs], manifest.build.max_length)
    assert len(roles) == 2 * len(builder.COMPUTE_CAPABILITIES)
    for cc in builder.COMPUTE_CAPABILITIES:
        for plugins in (False, True):
            assert (folder / builder.engine_name(cc, plugins)).stat().st_size > 0
    ccs = {(e["compute_capability"], e["plugins"]) for e in target.record["engines"]}
    assert ccs == {(cc, p) for cc in builder.COMPUTE_CAPABILITIES for p in (False, True)}


def test_onnx_only_writes_the_trtexec_command(trt_artifact, tmp_path) -> None:
    _, out = trt_artifact
    folder = tmp_path / "onnx-only"
    shutil.copytree(out, folder)
    manifest = Manifest.read(out)
    target = TensorRT(TrtSettings(onnx_only=True))
    assert target.compile(folder, [i.model_dump() for i in manifest.inputs], manifest.build.max_length) == {}
    record = target.record
    assert record["builder"] is None and record["engines"] == []
    for name in ("input_ids", "attention_mask"):
        assert f"{name}:" in record["trtexec"]
    assert "--stronglyTyped" in record["trtexec"]


# --- reduced precision -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trt_bf16(trt_checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trt-bf16") / "gemma3_text"
    options = BuildOptions(target="tensorrt", precision="bf16", compute_capabilities=ONE_CC, engines="inlined",
                           onnx_only=not HAS_BUILDER)  # fmt: skip
    build(trt_checkpoints["gemma3_text"], out, options, Stages(quiet=True))
    return out


def test_bf16_keeps_norms_and_residuals_float32(trt_bf16, trt_checkpoints) -> None:
    manifest = Manifest.read(trt_bf16)
    fp32_bytes = (trt_checkpoints["gemma3_text"] / "model.safetensors").stat().st_size
    assert manifest.files["weights"].bytes < 0.55 * fp32_bytes  # bf16 weights; no float32 copy of the tied table
    assert manifest.build.precision == "bf16" and manifest.parity.metric == "agreement" and manifest.parity.passed
    proto = package.graph_proto(trt_bf16)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.output]}
    low = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert low and manifest.build.tensorrt.reduced_precision_products == len(low)
    bf16_weights = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.BFLOAT16}
    assert all(any(i in bf16_weights for i in n.input) for n in low)  # every product reads bf16 weights
    # everything else stays float32: the norms (Pow / ReduceMean), the residual Adds, the logits
    for node in proto.graph.node:
        if node.op_type in ("ReduceMean", "Pow", "Add", "Tanh") and node.output[0] in types:
            assert types[node.output[0]] == TensorProto.FLOAT, node.name
    assert types["logits"] == TensorProto.FLOAT
    assert not list(trt_bf16.glob("*emulated*"))  # the verify stage's emulated graph is not left behind


def test_reduce_precision_and_its_emulation_agree_with_numpy(tmp_path) -> None:
    """One MatMul: the fp16 graph on ONNX Runtime, the bf16 graph's emulation, and numpy rounding agree."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(8, 5)).astype(np.float32)
    for precision, rounding in (("fp16", np.float16), ("bf16", None)):
        model = ir.from_proto(_one_matmul(w))
        assert graph.reduce_precision(model, precision) == 1
        proto = ir.to_proto(model)
        if precision == "bf16":
            assert emulation.emulate(proto) == 1
            import ml_dtypes

            rounding = ml_dtypes.bfloat16
        got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
        expected = (x.astype(rounding).astype(np.float32) @ w.astype(rounding).astype(np.float32)).astype(rounding)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-2, atol=1e-2)
        assert np.abs(got - x @ w).max() > 0  # really rounded


def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


# --- profiles ------------------------------------------------------------------------------------------------


def test_profiles_map_every_dimension_and_respect_the_length() -> None:
    ranges = profiles.resolve(profiles.parse(["batch=1:2:8"]), {"sequence": [1, 16, 64]}, max_length=256)
    assert ranges["batch"] == (1, 2, 8) and ranges["sequence"] == (1, 16, 64)  # the option, then the recipe
    assert ranges["past"][2] + ranges["sequence"][2] <= 256
    inputs = [{"name": "input_ids", "shape": ["batch", "sequence_length"]},
              {"name": "attention_mask", "shape": ["batch", "total_sequence_length"]},
              {"name": "past_key_values.0.key", "shape": ["batch", 2, "past_sequence_length", 16]},
              {"name": "logits_to_keep", "shape": [], "optional": True}]  # fmt: skip
    shapes = profiles.input_shapes(inputs, ranges)
    assert "logits_to_keep" not in shapes
    for i in range(3):
        total = shapes["attention_mask"][i][1]
        assert total == shapes["input_ids"][i][1] + shapes["past_key_values.0.key"][i][2]
    with pytest.raises(BadInput, match="exceeds"):
        profiles.resolve({"sequence": (1, 1, 200), "past": (0, 1, 100)}, None, max_length=256)


@pytest.mark.parametrize("text", ["batch=1:2", "beam=1:1:2", "batch=4:2:8", "past=a:b:c", "sequence=0:1:4"])
def test_bad_profiles_are_one_line_errors(text: str) -> None:
    with pytest.raises(BadInput, match=r"--profile|need"):
        profiles.resolve(profiles.parse([text]), None, max_length=1024)


# --- bad inputs: one line, exit 2, before any slow stage --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "facts"),
    [
        (["--compute-capability", "9.0"], ["--compute-capability '9.0'", "8.0, 8.6, 8.9, 12.0"]),
        (["--compute-capability", "8.6,7.5"], ["'7.5'"]),
        (["--precision", "fp16"], ["fp16", "recipe"]),
        (["--precision", "int8"], ["--precision 'int8'"]),
        (["--quant", "int4"], ["MatMulNBits"]),
        (["--engines", "all"], ["--engines 'all'"]),
        (["--profile", "batch=8:1:1"], ["--profile"]),
    ],
)
def test_bad_options_are_one_line_errors(args, facts, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = cli.run(capsys, "build", tmp_path, "-o", out, "--target", "tensorrt", *args)
    assert code == 2
    cli.error_line(err, *facts)
    cli.assert_no_output(out)


def test_tensorrt_options_need_the_tensorrt_target(tmp_path, capsys) -> None:
    code, _, err = cli.run(capsys, "build", tmp_path, "-o", tmp_path / "out", "--compute-capability", "8.6")
    assert code == 2
    cli.error_line(err, "--compute-capability applies to --target tensorrt")


def test_a_precision_the_recipe_refuses(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = cli.run(capsys, "build", "--recipe", "gemma-3-270m", "--random", "-o", out, "--target",
                           "tensorrt", "--precision", "fp16", "--random-dir", tmp_path / "random")  # fmt: skip
    assert code == 2
    cli.error_line(err, "recipe gemma-3-270m does not offer --precision 'fp16'", "65504")
    assert not (tmp_path / "random").exists()  # refused before the random checkpoint is written


def test_no_builder_is_one_line_and_onnx_only_is_the_way_out(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("GEMMA_EXPORT_NO_TENSORRT", "1")
    out = tmp_path / "out"
    code, _, err = cli.run(capsys, "build", tmp_path, "-o", out, "--target", "tensorrt")
    assert code == 2
    cli.error_line(err, "no TensorRT builder", "--onnx-only")
    cli.assert_no_output(out)
    BuildOptions(target="tensorrt", onnx_only=True).check()  # accepted: it builds no engine


def test_verify_reruns_the_bf16_gate_without_writing_into_the_artifact(trt_bf16, trt_checkpoints, capsys) -> None:
    before = sorted(p.name for p in trt_bf16.iterdir())
    code, stdout, _ = cli.run(capsys, "verify", trt_bf16, "--checkpoint", trt_checkpoints["gemma3_text"], "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["parity"]["metric"] == "agreement" and result["parity"]["passed"]
    assert result["engine_parity"]["ran"] or result["engine_parity"]["reason"]
    assert sorted(p.name for p in trt_bf16.iterdir()) == before
