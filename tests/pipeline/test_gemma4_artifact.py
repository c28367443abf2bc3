"""Gemma 4 artifacts (tests/support/gemma4.py's E, dense and MoE shapes) against the reference and transformers:
prompts past twice the window in a left-padded batch, 20 greedy tokens, one KV cache per producing layer with
its own head dim in the manifest's state, the windowed layout, --target onnx, --quant int8 / int4,
logits_to_keep. Each artifact is built once per module; each model is traced once per cache layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.manifest import Manifest
from gemma_export.models.gemma import kv_cache_bytes
from gemma_export.pipeline import package, quantize, trace
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtDecoder, generate, left_pad, positions
from gemma_export.targets.genai_config import GENAI_CONFIG
from gemma_export.verify import gate as verify
from gemma_export.verify.reference import TorchDecoder
from tests.support import gemma4
from tests.support.transformers_oracle import hf_greedy, long_and_padded

TOL = 1e-4
# Random-weight agreement gates. The tiny Gemma 4 models are more sensitive to rounding than test_quantize.py's
# Gemma 2/3 ones (attention scale 1 on unit-norm q/k heads): int8 block-32 rounding of the same weights done in
# PyTorch (no export involved) measures KL 0.0036, top-1 0.95 on the long prompt, as the int8 artifact does
# (KL 0.0034 / 0.0099, top-1 0.92 / 0.85 prefill / decode); the int4 artifact: KL 0.16 / 0.10, top-1 0.24 / 0.71.
GATES = {"int8": {"min_top1": 0.8, "max_kl": 0.02}, "int4": {"min_top1": 0.2, "max_kl": 0.3}}
BUILDS = {
    "e": ("e", {}),
    "dense": ("dense", {}),
    "moe": ("moe", {}),
    "e-windowed": ("e", {"cache_layout": "windowed"}),
    "e-onnx": ("e", {"target": "onnx"}),
    # quantized: random_checkpoint's weights (std 1 / sqrt(fan_in)) and the published soft-cap, whose logits are
    # neither flat nor saturated, as tests/pipeline/test_quantize.py's; the transformers fixtures' are near flat
    "e-int8": ("e-random", {"quant": "int8", **GATES["int8"]}),
    "dense-int4": ("dense-random", {"quant": "int4", **GATES["int4"]}),
}


@pytest.fixture(scope="module")
def g4_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from gemma_export.dev import random_checkpoint

    root = tmp_path_factory.mktemp("gemma4")
    out = {shape: gemma4.save_checkpoint(root / shape, shape) for shape in gemma4.SHAPES}
    for shape in ("e", "dense"):
        config = {**gemma4.CONFIGS[shape], "final_logit_softcapping": 30.0}
        out[f"{shape}-random"] = random_checkpoint.write_random_checkpoint(root / f"{shape}-random", config)
    return out


@pytest.fixture(scope="module", autouse=True)
def trace_once_per_model():
    """Trace each (model, cache layout) once; every build gets its own copy, its later stages run for real."""
    traced: dict[str, ir.Model] = {}
    export = trace.export_decoder

    def cached(model):
        key = json.dumps([model.cfg.to_json(), model.cache_layout], sort_keys=True)
        if key not in traced:
            traced[key] = export(model)
        return ir.from_proto(ir.to_proto(traced[key]))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trace, "export_decoder", cached)
        patch.setitem(
            quantize.DEFAULTS,
            "int4-gptq",
            dataclasses.replace(
                quantize.DEFAULTS["int4-gptq"], gptq=quantize.GptqSettings(tokens=1024, sequence_length=256)
            ),
        )
        yield


@pytest.fixture(scope="module")
def g4_built(g4_checkpoints, tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            shape, options = BUILDS[name]
            out = tmp_path_factory.mktemp("gemma4-artifacts") / name
            build(g4_checkpoints[shape], out, BuildOptions(**options), Stages(quiet=True))
            cache[name] = out
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["e", "dense", "moe", "e-windowed", "e-onnx"])
def test_artifact_matches_reference(g4_built, g4_checkpoints, name) -> None:
    artifact = g4_built(name)
    shape, options = BUILDS[name]
    cfg, model = load.load_model(g4_checkpoints[shape])
    if "cache_layout" in options:
        model.use_cache_layout(options["cache_layout"])
    manifest = Manifest.read(artifact)
    report = verify.compare(TorchDecoder(model), OrtDecoder(artifact, manifest), cfg, TOL, decode_steps=8)
    assert max(n for c in report.cases for n in c.prompt_lengths) > 2 * cfg.max_window
    assert any(len(set(c.prompt_lengths)) == 2 for c in report.cases)  # a left-padded batch
    assert report.prefill_max_abs_error <= TOL and report.decode_max_abs_error <= TOL
    assert manifest.parity.passed


@pytest.mark.parametrize("name", ["e", "dense", "moe", "e-windowed"])
def test_artifact_greedy_tokens_match_transformers(g4_built, g4_checkpoints, name) -> None:
    import transformers

    shape, _ = BUILDS[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(g4_checkpoints[shape], dtype=torch.float32).eval()
    cfg, _ = load.load_model(g4_checkpoints[shape])
    prompts = long_and_padded(cfg)
    expected = hf_greedy(hf, prompts, 20, cfg.pad_token_id)
    artifact = g4_built(name)
    assert generate(OrtDecoder(artifact, Manifest.read(artifact)), prompts, 20, pad_id=cfg.pad_token_id) == expected


@pytest.mark.parametrize("name", ["e", "e-windowed"])
def test_state_is_one_cache_per_producing_layer(g4_built, g4_checkpoints, name) -> None:
    """E shape: layers 5-7 read layers 4 and 3; only layers 0-4 carry a cache, each with its own head dim."""
    cfg, _ = load.load_model(g4_checkpoints["e"])
    manifest = Manifest.read(g4_built(name))
    state = {s.input: s for s in manifest.state}
    assert sorted(state) == sorted(f"past_key_values.{i}.{kind}" for i in range(5) for kind in ("key", "value"))
    windowed = name == "e-windowed"
    for i in range(5):
        shape = state[f"past_key_values.{i}.key"].shape
        slots = cfg.sliding_window - 1 if windowed and cfg.window_of(i) else 0
        assert shape == ["batch", 1, slots, cfg.head_dim_of(i)]
    assert state["past_key_values.3.key"].shape[3] == 32  # the global layer's wider head
    # every present is its past's buffer (README "Shared KV buffers"), the windowed layers' fixed ones excepted
    assert {s.input for s in manifest.state if s.shared_buffer} == {
        s.input for s in manifest.state if not (windowed and cfg.window_of(int(s.input.split(".")[1])))
    }


def test_cache_bytes_match_the_state(g4_built, g4_checkpoints) -> None:
    """What the artifact's state holds after a prompt is what kv_cache_bytes counts (shared, per-layer shapes)."""
    cfg, _ = load.load_model(g4_checkpoints["e"])
    artifact = g4_built("e")
    decoder = OrtDecoder(artifact, Manifest.read(artifact))
    prompt = long_and_padded(cfg)[0]
    ids, mask = left_pad([prompt], cfg.pad_token_id)
    decoder.reserve(len(prompt))
    _, cache = decoder.step(ids, mask, positions(mask), decoder.empty_cache(1))
    assert sum(c.nbytes for c in cache) == kv_cache_bytes(cfg, len(prompt))
    assert kv_cache_bytes(cfg, len(prompt), shared=False) > kv_cache_bytes(cfg, len(prompt))


