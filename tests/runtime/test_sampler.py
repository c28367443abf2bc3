"""The specified sampler (gemma_export/runtime/sampler.py), which the C++ and Java runtimes implement too."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gemma_export.runtime.sampler import SplitMix64, sample_row
from gemma_export.runtime.session import Sampling, pick


def test_splitmix64_matches_the_reference_vectors() -> None:
    # The published C reference (Vigna's splitmix64.c) from seed 1234567, as Rust's rand_xoshiro tests it
    rng = SplitMix64(1234567)
    assert [rng.next_u64() for _ in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821,
    ]  # fmt: skip
    doubles = [SplitMix64(s).next_double() for s in range(1000)]
    assert all(0 <= d < 1 for d in doubles) and 0.45 < np.mean(doubles) < 0.55


def frequencies(logits: np.ndarray, draws: int, **sampling) -> np.ndarray:
    rng = SplitMix64(5)
    s = Sampling(**sampling)
    counts = np.zeros(len(logits))
    for _ in range(draws):
        counts[pick(logits[None], s, rng)[0]] += 1
    return counts / draws


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_draws_follow_the_softmax_at_the_temperature() -> None:
    for t in (0.5, 1.0, 2.0):
        got = frequencies(LOGITS, 20000, temperature=t)
        np.testing.assert_allclose(got, softmax(LOGITS.astype(np.float64) / t), atol=0.015)


def test_top_k_and_top_p_keep_the_specified_candidates() -> None:
    got = frequencies(LOGITS, 5000, temperature=1.0, top_k=2)
    assert set(np.nonzero(got)[0]) == {0, 1}
    p = softmax(LOGITS.astype(np.float64))  # 0.56, 0.21, 0.12, ...: 0.56 + 0.21 < 0.8 <= + 0.12
    got = frequencies(LOGITS, 5000, temperature=1.0, top_p=0.8)
    assert set(np.nonzero(got)[0]) == {0, 1, 2}
    np.testing.assert_allclose(got[:3], p[:3] / p[:3].sum(), atol=0.02)


def test_ties_order_by_id_and_far_tokens_are_never_candidates() -> None:
    logits = np.array([0.0, 5.0, 5.0, 5.0 - 41.0], np.float32)
    assert sample_row(logits, 1.0, 1, 1.0, 0.999) == 1  # top-1 of a tie: the lower id
    assert sample_row(logits, 1.0, 0, 1.0, 0.0) == 1
    assert sample_row(logits, 1.0, 0, 1.0, 0.75) == 2  # cumulative over [1, 2, 0]: 1, 2, 2 + e^-5
    drawn = {sample_row(logits, 1.0, 0, 1.0, u) for u in np.linspace(0, 1, 1001)[:-1]}
    assert 3 not in drawn and drawn == {0, 1, 2}


def test_rows_draw_in_order_one_uniform_each() -> None:
    logits = np.tile(LOGITS, (3, 1))
    s = Sampling(temperature=1.0, seed=9)
    together = pick(logits, s, SplitMix64(9))
    rng = SplitMix64(9)
    alone = [pick(logits[i : i + 1], s, rng)[0] for i in range(3)]
    assert together.tolist() == alone


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_the_spec_in_plain_python(temperature: float) -> None:
    """The docstring's prose, written out with no numpy, agrees with sample_row on every uniform tried."""
    logits = np.random.default_rng(0).normal(size=64).astype(np.float32) * 4
    top = float(logits.max())
    d = [(float(v) - top) / temperature for v in logits]
    order = sorted((i for i in range(64) if d[i] >= -40), key=lambda i: (-d[i], i))[:10]
    cumulative = list(itertools.accumulate(math.exp(d[i]) for i in order))
    kept = next(j for j, c in enumerate(cumulative) if c >= 0.9 * cumulative[-1]) + 1
    for u in np.linspace(0, 1, 257)[:-1]:
        want = order[next(j for j in range(kept) if cumulative[j] > u * cumulative[kept - 1])]
        assert sample_row(logits, temperature, 10, 0.9, float(u)) == want
