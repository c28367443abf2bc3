"""The built artifact against the reference and the oracles, and its contract (manifest, graph, files)."""

from __future__ import annotations

import json

import onnx
import pytest

from gemma_export.checkpoint import load
from gemma_export.manifest import MANIFEST, Manifest
from gemma_export.pipeline import package
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtDecoder, generate
from gemma_export.targets.genai_config import GENAI_CONFIG
from gemma_export.verify import gate as verify
from gemma_export.verify import passes
from gemma_export.verify.reference import TorchDecoder
from tests.support.artifacts import shared_artifact
from tests.support.genai_client import genai_greedy
from tests.support.transformers_oracle import hf_greedy, long_and_padded

TOL = 1e-4


def test_artifact_matches_reference_prefill_and_decode(artifact, checkpoint) -> None:
    cfg, model = load.load_model(checkpoint)
    manifest = Manifest.read(artifact)
    report = verify.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, TOL, decode_steps=8)
    lengths = [n for c in report.cases for n in c.prompt_lengths]
    assert max(lengths) > 2 * cfg.max_window
    assert any(len(c.prompt_lengths) == 2 and len(set(c.prompt_lengths)) == 2 for c in report.cases)
    assert report.prefill_max_abs_error <= TOL
    assert report.decode_max_abs_error <= TOL
    # the build recorded its own run of the same gate
    assert manifest.parity.passed and manifest.parity.prefill <= TOL and manifest.parity.decode <= TOL


def test_artifact_greedy_tokens_match_transformers(artifact, checkpoint, hf_model) -> None:
    cfg, _ = load.load_model(checkpoint)
    prompts = long_and_padded(cfg)
    expected = hf_greedy(hf_model, prompts, 20, cfg.pad_token_id)
    ours = generate(OrtDecoder(artifact, Manifest.read(artifact)), prompts, 20, pad_id=cfg.pad_token_id)
    assert ours == expected


def test_onnxruntime_genai_reproduces_greedy_tokens(artifact, checkpoint) -> None:
    pytest.importorskip("onnxruntime_genai")
    cfg, model = load.load_model(checkpoint)
    prompt = long_and_padded(cfg)[0]
    expected = generate(TorchDecoder(model), [prompt], 20)[0]

    got = genai_greedy(artifact, prompt, 20)
    assert got[: len(expected)] == expected[: len(got)]
    assert len(got) == 20 or got[-1] in cfg.eos_token_ids


def test_graph_carries_one_attention_op_per_layer_with_the_layer_window(artifact, checkpoint) -> None:
    cfg, _ = load.load_model(checkpoint)
    proto = onnx.load(str(artifact / package.MODEL_FILE), load_external_data=False)
    # --target ort-cpu (the default) lowers each layer's ai.gemma::Attention to GroupQueryAttention (in an If,
    # beside Attention-23; tests/targets/test_ort_cpu.py), which carries the window; `--target onnx` keeps ai.gemma.
    assert not [n for n in proto.graph.node if n.domain == "ai.gemma"]
    nodes = [n for node in proto.graph.node if node.op_type == "If" for a in node.attribute
             for n in a.g.node if n.op_type == "GroupQueryAttention"]  # fmt: skip
    assert len(nodes) == cfg.num_hidden_layers
    windows = [max(next(a.i for a in n.attribute if a.name == "local_window_size"), 0) for n in nodes]
    assert windows == [cfg.window_of(i) for i in range(cfg.num_hidden_layers)]
    if cfg.model_type == "gemma2":  # even layers local, odd global
        assert windows == [cfg.sliding_window if i % 2 == 0 else 0 for i in range(cfg.num_hidden_layers)]
    if cfg.model_type == "gemma3_text":  # layer i global when (i + 1) % 6 == 0
        assert windows == [0 if (i + 1) % 6 == 0 else cfg.sliding_window for i in range(cfg.num_hidden_layers)]
    softcaps = {next(a.f for a in n.attribute if a.name == "softcap") for n in nodes}
    assert softcaps == {cfg.attn_logit_softcapping}
    assert not proto.functions  # no ai.gemma op left to define
    onnx.checker.check_model(str(artifact / package.MODEL_FILE))  # by path: weights are external
    for node in proto.graph.node:
        assert not node.metadata_props, "exporter annotations (absolute paths) must not reach the artifact"