@pytest.mark.parametrize("name", ["e-int8", "dense-int4"])
def test_quantized_artifact_passes_its_gate(g4_built, name) -> None:
    manifest = Manifest.read(g4_built(name))
    assert manifest.parity.passed
    assert manifest.quantization is not None


def test_per_layer_embeddings_are_quantized_for_their_lookup(g4_built) -> None:
    """E2B's per-layer table is half its weights (262144 x 8960): a quantized build must not keep it float32."""
    artifact = g4_built("e-int8")
    record = Manifest.read(artifact).quantization
    assert "model.per_layer_inputs.embed.weight" in record.quantized["lookup_tables"]
    proto = onnx.load(str(artifact / package.MODEL_FILE), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    assert "model.per_layer_inputs.embed.weight" not in inits
    lookups = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert {n.input[0] for n in lookups} >= {"model.per_layer_inputs.embed.weight_Q8"}
    assert inits["model.per_layer_inputs.embed.weight_Q8"].data_type == onnx.TensorProto.UINT8


def test_logits_to_keep_is_the_last_rows(g4_built, g4_checkpoints) -> None:
    cfg, _ = load.load_model(g4_checkpoints["e"])
    artifact = g4_built("e")
    decoder = OrtDecoder(artifact, Manifest.read(artifact))
    ids, mask = left_pad(long_and_padded(cfg), cfg.pad_token_id)
    full, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(2))
    last, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(2), logits_to_keep=1)
    assert last.shape[1] == 1 and np.abs(last[:, 0] - full[:, -1]).max() <= 1e-5


def test_no_genai_config_for_kv_sharing_or_mixed_head_dims(g4_built) -> None:
    """onnxruntime-genai 0.18 sizes every layer's cache from one head_size / num_key_value_heads and names them
    0..n-1: it cannot feed a Gemma 4 artifact, which gets no genai_config.json rather than a wrong one."""
    for name in ("e", "dense"):
        assert not (g4_built(name) / GENAI_CONFIG).exists()
