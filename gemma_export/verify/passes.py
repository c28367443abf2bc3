"""The verification passes: the sample prompts, each forward pass's inputs (`Pass`), the reference run through
them with its logits spilled to an unlinked file, and the artifact run through the same passes.

Both decoders are driven by the same inputs through `runtime.session.Decoder`, on prompts chosen where exporters
go wrong (GEMMA.md): one longer than twice every attention window, and a left-padded batch of unequal lengths.
Prefill compares the logits of every real (non-padding) position; decode then feeds both the same greedy tokens,
step by step across the window boundary, and compares each step's logits.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma_export.config.model_config import GemmaConfig
from gemma_export.runtime.session import Decoder, feed_back, left_pad, pick, positions, prefill_slices

DECODE_STEPS = 6


# float32 logits per forward pass (runtime.LOGITS_BUDGET_BYTES: 512 MiB). Small slices starve the matrix products:
# the real 270M's reference took 334 s through 32-token passes (32 MiB), 167 s at 128 MiB, 103 s at 512 MiB;
# 256 MiB is noise beside the weights of any model with a 256K vocabulary.
VERIFY_LOGITS_BUDGET_BYTES = 128 << 20


Opened = Decoder | Callable[[], Decoder]  # a decoder, or a factory: called when needed, dropped after use


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


@dataclass
class Pass:
    """One forward pass of the verification: its inputs, and the shape of the logits compared."""

    case: str
    lengths: list[int]
    phase: str  # prefill | decode
    new_cache: bool  # the case's first pass: both decoders start from an empty cache
    ids: np.ndarray
    mask: np.ndarray
    pos: np.ndarray
    shape: tuple[int, int]  # [positions, vocab] of the compared logits

    def compared(self, logits: np.ndarray) -> np.ndarray:
        """The logits compared: every real (non-padding) position in prefill, the new token's in decode."""
        if self.phase == "decode":
            return logits[:, -1]
        return logits[self.mask[:, -self.ids.shape[1] :].astype(bool)]  # padding positions' are not defined


def paired_logits(
    reference: Opened,
    artifact: Opened,
    cfg: GemmaConfig,
    decode_steps: int = DECODE_STEPS,
    *,
    spill_dir: Path | None = None,
) -> Iterator[tuple[str, list[int], str, np.ndarray, np.ndarray]]:
    """Both decoders driven through the sample prompts, the same inputs to each: yields, per forward pass,
    (case name, prompt lengths, phase, reference logits, artifact logits), the logits of the real (non-padding)
    positions as [positions, vocab].

    The reference runs every pass first (its greedy tokens are the decode inputs of both), its logits spilled
    to an unlinked file in `spill_dir` (None: the system's temporary folder); then it is dropped, and only
    then is the artifact opened and run. Given as factories, neither is held beyond its own phase here.
    """
    with reference_spilled(reference, cfg, decode_steps, spill_dir) as (passes, spill_fd):
        if callable(artifact):  # opened only now that the reference's weights are freed
            artifact = artifact()
        for p, ref, art in artifact_pairs(artifact, passes, spill_fd):
            yield p.case, p.lengths, p.phase, ref, art


@contextlib.contextmanager
def reference_spilled(
    reference: Opened, cfg: GemmaConfig, decode_steps: int, spill_dir: Path | None
) -> Iterator[tuple[list[Pass], int]]:
    """(the passes, the descriptor of the unlinked file holding their reference logits in order), the reference
    run and, when given as a factory, dropped: its weights (the memory-mapped checkpoint) and heap freed."""
    from gemma_export.pipeline import memory

    with tempfile.TemporaryFile(dir=spill_dir) as spill:
        passes = run_reference(reference() if callable(reference) else reference, cfg, decode_steps, spill)
        spill.flush()  # read back by descriptor, here or in a child
        del reference
        memory.release_heap()
        yield passes, spill.fileno()


def artifact_pairs(
    artifact: Decoder, passes: list[Pass], spill_fd: int
) -> Iterator[tuple[Pass, np.ndarray, np.ndarray]]:
    """The artifact run through the reference's passes: (pass, reference logits read back from the spill file,
    the artifact's compared logits). Reads at explicit offsets (the file's position is shared with a child)."""
    offset = 0
    for p in passes:
        if p.new_cache:
            cache = artifact.empty_cache(len(p.lengths))
        logits, cache = artifact.step(p.ids, p.mask, p.pos, cache)
        nbytes = 4 * p.shape[0] * p.shape[1]
        ref = np.frombuffer(os.pread(spill_fd, nbytes, offset), np.float32).reshape(p.shape)
        offset += nbytes
        yield p, ref, p.compared(logits)


def run_reference(reference: Decoder, cfg: GemmaConfig, decode_steps: int, spill) -> list[Pass]:
    """Every verification pass through the reference, its compared logits appended to `spill` in order."""
    passes: list[Pass] = []

    def run(p: Pass, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, cache = reference.step(p.ids, p.mask, p.pos, cache)
        compared = np.ascontiguousarray(p.compared(logits), np.float32)
        p.shape = compared.shape
        spill.write(compared.data)
        passes.append(p)
        return logits, cache

    for name, prompts in sample_prompts(cfg).items():
        lengths = [len(p) for p in prompts]
        ids, mask = left_pad(prompts, cfg.pad_token_id)
        pos = positions(mask)
        cache = reference.empty_cache(len(prompts))
        # Prefill: the whole prompt, in as few passes as the logits' budget allows (one for small vocabularies).
        slices = prefill_slices(ids.shape[1], len(prompts), cfg.vocab_size, VERIFY_LOGITS_BUDGET_BYTES)
        for i, cols in enumerate(slices):
            step = Pass(name, lengths, "prefill", i == 0, ids[:, cols], mask[:, : cols.stop], pos[:, cols], (0, 0))
            logits, cache = run(step, cache)
        # Decode: both fed the reference's greedy token, step by step.
        for _ in range(decode_steps):
            ids, mask, pos = feed_back(pick(logits[:, -1]), mask, pos)
            logits, cache = run(Pass(name, lengths, "decode", False, ids, mask, pos, (0, 0)), cache)
    return passes
