"""The verify stage's memory: the reference runs first and is freed (its memory-mapped weights unmapped)
before ONNX Runtime opens the artifact, whose session holds no pre-packed second copy of the weights."""

from __future__ import annotations

import shutil
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from gemma_export import build as build_mod
from gemma_export import load, verify
from gemma_export.build import BuildOptions, build
from gemma_export.config import parse_config
from gemma_export.progress import Stages
from gemma_export.random_checkpoint import TINY_CONFIGS
from gemma_export.runtime import OrtDecoder


class _Echo:
    """A decoder whose logits are a fixed function of the inputs; it logs every step and cache it starts."""

    def __init__(self, vocab_size: int, log: list[str], tag: str) -> None:
        self.vocab_size, self.log, self.tag = vocab_size, log, tag

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        self.log.append(f"{self.tag}:cache")
        return [np.zeros((batch, 1), np.float32)]

    def step(self, input_ids, attention_mask, position_ids, cache):
        self.log.append(f"{self.tag}:step")
        seen = cache[0] + input_ids.sum(-1, keepdims=True)
        logits = np.sin(seen[:, :, None] + position_ids[:, :, None] * np.arange(self.vocab_size)).astype(np.float32)
        return logits, [seen]


def test_reference_runs_first_and_is_dropped_before_the_artifact_opens(tmp_path) -> None:
    cfg = parse_config(TINY_CONFIGS["gemma3_text"])
    log: list[str] = []
    alive: list[weakref.ref] = []
    seen_at_open: list[bool] = []

    def reference() -> _Echo:
        ref = _Echo(cfg.vocab_size, log, "ref")
        alive.append(weakref.ref(ref))
        return ref

    def artifact() -> _Echo:
        seen_at_open.append(alive[0]() is not None)
        return _Echo(cfg.vocab_size, log, "art")

    pairs = list(verify.paired_logits(reference, artifact, cfg, spill_dir=tmp_path))
    assert seen_at_open == [False]  # the reference was gone when the artifact was opened
    first_art = log.index("art:cache")
    assert all(entry.startswith("ref") for entry in log[:first_art])
    assert all(entry.startswith("art") for entry in log[first_art:])
    assert log.count("ref:step") == log.count("art:step") == len(pairs)
    # the same inputs in the same order: identical decoders agree exactly, pass by pass, through the spill file
    assert all(np.array_equal(ref, art) and ref.shape[-1] == cfg.vocab_size for *_, ref, art in pairs)
    assert {phase for _, _, phase, _, _ in pairs} == {"prefill", "decode"}
    assert list(tmp_path.iterdir()) == []  # the spill file is unlinked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_build_unmaps_the_checkpoint_before_opening_a_lean_session(checkpoints, tmp_path, monkeypatch) -> None:
    checkpoint = shutil.copytree(checkpoints["gemma3_text"], tmp_path / "ckpt")  # mapped by this build alone
    params: list[weakref.ref] = []
    opened: list[dict] = []
    load_model, ort_decoder = load.load_model, build_mod.OrtDecoder

    def tracked_load(*args, **kwargs):
        cfg, model = load_model(*args, **kwargs)
        params.extend(weakref.ref(p) for p in model.parameters())
        return cfg, model

    def tracked_decoder(*args, **kwargs) -> OrtDecoder:
        maps = Path("/proc/self/maps").read_text()
        decoder = ort_decoder(*args, **kwargs)
        options = decoder.session.get_session_options()
        opened.append({
            "parameters_alive": sum(p() is not None for p in params),
            "checkpoint_mapped": str(checkpoint.resolve()) in maps,
            "prepacking": options.get_session_config_entry("session.disable_prepacking") != "1",
            "arena": options.enable_cpu_mem_arena,
        })  # fmt: skip
        return decoder

    monkeypatch.setattr(load, "load_model", tracked_load)
    monkeypatch.setattr(build_mod, "OrtDecoder", tracked_decoder)
    stages = Stages(quiet=True)
    manifest = build(checkpoint, tmp_path / "out", BuildOptions(), stages)
    assert manifest["parity"]["passed"] and params
    assert all(isinstance(s["peak_rss"], int) and s["peak_rss"] > 0 for s in stages.to_json())  # VmHWM per stage
    assert opened == [{"parameters_alive": 0, "checkpoint_mapped": False, "prepacking": False, "arena": False}]
