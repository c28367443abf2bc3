"""What `gemma-export bench` runs in each fresh worker process: one system, one measurement, one JSON line.

    python -m gemma_export.bench.workers --worker SYSTEM PATH [options]

A fresh process per measurement keeps each system's peak RSS its own (VmHWM, weights included) and keeps
systems from sharing warm caches. The last line on stdout is the result.

Decoders (gemma-export, transformers, onnxruntime-genai) all run the same loop: the same [batch, prompt]
token ids (`synthetic_batch`, from one seed), one forward pass over the prompt, then greedy decoding of
exactly N tokens with the end-of-sequence ids suppressed (transformers' `min_new_tokens`, genai's
`min_length`, and the same masking in ours), so that every system does the same work and, computing the
same model, picks the same tokens. Each reports

    prefill_s        prompt in -> first token out: one forward pass over the prompt and the first pick
    decode_s         the remaining N - 1 tokens (one forward pass each)
    peak_rss_bytes   the worker's peak resident memory (VmHWM), loading included
    end_rss_bytes    its resident memory after the last token (VmRSS): what a running service holds
    state_bytes      the carried decode state after N tokens (KV caches, recurrent state); None for genai
    tokens           the first row's generated ids (the bench compares them across systems, then drops them)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.manifest import Manifest

GENAI = "onnxruntime-genai"
DECODER_SYSTEMS = ("gemma-export", "transformers", GENAI)
EMBEDDING_SYSTEMS = ("gemma-export", "sentence-transformers")


def synthetic_batch(vocab_size: int, batch: int, length: int, bos: int, seed: int = 0) -> np.ndarray:
    """[batch, length] int64 ids: <bos>, then random ids past the special tokens; the same for every process."""
    rng = np.random.default_rng([seed, batch, length])
    ids = rng.integers(min(4, vocab_size - 1), vocab_size, (batch, length), dtype=np.int64)
    ids[:, 0] = bos
    return ids


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage: ru_maxrss keeps the high-water mark of the
    parent across fork + exec, so every worker would report the (large) parent's peak (used off Linux only)."""
    from gemma_export.pipeline.progress import peak_rss_bytes as vm_hwm

    return vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _decoded(start: float, first: float, end: float, tokens: list[int], state_bytes: int | None) -> dict[str, Any]:
    from gemma_export.pipeline.progress import resident_bytes  # VmRSS now (None off Linux)

    return {
        "prefill_s": first - start,
        "decode_s": end - first,
        "end_rss_bytes": resident_bytes(),  # first: the peak read after it covers it
        "peak_rss_bytes": peak_rss_bytes(),
        "state_bytes": state_bytes,
        "tokens": tokens,
    }


def measure_ours(artifact: Path, ids: np.ndarray, new_tokens: int, eos: list[int], threads: int) -> dict[str, Any]:
    from gemma_export.runtime.session import OrtDecoder, feed_back, pick

    decoder = OrtDecoder(artifact, Manifest.read(artifact), threads=threads)
    batch, length = ids.shape
    decoder.reserve(length + new_tokens)  # as genai sizes its buffers by max_length
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
    cache = decoder.empty_cache(batch)
    picked: list[np.ndarray] = []

    def choose(logits: np.ndarray) -> np.ndarray:
        last = logits[:, -1]
        last[:, eos] = -np.inf  # as transformers' min_new_tokens: the end-of-sequence ids are never picked
        picked.append(pick(last))  # greedy
        return picked[-1]

    start = time.perf_counter()
    logits, cache = decoder.step(ids, mask, pos, cache, logits_to_keep=1)  # as transformers' generate
    nxt = choose(logits)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        step_ids, mask, pos = feed_back(nxt, mask, pos)
        logits, cache = decoder.step(step_ids, mask, pos, cache, logits_to_keep=1)
        nxt = choose(logits)
    end = time.perf_counter()
    tokens = [int(t[0]) for t in picked]
    return _decoded(start, first, end, tokens, sum(c.nbytes for c in cache))


