"""Running a decoder, either the artifact (ONNX Runtime) or the reference (PyTorch), behind one interface.

Both take the artifact contract's inputs as numpy arrays, so that verification and generation drive them
with the very same code: any difference in what they return is a difference in what they compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.runtime.pages import settle_weights
from gemma_export.runtime.sampler import SplitMix64, sample_row

Cache = list[np.ndarray]  # the carried state, in the order of the manifest's `state` list


class Decoder(Protocol):
    vocab_size: int

    def empty_cache(self, batch: int) -> Cache: ...

    def reserve(self, length: int) -> None:
        """A hint: the caches will hold up to `length` positions (prompt + new tokens)."""
        ...

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: Cache,
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, Cache]:
        """One forward pass: float32 logits [batch, seq, vocab] (the last `logits_to_keep` positions' only, when
        it is not 0) and the new cache."""
        ...


def session_options(threads: int = 0, low_memory: bool = False):
    """ONNX Runtime CPU session options. `low_memory` (the build's verification: one pass per prompt chunk, so
    correctness, not speed): no pre-packing, whose packed copy of every MatMul weight (the tied LM head
    included) is a second copy of the weights in memory, while unpacked ones stay in the memory-mapped external
    data file; and no CPU arena, which keeps the largest activations (logits) of any run reserved."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    return options


def open_session(artifact_dir: Path, manifest: Manifest, threads: int = 0, low_memory: bool = False):
    """The artifact's model in an ONNX Runtime session, on the execution providers its target runs on; its
    weights file's pages settled once loaded (runtime/pages.py: only what the lookups read stays resident)."""
    import onnxruntime as ort

    path = str(Path(artifact_dir) / manifest.files["model"].path)
    session = ort.InferenceSession(path, session_options(threads, low_memory), providers=list(manifest.build.providers))
    if not low_memory and "weights" in manifest.files:  # unpacked, every run reads the weights from the file
        settle_weights(Path(artifact_dir) / manifest.files["weights"].path)
    return session


