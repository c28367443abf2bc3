"""Verify stage: does the artifact compute what the reference computes?

The two decoders are driven by the same inputs through `runtime.Decoder`, on prompts chosen where
exporters go wrong (GEMMA.md): one longer than twice every attention window, and a left-padded batch of
unequal lengths. Prefill compares the logits of every real (non-padding) position; decode then feeds both
the same greedy tokens, step by step across the window boundary, and compares each step's logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from gemma_export.config import GemmaConfig
from gemma_export.runtime import Decoder, OrtEncoder, TorchEncoder, left_pad, positions, prefill_slices

DEFAULT_TOLERANCE = 1e-4  # max abs logit error, float32
DECODE_STEPS = 6


@dataclass
class Case:
    name: str
    prompt_lengths: list[int]
    prefill_max_abs_error: float = 0.0
    decode_max_abs_error: float = 0.0


@dataclass
class ParityReport:
    tolerance: float
    cases: list[Case] = field(default_factory=list)

    @property
    def prefill_max_abs_error(self) -> float:
        return max(c.prefill_max_abs_error for c in self.cases)

    @property
    def decode_max_abs_error(self) -> float:
        return max(c.decode_max_abs_error for c in self.cases)

    @property
    def passed(self) -> bool:
        return max(self.prefill_max_abs_error, self.decode_max_abs_error) <= self.tolerance

    def summary(self) -> str:
        return (f"max abs logit error prefill {self.prefill_max_abs_error:.3g}, decode "
                f"{self.decode_max_abs_error:.3g} (tolerance {self.tolerance:g})")  # fmt: skip

    def to_json(self) -> dict:
        return {
            "metric": "max_abs_logit_error",
            "tolerance": self.tolerance,
            "prefill": self.prefill_max_abs_error,
            "decode": self.decode_max_abs_error,
            "passed": self.passed,
            "cases": [asdict(c) for c in self.cases],
        }


def sample_prompts(cfg: GemmaConfig, seed: int = 0) -> dict[str, list[list[int]]]:
    """Deterministic token prompts: one past twice the widest window, and a left-padded batch of two."""
    window = cfg.max_window or 16
    long_len = min(2 * window + 3, cfg.max_position_embeddings - DECODE_STEPS)
    # The batch's longer row ends just before its window fills, so decoding crosses the boundary.
    short_len = max(1, min(window - DECODE_STEPS // 2, long_len))
    rng = np.random.default_rng(seed)
    low = min(4, cfg.vocab_size - 1)  # skip the special ids 0-3 when the vocabulary allows it

    def tokens(n: int) -> list[int]:
        return [cfg.bos_token_id, *rng.integers(low, cfg.vocab_size, n - 1).tolist()]

    return {
        "long": [tokens(long_len)],
        "padded_batch": [tokens(short_len), tokens(max(1, short_len // 3))],
    }


def compare(
    reference: Decoder,
    artifact: Decoder,
    cfg: GemmaConfig,
    tolerance: float = DEFAULT_TOLERANCE,
    decode_steps: int = DECODE_STEPS,
) -> ParityReport:
    report = ParityReport(tolerance=tolerance)
    for name, prompts in sample_prompts(cfg).items():
        case = Case(name=name, prompt_lengths=[len(p) for p in prompts])
        ids, mask = left_pad(prompts, cfg.pad_token_id)
        pos = positions(mask)
        ref_cache, art_cache = reference.empty_cache(len(prompts)), artifact.empty_cache(len(prompts))
        # Prefill: the whole prompt, in as few passes as the logits' memory allows (one for small vocabularies).
        for cols in prefill_slices(ids.shape[1], len(prompts), cfg.vocab_size):
            ref_logits, ref_cache = reference.step(ids[:, cols], mask[:, : cols.stop], pos[:, cols], ref_cache)
            art_logits, art_cache = artifact.step(ids[:, cols], mask[:, : cols.stop], pos[:, cols], art_cache)
            real = mask[:, cols].astype(bool)  # padding positions' logits are not defined
            err = float(np.abs(ref_logits[real] - art_logits[real]).max())
            case.prefill_max_abs_error = max(case.prefill_max_abs_error, err)
        # Decode: both fed the reference's greedy token, step by step.
        for step in range(decode_steps):
            ids = ref_logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            ref_logits, ref_cache = reference.step(ids, mask, pos, ref_cache)
            art_logits, art_cache = artifact.step(ids, mask, pos, art_cache)
            err = float(np.abs(ref_logits - art_logits).max())
            case.decode_max_abs_error = max(case.decode_max_abs_error, err) if step else err
        report.cases.append(case)
    return report


EMBEDDING_TOLERANCE = 1e-5  # max abs difference per sentence-embedding component, float32


@dataclass
class EmbeddingReport:
    tolerance: float
    prompt_lengths: list[int]
    sentence_max_abs_error: float
    sentence_min_cosine: float
    token_max_abs_error: float

    @property
    def passed(self) -> bool:
        return self.sentence_max_abs_error <= self.tolerance

    def summary(self) -> str:
        return (f"max abs embedding error {self.sentence_max_abs_error:.3g}, min cosine "
                f"{self.sentence_min_cosine:.7f} (tolerance {self.tolerance:g})")  # fmt: skip

    def to_json(self) -> dict:
        return {"metric": "max_abs_embedding_error", **asdict(self), "passed": self.passed}


def compare_embeddings(
    reference: TorchEncoder, artifact: OrtEncoder, cfg: GemmaConfig, tolerance: float = EMBEDDING_TOLERANCE
) -> EmbeddingReport:
    """A padded batch whose longest row spans more than twice the bidirectional window, and a short row."""
    span = 2 * cfg.max_window if cfg.max_window else 16  # a bidirectional window reaches W - 1 each way
    rng = np.random.default_rng(0)
    low = min(4, cfg.vocab_size - 1)
    lengths = [2 * span + 3, 5, span]
    prompts = [[cfg.bos_token_id, *rng.integers(low, cfg.vocab_size, n - 1).tolist()] for n in lengths]
    ids, mask = left_pad(prompts, cfg.pad_token_id)
    ref_e, ref_t = reference.embed(ids, mask)
    art_e, art_t = artifact.embed(ids, mask)
    cosine = (ref_e * art_e).sum(-1) / (np.linalg.norm(ref_e, axis=-1) * np.linalg.norm(art_e, axis=-1))
    real = mask.astype(bool)
    return EmbeddingReport(
        tolerance=tolerance,
        prompt_lengths=lengths,
        sentence_max_abs_error=float(np.abs(ref_e - art_e).max()),
        sentence_min_cosine=float(cosine.min()),
        token_max_abs_error=float(np.abs(ref_t[real] - art_t[real]).max()),
    )


def describe_parity(parity: dict) -> str:
    """One line for a manifest's recorded parity, whichever kind of report wrote it."""
    if parity["metric"] == "max_abs_embedding_error":
        return (f"max |d embedding| {parity['sentence_max_abs_error']:.2e}, min cosine "
                f"{parity['sentence_min_cosine']:.7f} (tolerance {parity['tolerance']:g})")  # fmt: skip
    return (f"prefill max |dlogit| {parity['prefill']:.2e}, decode {parity['decode']:.2e} "
            f"(tolerance {parity['tolerance']:g})")  # fmt: skip