def measure_transformers(
    checkpoint: Path, ids: np.ndarray, new_tokens: int, eos: list[int], threads: int
) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    stamps: list[float] = []

    class Clock(transformers.generation.BaseStreamer):
        def put(self, value: torch.Tensor) -> None:  # the prompt first, then one call per new token
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    prompt = torch.from_numpy(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=Clock(),
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    return _decoded(start, stamps[1], stamps[-1], tokens, _hf_state_bytes(out.past_key_values, model))


def measure_genai(folder: Path, ids: np.ndarray, new_tokens: int, eos: list[int], threads: int) -> dict[str, Any]:
    """onnxruntime-genai's Generator on its own builder's model: append_tokens runs the prompt, each
    generate_next_token picks a token (running the previous one through the model first)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1} if threads else {}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    batch, length = ids.shape
    total = length + new_tokens
    genai_config = json.loads((folder / "genai_config.json").read_text())
    window = genai_config["model"]["decoder"].get("sliding_window", {}).get("window_size", 0)
    params = og.GeneratorParams(model)
    # min_length = the full length: its end-of-sequence ids are masked until then, as in the other systems.
    # max_length only sizes its cache buffers; a sliding-window model refuses one below its window.
    params.set_search_options(batch_size=batch, do_sample=False, min_length=total, max_length=max(total, window))
    generator = og.Generator(model, params)
    tokens: list[int] = []
    start = time.perf_counter()
    generator.append_tokens(ids.astype(np.int32))
    for step in range(new_tokens):
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if step == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    return _decoded(start, first, end, tokens, None)


def _hf_state_bytes(cache: Any, model: Any) -> int:
    """transformers keeps KV caches in the Cache object, RecurrentGemma's recurrent state on its modules."""
    import torch

    tensors = [t for layer in getattr(cache, "layers", []) for t in (getattr(layer, "keys", None),
               getattr(layer, "values", None))]  # fmt: skip
    for module in model.modules():
        tensors += [getattr(module, "conv1d_state", None), getattr(module, "recurrent_states", None)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def time_calls(call: Callable[[], None], batch: int, min_seconds: float, max_repetitions: int) -> dict[str, Any]:
    """One warm-up call, then calls until min_seconds have passed or max_repetitions were made."""
    start = time.perf_counter()
    call()
    warmup = time.perf_counter() - start
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or calls >= max_repetitions:
            break
    return {
        "warmup_s": round(warmup, 4),
        "repetitions": calls,
        "batch_ms": round(1000 * elapsed / calls, 3),
        "sentences_s": round(batch * calls / elapsed, 2),
    }


def measure_ours_embedding(artifact: Path, ids: np.ndarray, dim: int, threads: int, timing: dict) -> dict[str, Any]:
    from gemma_export.runtime.session import OrtEncoder

    encoder = OrtEncoder(artifact, Manifest.read(artifact), threads=threads)
    mask = np.ones_like(ids)
    out: list[np.ndarray] = []

    def call() -> None:
        out[:] = [encoder.embed(ids, mask)[0]]

    result = time_calls(call, ids.shape[0], **timing)
    return {**result, "embedding": out[0][0, :dim].tolist()}


def measure_sentence_transformers(folder: Path, ids: np.ndarray, dim: int, threads: int, timing: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model = SentenceTransformer(str(folder), device="cpu").eval()
    features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones_like(torch.from_numpy(ids))}
    out: list[torch.Tensor] = []

    def call() -> None:
        with torch.inference_mode():  # the module stack mutates the features dict: a fresh one per call
            out[:] = [model(dict(features))["sentence_embedding"]]

    result = time_calls(call, ids.shape[0], **timing)
    e = out[0].float()
    if dim < e.shape[-1]:  # Matryoshka truncation, as encode(truncate_dim=dim, normalize_embeddings=True)
        e = F.normalize(e[:, :dim], p=2, dim=-1)
    attn = getattr(model[0].auto_model.config, "_attn_implementation", None)
    return {**result, "attn_implementation": attn, "embedding": e[0].tolist()}


DECODERS = {"gemma-export": measure_ours, "transformers": measure_transformers, GENAI: measure_genai}
EMBEDDERS = {"gemma-export": measure_ours_embedding, "sentence-transformers": measure_sentence_transformers}


def main() -> None:
    parser = argparse.ArgumentParser(description="gemma-export bench worker (internal)")
    parser.add_argument("--worker", choices=sorted({*DECODER_SYSTEMS, *EMBEDDING_SYSTEMS}), required=True)
    parser.add_argument("path", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--bos", type=int)
    decode = parser.add_argument_group("decoders (given --new-tokens)")
    decode.add_argument("--prompt-tokens", type=int)
    decode.add_argument("--new-tokens", type=int)
    decode.add_argument("--eos", default="", help="comma-separated end-of-sequence ids (suppressed)")
    embed = parser.add_argument_group("embedding models (given --seq-length)")
    embed.add_argument("--seq-length", type=int)
    embed.add_argument("--dim", type=int)
    embed.add_argument("--min-seconds", type=float)
    embed.add_argument("--max-repetitions", type=int)
    args = parser.parse_args()
    if args.new_tokens is not None:
        ids = synthetic_batch(args.vocab_size, args.batch, args.prompt_tokens, args.bos)
        eos = [int(t) for t in args.eos.split(",") if t]
        result = DECODERS[args.worker](args.path, ids, args.new_tokens, eos, args.threads)
    else:
        ids = synthetic_batch(args.vocab_size, args.batch, args.seq_length, args.bos)
        timing = {"min_seconds": args.min_seconds, "max_repetitions": args.max_repetitions}
        result = EMBEDDERS[args.worker](args.path, ids, args.dim, args.threads, timing)
        result = {"batch": args.batch, "seq_length": args.seq_length, **result, "peak_rss_bytes": peak_rss_bytes()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
