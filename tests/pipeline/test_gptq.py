"""GPTQ (pipeline/gptq.py) and the calibrate stage that runs it (pipeline/calibrate.py), on small random weights
and tiny random models, without building an artifact (the builds are tests/pipeline/test_quantize.py's).

What must hold: the packed codes, scales and zero points are exactly what MatMulNBits computes with; GPTQ
lowers a layer's output error below round-to-nearest's on the inputs it was calibrated on, and so does the
whole calibrated model; the reference model is exactly as it was afterwards (verify compares against it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gemma_export.checkpoint import load
from gemma_export.dev import random_checkpoint
from gemma_export.errors import BadInput
from gemma_export.pipeline import calibrate, gptq, quantize

SPEC = quantize.DEFAULTS["int4-gptq"]
LAYERS = {"gemma3_text": 2, "recurrent_gemma": 3}  # Griffin: (recurrent, recurrent, attention)


def matmulnbits(weight: gptq.QWeight, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    """x @ W^T through ONNX Runtime's MatMulNBits, with the packed initializers as the quantize stage writes them."""
    packed, scales, zero_points = weight.pack()
    n, k = weight.codes.shape[0], weight.in_features
    inits = [numpy_helper.from_array(a, name) for a, name in ((packed, "B"), (scales, "S"), (zero_points, "Z"))]
    node = helper.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=weight.bits, block_size=weight.block_size, accuracy_level=accuracy_level)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs like a real layer's: correlated features of very different magnitudes (a few outliers)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5
    magnitude = torch.exp(1.5 * torch.randn(k, generator=g))
    return (torch.randn(rows, k, generator=g) @ mixing) * magnitude


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.double().T @ x.double() / x.shape[0]


