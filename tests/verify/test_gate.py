"""The fp32 parity gate (verify.ParityReport): float32 rounding passes it, real bugs fail it.

A bug is made by running a second reference that has it (the gate compares any two decoders): a swapped
local/global assignment, a dropped softcap, a norm without its (1 + w) offset (the same as a correct norm whose
weight is w - 1), a window off by one, a RoPE base of the other layer type. The real-weight cases are in
tests/dev/test_real_checkpoint.py; these run on the tiny random checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.verify import gate as verify
from gemma_export.verify.measures import Closeness
from gemma_export.verify.reference import TorchDecoder
from tests.support.gate_bugs import bugs


def test_correct_model_passes_with_float32_rounding(checkpoint) -> None:
    """The reference against itself in float64 vs float32: pure rounding, far inside the gate."""
    cfg, model = load.load_model(checkpoint)
    _, model64 = load.load_model(checkpoint, dtype=torch.float64)
    report = verify.compare(TorchDecoder(model64), TorchDecoder(model), cfg)
    assert report.passed, report.summary()
    assert 0 < max(report.prefill_error, report.decode_error) < verify.DEFAULT_TOLERANCE / 10
    assert report.to_json()["prefill_top1"] == 1.0


def test_gate_fails_on_each_bug(checkpoint, model_type) -> None:
    cfg, model = load.load_model(checkpoint)
    found = bugs(model)
    assert len(found) >= (1 if model_type == "gemma" else 3)
    for name, broken in found.items():
        report = verify.compare(TorchDecoder(model), TorchDecoder(broken), cfg, decode_steps=2)
        assert not report.passed, f"{name}: {report.summary()}"
        # by a wide margin: the gate does not sit at the edge of what bugs produce
        assert max(report.prefill_error, report.decode_error) > 50 * verify.DEFAULT_TOLERANCE, name


def test_gate_is_relative_to_the_logit_scale() -> None:
    """The same logits, scaled: the same verdict (an absolute gate would flip between the two)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 300)).astype(np.float32)
    art = ref + rng.normal(size=ref.shape).astype(np.float32) * 1e-6
    for scale in (0.5, 50.0):
        report = verify.ParityReport(tolerance=1e-5)
        report.phases["prefill"].add(Closeness.of(ref * scale, art * scale))
        assert report.passed and report.logit_scale == pytest.approx(np.abs(ref).max() * scale)
        # (the same up to float32 rounding of the scaled differences, ~1e-6 apart)
        assert report.prefill_error == pytest.approx(np.abs(ref - art).max() / np.abs(ref).max(), rel=0.05)


def test_top1_flips_fail_even_when_the_error_looks_small() -> None:
    """Many clear choices flipped fail, even when the error is small relative to a huge logit elsewhere."""
    ref = np.zeros((100, 10), np.float32)
    ref[:, 3] = 1.0  # each row decisive: margin 1
    ref[0, 9] = 1e6  # a huge logit makes any abs error look small
    art = ref.copy()
    art[1:3, 4] = 1.5  # flips 2 of 100 rows
    report = verify.ParityReport(tolerance=1e-5)
    report.phases["prefill"].add(Closeness.of(ref, art))
    assert report.prefill_error < 1e-5 and report.top1("prefill") == 0.98 and not report.passed
    assert report.phases["prefill"].max_flipped_margin == 1.0
    assert "top-1 prefill 0.9800" in report.summary()
    art[2, 4] = 0.0  # one flip in 100: within the gate (a near-tie's rounding may do that)
    report = verify.ParityReport(tolerance=1e-5)
    report.phases["prefill"].add(Closeness.of(ref, art))
    assert report.passed