class OrtDecoder:
    """The artifact in an ONNX Runtime session; names, state shapes and dtypes come from its manifest.

    Decoders take the attention mask of past + new tokens; an artifact whose graph carries the past's mask in
    its state (RecurrentGemma: constant memory) takes only the new tokens' columns.

    A cache the manifest marks `shared_buffer` (README "Shared KV buffers") lives in a buffer of some capacity
    that is bound as both the past input and the present output: the graph writes the new positions in place,
    and nothing is copied between calls. `step` returns views of those buffers (the first total-length
    positions), which stay valid until the next call; given back, they are recognised and not copied. Any
    other cache (the first call's empty one, another decoder's) is copied into a buffer first, which grows
    (doubling) when a call would not fit. A call that cuts the logits (0 < `logits_to_keep` < new tokens: a
    prompt) passes `logits_to_keep` through run() instead, which io binding cannot feed (README).
    """

    def __init__(self, artifact_dir: Path, manifest: Manifest, threads: int = 0, *, low_memory: bool = False) -> None:
        self.session = open_session(artifact_dir, manifest, threads, low_memory)
        self.state = manifest.state
        self.vocab_size = manifest.model.config.vocab_size
        mask = next(v for v in manifest.inputs if v.name == "attention_mask")
        self.mask_covers_past = mask.shape[1] != "sequence_length"
        self._output_names = ["logits", *(s.output for s in self.state)]
        self._shared = [s.shared_buffer for s in self.state]
        self._buffers: list[_Buffer | None] = [None] * len(self.state)
        self._binding, self._bound, self._logits_shape = None, [], None  # _run_in_place's io binding
        self._reserved = 0
        self._keeps_logits = any(v.name == "logits_to_keep" for v in manifest.inputs)
        # a vision artifact's decoder (models/multimodal.py): a text step feeds no image tokens
        names = {v.name for v in manifest.inputs}
        self._multimodal = {"token_type_ids", "image_features"} <= names
        self._hidden = manifest.model.config.hidden_size

    def empty_cache(self, batch: int) -> Cache:
        return [np.zeros([batch if d == "batch" else d for d in s.shape], s.dtype) for s in self.state]

    def reserve(self, length: int) -> None:
        """Size the shared buffers for `length` positions from the next new buffer on (prompt + new tokens)."""
        self._reserved = length

    def step(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=0, **extra):
        """`extra`: a vision artifact's token_type_ids and image_features (runtime/images.py); left out, a text
        step's (no image token)."""
        total = attention_mask.shape[1]  # past + new: what a shared buffer must hold
        if not self.mask_covers_past:
            attention_mask = attention_mask[:, -input_ids.shape[1] :]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self._multimodal:
            feed["token_type_ids"] = extra.get("token_type_ids", np.zeros_like(attention_mask))
            feed["image_features"] = extra.get("image_features", np.zeros((0, self._hidden), np.float32))
        elif extra:
            raise BadInput("this artifact takes no images (a text-only decoder)")
        drops_rows = 0 < logits_to_keep < input_ids.shape[1]
        cuts_in_graph = drops_rows and self._keeps_logits
        if any(self._shared) and not cuts_in_graph:
            logits, present = self._run_in_place(feed, cache, total)
        else:  # logits_to_keep is an overridable initializer, which io binding cannot feed: a prompt whose
            # logits are cut goes through run() (its past, if any, is copied; usually it is empty)
            if cuts_in_graph:
                feed["logits_to_keep"] = np.array(logits_to_keep, np.int64)
            feed.update({s.input: c for s, c in zip(self.state, cache, strict=True)})
            logits, *present = self.session.run(self._output_names, feed)
        # (an artifact built without the input computes every position: cut here)
        return (logits[:, -logits_to_keep:] if drops_rows else logits), present

    def _run_in_place(self, feed: dict[str, np.ndarray], cache: Cache, total: int) -> tuple[np.ndarray, Cache]:
        """One call with every shared cache bound as both input and output (io binding). The binding is kept
        between calls and only what changed is bound again (binding all 2 x layers caches costs ~1 ms a call)."""
        buffers = [self._buffer(i, past, total) if shared else None
                   for i, (past, shared) in enumerate(zip(cache, self._shared, strict=True))]  # fmt: skip
        key = [id(b) for b in buffers]
        if self._binding is None or self._bound != key:  # new buffers: a new binding
            self._binding, self._bound, self._logits_shape = self.session.io_binding(), key, None
            self._binding.bind_output("logits")  # first: get_outputs() keeps the order of binding
            for spec, buffer in zip(self.state, buffers, strict=True):
                if buffer is not None:
                    self._binding.bind_ortvalue_input(spec.input, buffer.value)
                    self._binding.bind_ortvalue_output(spec.output, buffer.value)
                else:  # a fixed-size state: ONNX Runtime allocates its output once, then reuses it
                    self._binding.bind_output(spec.output)
        binding = self._binding
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for spec, past, buffer in zip(self.state, cache, buffers, strict=True):
            if buffer is None:
                binding.bind_cpu_input(spec.input, np.ascontiguousarray(past))
        shape = (*feed["input_ids"].shape, self.vocab_size)
        if shape != self._logits_shape:  # else the last call's logits value is reused (returned as a copy)
            binding.bind_output("logits")
            self._logits_shape = shape
        self.session.run_with_iobinding(binding)
        logits, *outputs = binding.get_outputs()
        present = [
            out.numpy() if buf is None else buf.array[:, :, :total] for out, buf in zip(outputs, buffers, strict=True)
        ]
        return logits.numpy(), present

    def _buffer(self, i: int, past: np.ndarray, total: int) -> _Buffer:
        """State i's buffer, holding `past` in its first positions and room for `total`."""
        buffer = self._buffers[i]
        own = buffer is not None and past.base is buffer.array and past.ctypes.data == buffer.array.ctypes.data
        if own and buffer.array.shape[2] >= total:
            return buffer  # the past is already in place
        grown = 2 * buffer.array.shape[2] if own else 0
        array = np.zeros((*past.shape[:2], max(total, self._reserved, grown), *past.shape[3:]), past.dtype)
        array[:, :, : past.shape[2]] = past
        self._buffers[i] = buffer = _Buffer.of(array)
        return buffer


@dataclass(frozen=True)
class _Buffer:
    """A numpy array and the ONNX Runtime value that shares its memory."""

    array: np.ndarray
    value: object

    @classmethod
    def of(cls, array: np.ndarray) -> _Buffer:
        import onnxruntime as ort

        return cls(array, ort.OrtValue.ortvalue_from_numpy(array))