def test_manifest_describes_the_contract(artifact, checkpoint) -> None:
    cfg, _ = load.load_model(checkpoint)
    manifest = json.loads((artifact / "manifest.json").read_text())
    inputs = {v["name"]: v for v in manifest["inputs"]}
    outputs = {v["name"]: v for v in manifest["outputs"]}
    assert inputs["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence_length"]}
    assert inputs["attention_mask"]["shape"] == ["batch", "total_sequence_length"]
    assert inputs["position_ids"]["dtype"] == "int64"
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    assert inputs["past_key_values.0.key"]["shape"] == ["batch", kv, "past_sequence_length", hd]
    assert outputs["logits"] == {
        "name": "logits",
        "dtype": "float32",
        "shape": ["batch", "logits_length", cfg.vocab_size],  # sequence_length, or logits_to_keep's rows
    }
    # present_sequence_length: total_sequence_length, or the capacity of a shared buffer (README "Shared KV buffers")
    last = outputs[f"present.{cfg.num_hidden_layers - 1}.value"]
    assert last["shape"] == ["batch", kv, "present_sequence_length", hd]
    assert len(manifest["state"]) == 2 * cfg.num_hidden_layers
    assert manifest["state"][0] == {
        "input": "past_key_values.0.key",
        "output": "present.0.key",
        "shape": ["batch", kv, 0, hd],
        "dtype": "float32",
        "shared_buffer": True,
    }
    assert set(manifest["state"][i]["input"] for i in range(len(manifest["state"]))) <= set(inputs)
    assert manifest["build"]["domains"] == {"ai.onnx": 23, "com.microsoft": 1}  # lowered (targets/test_ort_cpu.py)
    for entry in manifest["files"].values():
        assert package.sha256(artifact / entry["path"]) == entry["sha256"]
    assert {"tokenizer.json", "tokenizer_config.json", "genai_config", "model", "weights"} <= set(manifest["files"])
    assert manifest["versions"]["torch"].startswith("2.")


@pytest.mark.slow
def test_same_inputs_give_byte_identical_artifacts(artifacts, checkpoints, tmp_path, tmp_path_factory) -> None:
    # the first build is the session's (built earlier in this process, or now): a second build compared with it
    first = shared_artifact("gemma3_text", artifacts, checkpoints, tmp_path_factory)
    second = tmp_path / "b"
    build(checkpoints["gemma3_text"], second, BuildOptions(), Stages(quiet=True))
    for name in (package.MODEL_FILE, package.WEIGHTS_FILE, MANIFEST, GENAI_CONFIG):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_chunked_prefill_through_the_cache_matches_one_pass(artifact, checkpoint, monkeypatch) -> None:
    """Long prompts of large vocabularies are prefilled in chunks (bounded logits memory): same result."""
    from gemma_export.runtime import session as runtime

    cfg, model = load.load_model(checkpoint)
    manifest = Manifest.read(artifact)
    prompts = long_and_padded(cfg)
    whole = generate(OrtDecoder(artifact, manifest), prompts, 8, pad_id=cfg.pad_token_id)
    monkeypatch.setattr(runtime, "LOGITS_BUDGET_BYTES", 4 * len(prompts) * cfg.vocab_size * 7)  # 7 tokens a pass
    monkeypatch.setattr(passes, "VERIFY_LOGITS_BUDGET_BYTES", runtime.LOGITS_BUDGET_BYTES)  # verify's own budget
    assert len(runtime.prefill_slices(len(prompts[0]), len(prompts), cfg.vocab_size)) > 2
    assert generate(OrtDecoder(artifact, manifest), prompts, 8, pad_id=cfg.pad_token_id) == whole
    report = verify.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, TOL)
    assert report.prefill_max_abs_error <= TOL and report.decode_max_abs_error <= TOL


def test_inspect_shows_the_contract(artifact, capsys) -> None:
    from gemma_export.cli.main import main

    assert main(["inspect", str(artifact), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ok"] and shown["manifest"] == Manifest.read(artifact).to_json()
    assert main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    for expected in ("input_ids", "past_key_values.{i}.key", "present.{i}.value", "model.onnx.data", "parity"):
        assert expected in text
