"""Verify stage, the gates: does the artifact compute what the reference computes?

The reference and the artifact are driven through the same passes (passes.py: a prompt longer than twice every
window, a left-padded batch, decode steps across the window boundary); each pass's logits are measured
(measures.py) and summed into a report whose `passed` is the gate: closeness for fp32 builds (`ParityReport`),
agreement with the fp32 reference for quantized ones (`AgreementReport`), per-component error for embedding
models (`EmbeddingReport`).

Memory: the reference runs every pass first and is dropped before the artifact is opened (when the caller
hands both over as factories, as the build does), so their two copies of the weights are never resident
together; its logits wait in an unlinked temporary file (passes.reference_spilled). The build opens the
artifact in a child process instead (child.ArtifactInChild), which reads that file and sends back each pass's
measure, so that this process's torch heap is not added to ONNX Runtime's.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.config.model_config import GemmaConfig
from gemma_export.manifest import AgreementParity, EmbeddingParity, Parity
from gemma_export.runtime.session import OrtEncoder, left_pad
from gemma_export.verify import child
from gemma_export.verify.child import ArtifactInChild
from gemma_export.verify.measures import MEASURES, Agreement, Closeness
from gemma_export.verify.passes import DECODE_STEPS, Opened, paired_logits, reference_spilled
from gemma_export.verify.reference import TorchEncoder

# The fp32 gate: max abs logit error relative to the reference's logit scale (its largest |logit| over every
# compared position), plus top-1 agreement wherever the reference's choice is decisive. An absolute tolerance
# is wrong both ways: real Gemma logits reach +-50, where float32 rounding alone is ~2e-4 (Gemma-3-270M:
# 2.1e-4 absolute, 4e-6 relative, with greedy tokens and perplexity identical to transformers), while a tiny
# random model's logits are ~0.5, where 1e-4 would hide a real bug. Measured relative errors of correct
# artifacts: real Gemma-3-270M <= 5e-6; tiny random checkpoints ~1e-7. Real bugs measured (tests/verify/test_gate.py):
# >= 1e-2 on both (a swapped local/global layer, a dropped softcap, a norm without its +1).
DEFAULT_TOLERANCE = 2e-5
# ... and top-1 agreement: rounding can flip only near-ties (a flip needs the reference margin <= 2x the row's
# error), which are rare among a real vocabulary's choices; a bug flips many.
MIN_TOP1 = 0.99


@dataclass
class Case:
    """One sample prompt (or padded batch) of the fp32 gate: its lengths and each phase's closeness."""

    name: str
    prompt_lengths: list[int]
    phases: dict[str, Closeness] = field(default_factory=lambda: {"prefill": Closeness(), "decode": Closeness()})

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "prompt_lengths": self.prompt_lengths,
                **{phase: _closeness_json(c) for phase, c in self.phases.items()}}  # fmt: skip


@dataclass
class ParityReport:
    """The fp32 gate: in each phase, max abs logit error <= tolerance x the logit scale (DEFAULT_TOLERANCE), and
    top-1 agreement >= MIN_TOP1."""

    tolerance: float
    phases: dict[str, Closeness] = field(default_factory=lambda: {"prefill": Closeness(), "decode": Closeness()})
    cases: list[Case] = field(default_factory=list)

    @property
    def prefill_max_abs_error(self) -> float:
        return self.phases["prefill"].max_abs_error

    @property
    def decode_max_abs_error(self) -> float:
        return self.phases["decode"].max_abs_error

    @property
    def logit_scale(self) -> float:
        return max(c.max_abs_reference for c in self.phases.values())

    def relative_error(self, phase: str) -> float:
        return self.phases[phase].max_abs_error / self.logit_scale if self.logit_scale else 0.0

    @property
    def prefill_error(self) -> float:
        return self.relative_error("prefill")

    @property
    def decode_error(self) -> float:
        return self.relative_error("decode")

    def top1(self, phase: str) -> float:
        c = self.phases[phase]
        return c.top1_matches / c.positions if c.positions else 1.0

    @property
    def passed(self) -> bool:
        close = max(self.prefill_error, self.decode_error) <= self.tolerance
        return close and min(self.top1("prefill"), self.top1("decode")) >= MIN_TOP1

    def summary(self) -> str:
        return (f"logit error relative to the logit scale {self.logit_scale:.3g}: prefill {self.prefill_error:.3g}, "
                f"decode {self.decode_error:.3g} (max abs {self.phases['prefill'].max_abs_error:.3g} / "
                f"{self.phases['decode'].max_abs_error:.3g}; tolerance {self.tolerance:g}); top-1 prefill "
                f"{self.top1('prefill'):.4f}, decode {self.top1('decode'):.4f} (gate >= {MIN_TOP1:g})")  # fmt: skip

    def to_json(self) -> dict:
        return {
            "metric": "relative_logit_error",
            "tolerance": self.tolerance,
            "min_top1": MIN_TOP1,
            "logit_scale": self.logit_scale,
            "prefill": self.prefill_error,
            "decode": self.decode_error,
            **{
                f"{phase}_{key}": value for phase, c in self.phases.items() for key, value in _closeness_json(c).items()
            },
            "passed": self.passed,
            "cases": [c.to_json() for c in self.cases],
        }