class OrtEncoder:
    """An embedding artifact in an ONNX Runtime session."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, threads: int = 0, *, low_memory: bool = False) -> None:
        self.session = open_session(artifact_dir, manifest, threads, low_memory)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sentence_embedding [batch, dim], token_embeddings [batch, seq, hidden])."""
        out = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        return out[0], out[1]


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / T) restricted to top-k and top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise BadInput(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.seed < 0:
            raise BadInput(f"--seed must be >= 0, got {self.seed}")
        if self.top_k < 0:
            raise BadInput(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"--top-p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def pick(logits: np.ndarray, sampling: Sampling = GREEDY, rng: SplitMix64 | None = None) -> np.ndarray:
    """Next token per row from the last position's logits [batch, vocab]: the first argmax (greedy), or one
    draw of `rng` per row, in row order, by the specified sampler (runtime/sampler.py, shared with C++ and Java)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    if rng is None:
        raise ValueError("sampling (temperature > 0) needs a random generator")
    t, k, p = sampling.temperature, sampling.top_k, sampling.top_p
    return np.array([sample_row(row, t, k, p, rng.next_double()) for row in logits], np.int64)


LOGITS_BUDGET_BYTES = 512 << 20  # a 4K-token prompt of a 256K vocabulary has 4 GiB of logits: chunk it


def prefill_slices(length: int, batch: int, vocab_size: int, budget: int | None = None) -> list[slice]:
    """Prompt columns per forward pass, so that one pass's float32 logits stay within `budget` bytes
    (None: LOGITS_BUDGET_BYTES)."""
    chunk = max(1, (LOGITS_BUDGET_BYTES if budget is None else budget) // (4 * batch * vocab_size))
    return [slice(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and attention mask for a batch of prompts of unequal lengths."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """Position of each token within its own row, as transformers' generate computes it (pads get 1)."""
    pos = mask.cumsum(-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_length: int, max_new_tokens: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInput("empty prompt: give at least one token")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise BadInput(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if len(p) + max_new_tokens > max_length:
            raise BadInput(
                f"prompt of {len(p)} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"maximum length of {max_length}"
            )


def feed_back(tokens: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inputs of the decode step that feeds `tokens` [batch] back: them as ids [batch, 1], the attention mask
    one (real) column longer, each row's next position [batch, 1]. Every decode loop (generate, the verify
    stage's, the bench's) steps with it."""
    ids = np.asarray(tokens).astype(np.int64)[:, None]
    mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
    return ids, mask, pos[:, -1:] + 1


def generate(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    sampling: Sampling = Sampling(),
) -> list[list[int]]:
    """New tokens for each prompt (stopping at an end-of-sequence id), with the KV cache carried."""
    ids, mask = left_pad(prompts, pad_id)
    pos = positions(mask)
    decoder.reserve(ids.shape[1] + max_new_tokens)
    cache = decoder.empty_cache(len(prompts))
    for cols in prefill_slices(ids.shape[1], len(prompts), decoder.vocab_size):
        logits, cache = decoder.step(ids[:, cols], mask[:, : cols.stop], pos[:, cols], cache, logits_to_keep=1)
    return decode_loop(decoder, logits, cache, mask, pos, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                       sampling=sampling)  # fmt: skip


def decode_loop(
    decoder: Decoder,
    logits: np.ndarray,
    cache: list[np.ndarray],
    mask: np.ndarray,
    pos: np.ndarray,
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    sampling: Sampling = Sampling(),
    step_inputs: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
) -> list[list[int]]:
    """The tokens after a prefill that left `logits` (its last position predicts the next token) and `cache`:
    pick, feed back, step, until each row's end-of-sequence id or `max_new_tokens`. `step_inputs(mask)`: the
    decoder's other inputs at each decode step (an image artifact's: no image there)."""
    rng = SplitMix64(sampling.seed)
    out: list[list[int]] = [[] for _ in range(len(mask))]
    done = np.zeros(len(mask), bool)
    for step in range(max_new_tokens):
        nxt = pick(logits[:, -1], sampling, rng)
        for row, token in enumerate(nxt):
            if not done[row]:
                out[row].append(int(token))
                done[row] = int(token) in eos_ids
        if done.all() or step == max_new_tokens - 1:
            break
        ids, mask, pos = feed_back(np.where(done, pad_id, nxt), mask, pos)  # a finished row is fed padding
        extra = step_inputs(mask) if step_inputs is not None else {}
        logits, cache = decoder.step(ids, mask, pos, cache, logits_to_keep=1, **extra)
    return out
