"""RecurrentGemma: our reference against transformers, the artifact against our reference, and the decode
state's constant size.

transformers' RecurrentGemma lets a left-padded row's padding leak into the first tokens' Conv1D (it has no
document mask there), so it is the oracle on unpadded batches; google-deepmind's implementation, which cuts
the Conv1D at document starts as we do, is the oracle for padded ones (models/test_griffin_deepmind.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.dev import random_checkpoint
from gemma_export.manifest import Manifest
from gemma_export.ops import rglru as rglru_op
from gemma_export.pipeline import package
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtDecoder, generate, left_pad, positions
from gemma_export.verify import gate as verify
from gemma_export.verify.reference import TorchDecoder

TOL = 1e-4
WINDOW = 8


@pytest.fixture(scope="module")
def griffin_checkpoint(tmp_path_factory) -> Path:
    import transformers

    config = transformers.RecurrentGemmaConfig(
        num_hidden_layers=6,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_window_size=WINDOW,
    )
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(config).eval()  # transformers' own init: realistic decays
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):  # zeros by default: make the (1 + w) offset matter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = tmp_path_factory.mktemp("griffin") / "ckpt"
    model.save_pretrained(out)
    random_checkpoint.write_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def hf_griffin(griffin_checkpoint):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(griffin_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def griffin_artifact(griffin_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("griffin-artifact") / "out"
    build(griffin_checkpoint, out, BuildOptions(), Stages(quiet=True))
    return out


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(4, 512, length - 1).tolist()] for _ in range(n)]


def our_logits(model, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = left_pad(batch, 0)
    decoder = TorchDecoder(model)
    logits, _ = decoder.step(ids, mask, positions(mask), decoder.empty_cache(len(batch)))
    return logits, mask


def hf_logits(hf, batch: list[list[int]]) -> np.ndarray:
    ids = torch.tensor(batch)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


def test_reference_matches_transformers(griffin_checkpoint, hf_griffin) -> None:
    _, model = load.load_model(griffin_checkpoint)
    batch = prompts(2, 2 * WINDOW + 5)
    assert np.abs(our_logits(model, batch)[0] - hf_logits(hf_griffin, batch)).max() <= TOL


def test_greedy_tokens_match_transformers_generate(griffin_checkpoint, hf_griffin, griffin_artifact) -> None:
    _, model = load.load_model(griffin_checkpoint)
    batch = prompts(2, WINDOW + 3, seed=1)
    ids = torch.tensor(batch)
    with torch.no_grad():
        out = hf_griffin.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False
        )
    expected = out[:, ids.shape[1] :].tolist()
    assert generate(TorchDecoder(model), batch, 20) == expected
    assert generate(OrtDecoder(griffin_artifact, Manifest.read(griffin_artifact)), batch, 20) == expected


def test_left_padded_rows_compute_what_they_compute_alone(griffin_checkpoint) -> None:
    """The Conv1D and the RG-LRU restart at position 0, so padding before a row changes nothing."""
    _, model = load.load_model(griffin_checkpoint)
    batch = [prompts(1, 2 * WINDOW + 3)[0], prompts(1, 5, seed=3)[0]]
    padded, _ = our_logits(model, batch)
    for row, p in enumerate(batch):
        alone, _ = our_logits(model, [p])
        assert np.abs(padded[row, -len(p) :] - alone[0]).max() <= 1e-5


def test_artifact_matches_reference_across_the_window(griffin_checkpoint, griffin_artifact) -> None:
    cfg, model = load.load_model(griffin_checkpoint)
    artifact = OrtDecoder(griffin_artifact, Manifest.read(griffin_artifact))
    report = verify.compare(TorchDecoder(model), artifact, cfg, TOL, decode_steps=2 * WINDOW)
    assert max(n for c in report.cases for n in c.prompt_lengths) > 2 * WINDOW
    assert report.prefill_max_abs_error <= TOL
    assert report.decode_max_abs_error <= TOL


def test_decode_state_is_constant_in_length(griffin_checkpoint, griffin_artifact) -> None:
    """Generate past 4x the window: every carried tensor keeps its shape, and the tokens stay right."""
    _, model = load.load_model(griffin_checkpoint)
    manifest = Manifest.read(griffin_artifact)
    artifact = OrtDecoder(griffin_artifact, manifest)
    shapes: list[list[tuple[int, ...]]] = []
    step = artifact.step

    def recording_step(ids, mask, pos, cache, logits_to_keep=0):
        logits, new = step(ids, mask, pos, cache, logits_to_keep)
        shapes.append([c.shape for c in new])
        return logits, new

    artifact.step = recording_step
    batch = [prompts(1, 5)[0], prompts(1, 3, seed=2)[0]]
    new_tokens = 4 * WINDOW + 3
    got = generate(artifact, batch, new_tokens)
    assert got == generate(TorchDecoder(model), batch, new_tokens)
    assert len(shapes) == new_tokens and all(s == shapes[0] for s in shapes)
    initial = [c.shape for c in artifact.empty_cache(2)]
    assert shapes[0] == initial
    assert all("past_sequence_length" not in str(v.shape) for v in manifest.inputs)


def test_graph_has_one_op_per_block_and_no_unrolled_time_loop(griffin_checkpoint, griffin_artifact) -> None:
    cfg, _ = load.load_model(griffin_checkpoint)
    proto = onnx.load(str(griffin_artifact / package.MODEL_FILE), load_external_data=False)
    custom = [n.op_type for n in proto.graph.node if n.domain == "ai.gemma"]
    assert custom == ["RGLRU" for kind in cfg.block_types if kind == "recurrent"]
    # --target ort-cpu (the default) lowers attention to GroupQueryAttention in an If (tests/targets/test_ort_cpu.py)
    lowered = [n.op_type for node in proto.graph.node if node.op_type == "If" for a in node.attribute
               for n in a.g.node if n.op_type == "GroupQueryAttention"]  # fmt: skip
    assert len(lowered) == cfg.block_types.count("attention")
    functions = {f.name: f for f in proto.functions}
    assert set(functions) == {"RGLRU"}
    assert [n.op_type for n in functions["RGLRU"].node].count("Scan") == 1
    assert not any(n.op_type in ("Loop", "Scan") for n in proto.graph.node)


def _rglru_without(monkeypatch, *, normalisation: bool = True, reset: bool = True) -> None:
    reference = rglru_op.rglru_reference

    def variant(x, log_a, reset_mask, h0):
        if not reset:
            reset_mask = torch.zeros_like(reset_mask)
        if normalisation:
            return reference(x, log_a, reset_mask, h0)
        # drop sqrt(1 - a^2): the same recurrence on the raw gated input
        a = torch.exp(log_a.float()) * ~reset_mask[:, :, None]
        h, ys = h0.float(), []
        for t in range(x.shape[1]):
            h = a[:, t] * h + x[:, t].float()
            ys.append(h)
        return torch.stack(ys, 1).to(x.dtype), h

    monkeypatch.setattr(rglru_op, "rglru_reference", variant)


@pytest.mark.parametrize("broken", ["no-normalisation", "no-reset"])
def test_rglru_normalisation_and_reset_matter(griffin_checkpoint, hf_griffin, monkeypatch, broken) -> None:
    _, model = load.load_model(griffin_checkpoint)
    batch = prompts(2, 2 * WINDOW + 5)
    ref = hf_logits(hf_griffin, batch)
    assert np.abs(our_logits(model, batch)[0] - ref).max() <= TOL
    _rglru_without(monkeypatch, normalisation=broken != "no-normalisation", reset=broken != "no-reset")
    # without the reset, the first step is also scaled by sqrt(1 - a^2) instead of passing through
    assert np.abs(our_logits(model, batch)[0] - ref).max() > 10 * TOL


def test_inspect_and_verify_a_griffin_artifact(griffin_artifact, griffin_checkpoint, capsys) -> None:
    from gemma_export.cli.main import main

    assert main(["inspect", str(griffin_artifact)]) == 0
    text = capsys.readouterr().out
    assert "past_state.{i}.recurrent" in text and f"window {WINDOW}" in text
    assert main(["verify", str(griffin_artifact), "--checkpoint", str(griffin_checkpoint)]) == 0