def _closeness_json(c: Closeness) -> dict[str, Any]:
    top1 = c.top1_matches / c.positions if c.positions else 1.0
    return {"max_abs_error": c.max_abs_error, "top1": top1, "max_flipped_margin": c.max_flipped_margin,
            "positions": c.positions}  # fmt: skip


def paired_measures(
    reference: Opened,
    artifact: Opened | ArtifactInChild,
    cfg: GemmaConfig,
    decode_steps: int,
    measure: str,
    *,
    spill_dir: Path | None = None,
) -> Iterator[tuple[str, list[int], str, Any]]:
    """(case name, prompt lengths, phase, MEASURES[measure](reference logits, artifact logits)) per pass; the
    artifact in this process (paired_logits), or in a child (ArtifactInChild, after the reference is freed)."""
    if not isinstance(artifact, ArtifactInChild):
        pairs = paired_logits(reference, artifact, cfg, decode_steps, spill_dir=spill_dir)
        for name, lengths, phase, ref, art in pairs:
            yield name, lengths, phase, MEASURES[measure](ref, art)
        return
    with reference_spilled(reference, cfg, decode_steps, spill_dir) as (passes, spill_fd):
        values = child.run_in_child(artifact, passes, spill_fd, measure)
    for p, value in zip(passes, values, strict=True):
        yield p.case, p.lengths, p.phase, value


def compare(
    reference: Opened,
    artifact: Opened | ArtifactInChild,
    cfg: GemmaConfig,
    tolerance: float = DEFAULT_TOLERANCE,
    decode_steps: int = DECODE_STEPS,
    *,
    spill_dir: Path | None = None,
) -> ParityReport:
    """Closeness per case and phase (paired_measures: the decoders, or factories of them, or the artifact in a
    child process), gated relative to the logit scale (ParityReport)."""
    report = ParityReport(tolerance=tolerance)
    for name, prompt_lengths, phase, stats in paired_measures(reference, artifact, cfg, decode_steps, "closeness",
                                                              spill_dir=spill_dir):  # fmt: skip
        if not report.cases or report.cases[-1].name != name:
            report.cases.append(Case(name=name, prompt_lengths=prompt_lengths))
        step = Closeness(**stats)
        report.phases[phase].add(step)
        report.cases[-1].phases[phase].add(step)
    return report


# --- weight-quantized artifacts: agreement with the float32 reference, not equality ---------------------------

# (min top-1, max mean KL) per quantization when neither a recipe nor the options set them, measured on the real
# Gemma-3-270M (tests/dev/test_real_checkpoint.py) with the defaults, on the sample prompts (random token ids, where
# a trained model's runner-up tokens are close): int8 top-1 0.88 / KL 0.0105 (prefill), int4 (the mix) 0.37 /
# 0.29, int4-gptq 0.41 / 0.19, int4-plain KL 0.99 (issue 11's measurement). Random-weight checkpoints measure far
# lower KL (int4 0.073) and their broken quantizations KL >= 0.086 (int8 scales off by 25%), >= 0.2 (scales of
# the wrong rows), >= 0.3 (zero points dropped): tests on them pass their own, tighter gates, as a recipe would.
# (min top-1, max mean KL) per quantization, and per reduced precision (--target tensorrt: 16-bit products)
AGREEMENT_GATES = {"int8": (0.8, 0.03), "int4": (0.3, 1.0), "int4-gptq": (0.3, 1.0), "int4-rtn": (0.3, 1.0),
                   "int4-plain": (0.2, 2.0), "bf16": (0.8, 0.03), "fp16": (0.9, 0.01)}  # fmt: skip
AGREEMENT_DECODE_STEPS = 16  # more decode positions than the fp32 gate: top-1 is a fraction of them


