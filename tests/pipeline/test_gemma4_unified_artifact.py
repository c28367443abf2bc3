"""A Gemma 4 unified multimodal checkpoint (tests/support/gemma4.py's UNIFIED with its image-patch and audio-frame
embedders) builds its text decoder: the artifact matches the reference on prompts past twice the window in a
left-padded batch, its 20 greedy tokens are transformers', and the left-out inputs are logged once and recorded."""

from __future__ import annotations

import json

import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.cli.main import main
from gemma_export.manifest import Manifest
from gemma_export.runtime.session import OrtDecoder, generate
from gemma_export.verify import gate as verify
from gemma_export.verify.reference import TorchDecoder
from tests.support import gemma4
from tests.support.transformers_oracle import hf_greedy, long_and_padded

TOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint, artifact, the build's stderr), built once through the CLI."""
    root = tmp_path_factory.mktemp("gemma4-unified")
    checkpoint = gemma4.save_unified(root / "checkpoint", multimodal=True)
    out = root / "artifact"
    return checkpoint, out


def test_build_logs_and_records_the_unexported_inputs(built, capfd) -> None:
    checkpoint, out = built
    assert main(["build", str(checkpoint), "-o", str(out), "--target", "ort-cpu"]) == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "NOT exported" in line]
    assert len(lines) == 1 and "vision and audio" in lines[0] and "gemma4_unified" in lines[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["not_exported"] == ["vision", "audio"]
    assert manifest["model"]["source_model_type"] == "gemma4_unified"
    assert manifest["model"]["type"] == "gemma4_unified_text" and manifest["parity"]["passed"]


def test_artifact_matches_reference_and_transformers(built) -> None:
    import transformers

    checkpoint, out = built
    if not (out / "manifest.json").exists():
        assert main(["build", str(checkpoint), "-o", str(out), "--target", "ort-cpu", "--json"]) == 0
    cfg, model = load.load_model(checkpoint)
    manifest = Manifest.read(out)
    report = verify.compare(TorchDecoder(model), OrtDecoder(out, manifest), cfg, TOL, decode_steps=8)
    assert max(n for c in report.cases for n in c.prompt_lengths) > 2 * cfg.max_window
    assert any(len(set(c.prompt_lengths)) == 2 for c in report.cases)  # a left-padded batch
    assert report.prefill_max_abs_error <= TOL and report.decode_max_abs_error <= TOL
    hf = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = long_and_padded(cfg)
    expected = hf_greedy(hf, prompts, 20, cfg.pad_token_id)
    assert generate(OrtDecoder(out, manifest), prompts, 20, pad_id=cfg.pad_token_id) == expected
    # one cache per producing layer (0-4), the global layer's with its own head dim and KV heads
    state = {s.input: s.shape for s in manifest.state}
    assert sorted(state) == sorted(f"past_key_values.{i}.{kind}" for i in range(5) for kind in ("key", "value"))
    assert state["past_key_values.3.key"] == ["batch", 1, 0, 32] and state["past_key_values.4.key"][1:] == [2, 0, 16]
