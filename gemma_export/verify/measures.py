"""What the verify stage measures of two sets of [positions, vocab] logits, a few rows at a time: closeness (the
fp32 gate) and agreement (the quantized builds' gate). numpy only: the ONNX Runtime child (child.py) takes them too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class Closeness:
    """How close the artifact's logits are to the reference's over some positions (one pass, or several)."""

    positions: int = 0
    max_abs_error: float = 0.0
    max_abs_reference: float = 0.0  # the logit scale: the reference's largest |logit|
    top1_matches: int = 0
    # The reference's margin (top-1 minus runner-up logit) at the most decisive position whose top-1 differs:
    # a tie broken the other way by rounding has a margin near 0; a real bug flips clear choices.
    max_flipped_margin: float = 0.0

    @classmethod
    def of(cls, ref: np.ndarray, art: np.ndarray) -> Closeness:
        """Of [positions, vocab] logits, a few rows at a time (no full-size temporaries)."""
        out = cls()
        for i in range(0, len(ref), KL_ROWS):
            r, a = ref[i : i + KL_ROWS], art[i : i + KL_ROWS]
            top2 = np.partition(r, -2, axis=-1)[:, -2:]
            flipped = r.argmax(-1) != a.argmax(-1)
            margins = (top2[:, 1] - top2[:, 0])[flipped]
            out.add(cls(len(r), float(np.abs(r - a).max()), float(np.abs(r).max()), int((~flipped).sum()),
                        float(margins.max()) if len(margins) else 0.0))  # fmt: skip
        return out

    def add(self, other: Closeness) -> None:
        self.positions += other.positions
        self.top1_matches += other.top1_matches
        for name in ("max_abs_error", "max_abs_reference", "max_flipped_margin"):
            setattr(self, name, max(getattr(self, name), getattr(other, name)))


def max_abs_error(ref: np.ndarray, art: np.ndarray) -> float:
    """Max abs difference of [positions, vocab] logits, a few rows at a time (no full-size temporaries)."""
    rows = range(0, len(ref), KL_ROWS)
    return max((float(np.abs(ref[i : i + KL_ROWS] - art[i : i + KL_ROWS]).max()) for i in rows), default=0.0)


# What a build's verify stage measures per pass, in the ONNX Runtime process (child.py): the max abs
# logit error (fp32 gate), or the agreement statistics (quantized builds' gate); JSON-able values.
MEASURES: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
    "closeness": lambda ref, art: asdict(Closeness.of(ref, art)),
    "agreement": lambda ref, art: asdict(Agreement.of(ref, art)),
}


KL_ROWS = 8  # positions per chunk of a comparison: a 262144-token vocabulary makes 1 MiB rows (2 MiB in float64)


@dataclass
class Agreement:
    """Running agreement of one phase: top-1 matches, KL(reference || artifact) and max abs logit error."""

    positions: int = 0
    top1_matches: int = 0
    kl_sum: float = 0.0
    max_abs_logit_error: float = 0.0

    @classmethod
    def of(cls, ref: np.ndarray, art: np.ndarray) -> Agreement:
        """Of [positions, vocab] logits."""
        return cls(
            positions=len(ref),
            top1_matches=int((ref.argmax(-1) == art.argmax(-1)).sum()),
            kl_sum=float(kl_divergence(ref, art).sum()),
            max_abs_logit_error=max_abs_error(ref, art),
        )

    def add(self, other: Agreement) -> None:
        self.positions += other.positions
        self.top1_matches += other.top1_matches
        self.kl_sum += other.kl_sum
        self.max_abs_logit_error = max(self.max_abs_logit_error, other.max_abs_logit_error)

    @property
    def top1(self) -> float:
        return self.top1_matches / self.positions if self.positions else 1.0

    @property
    def kl(self) -> float:
        return self.kl_sum / self.positions if self.positions else 0.0

    def to_json(self) -> dict:
        return {"top1": self.top1, "kl": self.kl, "max_abs_logit_error": self.max_abs_logit_error,
                "positions": self.positions}  # fmt: skip


def kl_divergence(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(art)) per row of [positions, vocab] logits, in float64, a few rows at a time."""
    out = np.empty(len(ref))
    for start in range(0, len(ref), KL_ROWS):
        p, q = (log_softmax(x[start : start + KL_ROWS].astype(np.float64)) for x in (ref, art))
        out[start : start + KL_ROWS] = (np.exp(p) * (p - q)).sum(-1)
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
