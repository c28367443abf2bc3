"""Shared KV buffers (README "Shared KV buffers"): a lowered (`ort-cpu`) artifact's growing caches may be buffers
longer than the past, bound as both the past input and the present output; the graph writes the new positions
in place, through either attention path (GroupQueryAttention; Attention-23 for several new tokens with a past
in a batch).

Each test drives the same token stream twice: the plain contract (a past of exactly the past's length, the
present a new array, fed back) with `session.run`, and shared buffers; logits and caches must be identical.
Every Gemma generation (conftest's `artifact`: the default build, ort-cpu, full cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gemma_export.checkpoint import load
from gemma_export.manifest import Manifest
from gemma_export.pipeline import package
from gemma_export.runtime.session import OrtDecoder, left_pad, positions
from gemma_export.verify.reference import TorchDecoder


def stream(vocab: int, pad: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, mask, positions) per call: a left-padded batch of 2 prefilled in chunks of 7 (a past with several
    new tokens at batch 2: Attention-23), then 12 decode steps; 40 positions, past every test window (16)."""
    rng = np.random.default_rng(0)
    ids, mask = left_pad([rng.integers(3, vocab, 28).tolist(), rng.integers(3, vocab, 19).tolist()], pad)
    pos = positions(mask)
    calls = [(ids[:, c : c + 7], mask[:, : c + 7], pos[:, c : c + 7]) for c in range(0, ids.shape[1], 7)]
    for _ in range(12):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        calls.append((rng.integers(3, vocab, (2, 1)), mask, pos))
    return calls


def plain_run(artifact: Path, manifest: dict, calls) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The plain contract: every present a new array, fed back as the next past."""
    session = ort.InferenceSession(str(artifact / package.MODEL_FILE), providers=["CPUExecutionProvider"])
    state = manifest.state
    cache = [np.zeros([2 if d == "batch" else d for d in s.shape], s.dtype) for s in state]
    logits = []
    for ids, mask, pos in calls:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        out = session.run(None, {**feed, **{s.input: c for s, c in zip(state, cache, strict=True)}})
        logits.append(out[0])
        cache = out[1:]
    return logits, cache


def test_growing_caches_are_marked_shared(artifact, checkpoint) -> None:
    cfg, _ = load.load_model(checkpoint)
    manifest = Manifest.read(artifact)
    assert [s.shared_buffer for s in manifest.state] == [True] * 2 * cfg.num_hidden_layers
    for out in manifest.outputs[1:]:
        assert out.shape[2] == "present_sequence_length"


@pytest.mark.parametrize("reserve", [64, 0], ids=["reserved", "growing"])
def test_shared_buffers_compute_what_the_plain_contract_does(artifact, reserve) -> None:
    """Bit for bit, both attention paths; `growing`: no reservation, the buffers double as the context grows."""
    manifest = Manifest.read(artifact)
    cfg = manifest.model.config
    calls = stream(cfg.vocab_size, cfg.pad_token_id)
    want_logits, want_cache = plain_run(artifact, manifest, calls)

    decoder = OrtDecoder(artifact, manifest)
    decoder.reserve(reserve)
    cache = decoder.empty_cache(2)
    capacities = []
    for (ids, mask, pos), want in zip(calls, want_logits, strict=True):
        logits, cache = decoder.step(ids, mask, pos, cache)
        np.testing.assert_array_equal(logits, want)
        capacities.append(cache[0].base.shape[2])
    for got, want in zip(cache, want_cache, strict=True):
        np.testing.assert_array_equal(got, want)
    if reserve:  # one buffer for the whole stream
        assert set(capacities) == {reserve}
    else:  # 7 -> 14 -> 28 -> 56 positions, each a copy of the last
        assert capacities[:4] == [7, 14, 28, 28] and capacities[-1] == 56


def test_the_graph_writes_in_place_and_keeps_the_rest_of_the_buffer(artifact) -> None:
    """Through io binding, as a C++ or Java client would: the same memory in and out, the new positions written
    where they belong, the slots past the total length never touched (NaN sentinels)."""
    manifest = Manifest.read(artifact)
    cfg, state = manifest.model.config, manifest.state
    calls = stream(cfg.vocab_size, cfg.pad_token_id)
    _, want_cache = plain_run(artifact, manifest, calls)

    session = ort.InferenceSession(str(artifact / package.MODEL_FILE), providers=["CPUExecutionProvider"])
    capacity = 48
    arrays = [np.full([2 if d == "batch" else d or capacity for d in s.shape], np.nan, np.float32) for s in state]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    binding = session.io_binding()
    for s, v in zip(state, values, strict=True):
        binding.bind_ortvalue_input(s.input, v)
    for ids, mask, pos in calls:
        for name, x in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            binding.bind_cpu_input(name, np.ascontiguousarray(x))
        binding.clear_binding_outputs()
        binding.bind_output("logits")
        for s, v in zip(state, values, strict=True):
            binding.bind_ortvalue_output(s.output, v)
        session.run_with_iobinding(binding)
        assert [o.data_ptr() for o in binding.get_outputs()[1:]] == [v.data_ptr() for v in values]
    total = calls[-1][1].shape[1]
    for array, want in zip(arrays, want_cache, strict=True):
        np.testing.assert_array_equal(array[:, :, :total], want)
        assert np.isnan(array[:, :, total:]).all()


def test_a_foreign_cache_is_copied_in(artifact, checkpoint) -> None:
    """A cache the decoder did not make (here the reference's) is copied into a buffer, not written in place."""
    _, model = load.load_model(checkpoint)
    manifest = Manifest.read(artifact)
    cfg = manifest.model.config
    calls = stream(cfg.vocab_size, cfg.pad_token_id)
    reference, decoder = TorchDecoder(model), OrtDecoder(artifact, manifest)
    cache = reference.empty_cache(2)
    for ids, mask, pos in calls[:-1]:
        _, cache = reference.step(ids, mask, pos, cache)
    before = [c.copy() for c in cache]
    want, _ = reference.step(*calls[-1], cache)
    got, present = decoder.step(*calls[-1], cache)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    for c, b in zip(cache, before, strict=True):
        np.testing.assert_array_equal(c, b)  # the caller's arrays are left alone
    assert all(p.base is not c for p, c in zip(present, cache, strict=True))


def test_a_cut_prompt_then_shared_decode_steps(artifact) -> None:
    """generate's pattern: the prompt with logits_to_keep=1 (through run(): io binding cannot feed it), then
    one-token steps in shared buffers; the logits are the plain contract's last rows."""
    manifest = Manifest.read(artifact)
    cfg = manifest.model.config
    calls = stream(cfg.vocab_size, cfg.pad_token_id)
    ids, mask, pos = (np.concatenate([c[i] for c in calls[:4]], axis=1) if i != 1 else calls[3][1] for i in range(3))
    whole = [(ids, mask, pos), *calls[4:]]
    want_logits, want_cache = plain_run(artifact, manifest, whole)

    decoder = OrtDecoder(artifact, manifest)
    decoder.reserve(whole[-1][1].shape[1])
    cache = decoder.empty_cache(2)
    for call, want in zip(whole, want_logits, strict=True):
        logits, cache = decoder.step(*call, cache, logits_to_keep=1)
        assert logits.shape == (2, 1, cfg.vocab_size)
        np.testing.assert_allclose(logits, want[:, -1:], atol=1e-6, rtol=0)
    for got, want in zip(cache, want_cache, strict=True):
        np.testing.assert_array_equal(got, want)