@dataclass
class AgreementReport:
    """The gate of a quantized build: in each phase, top-1 agreement >= min_top1 and mean KL <= max_kl."""

    quant: str
    min_top1: float
    max_kl: float
    phases: dict[str, Agreement] = field(default_factory=lambda: {"prefill": Agreement(), "decode": Agreement()})
    cases: dict[str, dict] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(a.top1 >= self.min_top1 and a.kl <= self.max_kl for a in self.phases.values())

    def summary(self) -> str:
        shown = "; ".join(f"{phase} top-1 {a.top1:.4f}, KL {a.kl:.3g}, max |dlogit| {a.max_abs_logit_error:.3g}"
                          for phase, a in self.phases.items())  # fmt: skip
        return f"{self.quant} vs fp32 reference: {shown} (gate top-1 >= {self.min_top1:g}, KL <= {self.max_kl:g})"

    def to_json(self) -> dict:
        return {
            "metric": "agreement",
            "quant": self.quant,
            "min_top1": self.min_top1,
            "max_kl": self.max_kl,
            **{phase: a.to_json() for phase, a in self.phases.items()},
            "passed": self.passed,
            "cases": [{"name": name, **c} for name, c in self.cases.items()],
        }


def compare_agreement(
    reference: Opened,
    artifact: Opened | ArtifactInChild,
    cfg: GemmaConfig,
    quant: str,
    min_top1: float,
    max_kl: float,
    decode_steps: int = AGREEMENT_DECODE_STEPS,
    *,
    spill_dir: Path | None = None,
) -> AgreementReport:
    """The sample prompts through both decoders (teacher-forced with the reference's greedy tokens, so that
    every position compares the same context)."""
    report = AgreementReport(quant=quant, min_top1=min_top1, max_kl=max_kl)
    per_case: dict[str, dict[str, Agreement]] = {}
    lengths: dict[str, list[int]] = {}
    for name, prompt_lengths, phase, stats in paired_measures(reference, artifact, cfg, decode_steps, "agreement",
                                                              spill_dir=spill_dir):  # fmt: skip
        lengths[name] = prompt_lengths
        step = Agreement(**stats)
        report.phases[phase].add(step)
        per_case.setdefault(name, {"prefill": Agreement(), "decode": Agreement()})[phase].add(step)
    for name, phases in per_case.items():
        report.cases[name] = {"prompt_lengths": lengths[name], **{p: a.to_json() for p, a in phases.items()}}
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
    reference: TorchEncoder | Callable[[], TorchEncoder],
    artifact: OrtEncoder | Callable[[], OrtEncoder],
    cfg: GemmaConfig,
    tolerance: float = EMBEDDING_TOLERANCE,
) -> EmbeddingReport:
    """A padded batch whose longest row spans more than twice the bidirectional window, and a short row.

    As for decoders, the reference runs first and, given as a factory, is freed before the artifact opens."""
    span = 2 * cfg.max_window if cfg.max_window else 16  # a bidirectional window reaches W - 1 each way
    rng = np.random.default_rng(0)
    low = min(4, cfg.vocab_size - 1)
    lengths = [2 * span + 3, 5, span]
    prompts = [[cfg.bos_token_id, *rng.integers(low, cfg.vocab_size, n - 1).tolist()] for n in lengths]
    ids, mask = left_pad(prompts, cfg.pad_token_id)
    ref_e, ref_t = (reference() if callable(reference) else reference).embed(ids, mask)
    del reference
    gc.collect()
    art_e, art_t = (artifact() if callable(artifact) else artifact).embed(ids, mask)
    cosine = (ref_e * art_e).sum(-1) / (np.linalg.norm(ref_e, axis=-1) * np.linalg.norm(art_e, axis=-1))
    real = mask.astype(bool)
    return EmbeddingReport(
        tolerance=tolerance,
        prompt_lengths=lengths,
        sentence_max_abs_error=float(np.abs(ref_e - art_e).max()),
        sentence_min_cosine=float(cosine.min()),
        token_max_abs_error=float(np.abs(ref_t[real] - art_t[real]).max()),
    )


def describe_parity(parity: Parity) -> str:
    """One line for a manifest's recorded parity, whichever kind of report wrote it."""
    if isinstance(parity, EmbeddingParity):
        return (f"max |d embedding| {parity.sentence_max_abs_error:.2e}, min cosine "
                f"{parity.sentence_min_cosine:.7f} (tolerance {parity.tolerance:g})")  # fmt: skip
    if isinstance(parity, AgreementParity):
        return (f"{parity.quant} vs fp32: top-1 prefill {parity.prefill.top1:.4f}, decode {parity.decode.top1:.4f}; "
                f"KL prefill {parity.prefill.kl:.2e}, decode {parity.decode.kl:.2e} (gate top-1 >= "
                f"{parity.min_top1:g}, KL <= {parity.max_kl:g})")  # fmt: skip
    return (f"logit error relative to the scale {parity.logit_scale:.3g}: prefill {parity.prefill:.2e}, "
            f"decode {parity.decode:.2e} (tolerance {parity.tolerance:g}); top-1 prefill "
            f"{parity.prefill_top1:.4f}, decode {parity.decode_top1:.4f}")  # fmt: skip