@pytest.mark.parametrize(
    ("bits", "block_size", "k"),
    [(4, 32, 96), (4, 16, 80), (4, 32, 72), (8, 32, 72), (8, 128, 256)],
    ids=["int4", "int4-odd-blocks", "int4-padded", "int8-padded", "int8-b128"],
)
def test_packed_weights_are_exactly_what_matmulnbits_computes_with(bits, block_size, k) -> None:
    """The graph's output is x @ dequantize(W)^T: odd block counts (4-bit zero points two to a byte, each row
    padded) and K not a multiple of the block (MatMulNBits pads with zeros) included."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, k, generator=g)
    x = correlated_inputs(256, k)
    weight = gptq.gptq(w, hessian(x), bits, block_size)
    assert int(weight.codes.max()) < 2**bits and int(weight.zero_points.max()) < 2**bits
    dequantized = weight.dequantize()
    assert dequantized.shape == w.shape
    probe = x[:7].numpy()
    expected = probe.astype(np.float64) @ dequantized.double().numpy().T
    np.testing.assert_allclose(matmulnbits(weight, probe), expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())


def test_gptq_lowers_the_layer_output_error_below_round_to_nearest() -> None:
    """||X W^T - X Q^T|| on the calibration inputs X: round-to-nearest > with the range search > GPTQ."""
    k, n = 256, 64
    x = correlated_inputs(2048, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) / k**0.5

    def error(weight: gptq.QWeight) -> float:
        return float(((x @ (w - weight.dequantize()).T) ** 2).mean())

    nearest = error(gptq.round_to_nearest(w, 4, 32))
    searched = error(gptq.round_to_nearest(w, 4, 32, steps=10))
    calibrated = error(gptq.gptq(w, hessian(x), 4, 32))
    assert calibrated < 0.5 * nearest, (calibrated, searched, nearest)  # measured 0.23 (searched 0.94)
    assert calibrated < searched


def test_quantizing_never_writes_to_the_weight_or_the_hessian() -> None:
    w = torch.randn(16, 64)
    h = hessian(correlated_inputs(128, 64))
    w_before, h_before = w.clone(), h.clone()
    gptq.gptq(w, h, 4, 32)
    gptq.round_to_nearest(w, 4, 32, steps=10)
    assert torch.equal(w, w_before) and torch.equal(h, h_before)


# ---- the calibrate stage, on tiny random models --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gptq-checkpoints")
    out = {}
    for model_type, layers in LAYERS.items():
        config = copy.deepcopy(random_checkpoint.TINY_CONFIGS[model_type])
        config["num_hidden_layers"] = layers
        if "layer_types" in config:
            config["layer_types"] = config["layer_types"][:layers]
        out[model_type] = random_checkpoint.write_random_checkpoint(root / model_type, config)
    return out


def sequences(checkpoint: Path, length: int = 128, tokens: int = 512) -> torch.Tensor:
    text, _ = calibrate.calibration_text(None)
    ids = calibrate.tokenizer_of(checkpoint).encode(text).ids
    return calibrate.token_sequences(ids, 2, length, tokens)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, nn.Linear)}


@pytest.mark.parametrize("model_type", list(LAYERS))
def test_calibration_leaves_the_reference_model_exactly_as_it_was(tiny, model_type) -> None:
    _, model = load.load_model(tiny[model_type])
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    calibrated = calibrate.calibrate(model, sequences(tiny[model_type]), SPEC, {"source": "test", "sha256": "0"})
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (parameter, values) in before.items():
        assert after[name] is parameter and torch.equal(parameter, values), name
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hook left behind
    assert calibrated.weights.keys() == linears(model).keys()
    assert all(calibrated.originals[name] is m.weight for name, m in linears(model).items())
    for name, weight in calibrated.weights.items():
        assert weight.bits == SPEC.width_of(name).bits and weight.block_size == SPEC.width_of(name).block_size
    assert calibrated.record["calibration"] == {"source": "test", "sha256": "0", "tokens": 512, "sequences": 4}


def test_projections_are_quantized_in_groups_that_share_their_input(tiny) -> None:
    """Gemma's layers run alone on their kept inputs; RecurrentGemma's (not called as modules) from the start."""
    _, gemma = load.load_model(tiny["gemma3_text"])
    runner = calibrate._Runner(gemma, sequences(tiny["gemma3_text"], 32, 64))
    assert runner.per_layer
    attention, mlp = "layers.0.self_attn.", "layers.0.mlp."
    assert runner.groups(0, linears(gemma)) == [
        [attention + "q_proj", attention + "k_proj", attention + "v_proj"], [attention + "o_proj"],
        [mlp + "gate_proj", mlp + "up_proj"], [mlp + "down_proj"],
    ]  # fmt: skip
    _, griffin = load.load_model(tiny["recurrent_gemma"])
    runner = calibrate._Runner(griffin, sequences(tiny["recurrent_gemma"], 32, 64))
    assert not runner.per_layer
    recurrent, mlp = "layers.0.temporal_block.", "layers.0.mlp_block."
    assert runner.groups(0, linears(griffin)) == [
        [recurrent + "linear_y", recurrent + "linear_x"], [recurrent + "linear_out"],
        [mlp + "gate_proj", mlp + "up_proj"], [mlp + "down_proj"],
    ]  # fmt: skip


def test_the_calibrated_model_is_closer_to_the_reference_than_round_to_nearest(tiny) -> None:
    """The whole model's logits on its calibration text, every projection replaced: GPTQ's error is the lower."""
    _, model = load.load_model(tiny["gemma3_text"])
    calibration = sequences(tiny["gemma3_text"])
    calibrated = calibrate.calibrate(model, calibration, SPEC, {"source": "test", "sha256": "0"})

    def logits(m: nn.Module) -> torch.Tensor:
        ids = calibration[:2]
        state = [spec.empty(2) for spec in m.state_specs()]
        with torch.no_grad():
            return m(ids, torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids), state)[0]

    def error(replace) -> float:
        copy_ = copy.deepcopy(model)
        for name, m in linears(copy_).items():
            m.weight.data = replace(name, m.weight.data)
        return float(((logits(copy_) - reference) ** 2).mean())

    reference = logits(model)
    rtn = error(lambda name, w: gptq.round_to_nearest(w, SPEC.width_of(name).bits, 32).dequantize())
    ours = error(lambda name, w: calibrated.weights[name].dequantize())
    assert ours < 0.8 * rtn, (ours, rtn)  # measured 0.59


def test_token_sequences_start_with_bos_and_keep_the_text_in_order() -> None:
    ids = [2, *range(10, 1010), 2, *range(2000, 2100)]  # two documents, each with its <bos>
    rows = calibrate.token_sequences(ids, bos=2, length=100, tokens=300)
    assert rows.shape == (3, 100) and (rows[:, 0] == 2).all()
    assert rows[:, 1:].reshape(-1).tolist() == list(range(10, 10 + 297))
    short = calibrate.token_sequences([2, *range(10, 400)], bos=2, length=1024, tokens=8192)
    assert short.shape == (1, 391)  # a text shorter than one sequence: all of it, once
    with pytest.raises(BadInput, match="at least 256"):
        calibrate.token_sequences(list(range(10, 100)), bos=2, length=1024, tokens=8192)


def test_the_calibration_text_is_recorded_by_name_and_hash(tmp_path) -> None:
    text, record = calibrate.calibration_text(None)
    assert record["source"] == "built-in" and len(text) > 30_000  # >= 8192 Gemma tokens of English
    mine = tmp_path / "notes.txt"
    mine.write_text("Some text of my own.\n", encoding="utf-8")
    assert calibrate.calibration_text(mine)[1]["source"] == "notes.txt"  # a name, not a machine's path
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(BadInput, match="not a readable UTF-8 text file"):
        calibrate.calibration_text(tmp_path / "binary.bin")
