"""`gemma-export bench`: speed and memory of an artifact beside the alternative, in the same run.

Each measurement runs in a fresh worker process (`python -m gemma_export.bench --worker ...`), so that
peak RSS is that system's alone, and systems never share warm caches.

Decoders (beside transformers eager): a worker prefills a prompt, then greedily generates N tokens, and
reports:

    prefill_s        time of the first forward pass (the prompt)
    decode_tok_s     (N - 1) / time of the remaining N - 1 steps
    peak_rss_bytes   the worker's peak resident memory (VmHWM), weights included
    state_bytes      the carried decode state after N tokens (KV caches, recurrent state)

Embedding artifacts (beside sentence-transformers on PyTorch): a worker embeds a batch of B sentences of
exactly L synthetic token ids (no padding; both systems draw the same ids from the same seed), once to warm
up, then repeatedly until at least MIN_CELL_SECONDS have passed (at most MAX_REPETITIONS calls), and
reports:

    sentences_s      B * calls / time of the timed calls
    batch_ms         time of one call
    peak_rss_bytes   as above
    max_abs_diff     (sentence-transformers' row) max |difference| from our embeddings of the same ids

Both systems are timed from token ids to sentence embeddings: ours is the artifact's ONNX Runtime session
(`OrtEncoder.embed`), theirs the SentenceTransformer module stack called on the tokenized features
(`model({"input_ids": ..., "attention_mask": ...})`), i.e. `encode` without its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.errors import BadInput

SYSTEMS = ("gemma-export", "transformers")
EMBEDDING_SYSTEMS = ("gemma-export", "sentence-transformers")
MIN_CELL_SECONDS = 2.0  # embedding cells: timed calls run at least this long (after one warm-up call) ...
MAX_REPETITIONS = 50  # ... but stop after this many calls
EMBEDDING_TASK = "sentence-embedding"


def measure_ours(artifact: Path, prompt: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    from gemma_export import package
    from gemma_export.runtime import OrtDecoder

    decoder = OrtDecoder(artifact, package.read_manifest(artifact), threads=threads)
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(len(prompt), dtype=np.int64)[None]
    cache = decoder.empty_cache(1)
    start = time.perf_counter()
    logits, cache = decoder.step(ids, mask, pos, cache)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        ids = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, cache = decoder.step(ids, mask, pos, cache)
    end = time.perf_counter()
    return _result(start, first, end, new_tokens, sum(c.nbytes for c in cache))


def measure_transformers(checkpoint: Path, prompt: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
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

    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=Clock(),
            return_dict_in_generate=True,
        )
    return _result(start, stamps[1], stamps[-1], new_tokens, _hf_state_bytes(out.past_key_values, model))


def synthetic_batch(vocab_size: int, batch: int, length: int, bos: int, seed: int = 0) -> np.ndarray:
    """[batch, length] int64 ids: <bos>, then random ids past the special tokens; the same for every process."""
    rng = np.random.default_rng([seed, batch, length])
    ids = rng.integers(min(4, vocab_size - 1), vocab_size, (batch, length), dtype=np.int64)
    ids[:, 0] = bos
    return ids


def time_calls(call, batch: int, min_seconds: float, max_repetitions: int) -> dict[str, Any]:
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
    from gemma_export import package
    from gemma_export.runtime import OrtEncoder

    encoder = OrtEncoder(artifact, package.read_manifest(artifact), threads=threads)
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


def _hf_state_bytes(cache: Any, model: Any) -> int:
    """transformers keeps KV caches in the Cache object, RecurrentGemma's recurrent state on its modules."""
    import torch

    tensors = [t for layer in getattr(cache, "layers", []) for t in (getattr(layer, "keys", None),
               getattr(layer, "values", None))]  # fmt: skip
    for module in model.modules():
        tensors += [getattr(module, "conv1d_state", None), getattr(module, "recurrent_states", None)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _result(start: float, first: float, end: float, new_tokens: int, state_bytes: int) -> dict[str, Any]:
    decode_s = end - first
    return {
        "new_tokens": new_tokens,
        "prefill_s": round(first - start, 4),
        "decode_tok_s": round((new_tokens - 1) / decode_s, 2) if new_tokens > 1 and decode_s > 0 else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "state_bytes": state_bytes,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage: ru_maxrss keeps the high-water mark of the
    parent across fork + exec, so every worker would report the (large) parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(system: str, path: Path, prompt: list[int], new_tokens: int, threads: int, timeout: float) -> dict:
    """Measure one system in a fresh process; returns its result (or an error entry)."""
    tokens = ",".join(map(str, prompt))
    args = ["--prompt", tokens, "--new-tokens", str(new_tokens), "--threads", str(threads)]
    return _spawn(system, path, args, {"new_tokens": new_tokens}, timeout)


def _spawn(system: str, path: Path, args: list[str], cell: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one worker; its last stdout line is its JSON result. `cell` names the measurement in an error."""
    cmd = [sys.executable, "-m", "gemma_export.bench", "--worker", system, str(path), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"system": system, **cell, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"system": system, **cell, "error": last}
    return {"system": system, **json.loads(done.stdout.strip().splitlines()[-1])}


def run_embedding_worker(
    system: str, path: Path, cell: dict[str, int], model: dict[str, int], threads: int, timeout: float
) -> dict[str, Any]:
    """Embed one (batch, seq_length) cell with one system in a fresh process."""
    args = [
        "--batch", str(cell["batch"]), "--seq-length", str(cell["seq_length"]),
        "--vocab-size", str(model["vocab_size"]), "--bos", str(model["bos_token_id"]), "--dim", str(model["dim"]),
        "--threads", str(threads), "--min-seconds", str(MIN_CELL_SECONDS), "--max-repetitions", str(MAX_REPETITIONS),
    ]  # fmt: skip
    return _spawn(system, path, args, cell, timeout)


def bench_prompt(vocab_size: int, length: int, bos: int) -> list[int]:
    rng = np.random.default_rng(0)
    return [bos, *rng.integers(min(4, vocab_size - 1), vocab_size, length - 1).tolist()]


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BadInput(f"--new-tokens must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 2:
        raise BadInput(f"--new-tokens must list counts >= 2, got {text!r}")
    return counts


def parse_sizes(text: str, option: str) -> list[int]:
    """A comma-separated list of positive integers (--batch-sizes, --seq-lengths)."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BadInput(f"{option} must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise BadInput(f"{option} must list integers >= 1, got {text!r}")
    return sizes


def is_embedding_artifact(artifact: Path) -> bool:
    from gemma_export import package

    return package.read_manifest(artifact)["model"].get("task") == EMBEDDING_TASK


def prepare_random(name: str, workdir: Path, layers: int | None, stages) -> tuple[Path, Path]:
    """A random-weight checkpoint of a published size (optionally fewer layers) and its artifact, made once.

    An embedding model (embeddinggemma-300m) is written as its sentence-transformers folder, Dense stack
    768 -> 3072 -> 768 (4 x hidden) as EmbeddingGemma's. The checkpoint is written to a scratch folder and
    renamed when complete, so an interrupted run is redone, not reused.
    """
    import shutil

    from gemma_export import random_checkpoint
    from gemma_export.build import BuildOptions, build

    if name not in random_checkpoint.PUBLISHED_CONFIGS:
        known = ", ".join(random_checkpoint.PUBLISHED_CONFIGS)
        raise BadInput(f"--random {name!r} is not a published size; choose one of: {known}")
    config = dict(random_checkpoint.PUBLISHED_CONFIGS[name])
    tag = name
    if layers is not None:
        if not 1 <= layers <= config["num_hidden_layers"]:
            raise BadInput(f"--layers must be between 1 and {config['num_hidden_layers']} for {name}")
        config["num_hidden_layers"] = layers
        config.pop("layer_types", None)
        tag = f"{name}-{layers}l"
    checkpoint, artifact = workdir / tag / "checkpoint", workdir / tag / "artifact"
    if not (checkpoint / "config.json").is_file():
        partial = checkpoint.with_name("checkpoint.partial")
        shutil.rmtree(partial, ignore_errors=True)
        with stages.stage(f"random checkpoint {tag}"):
            if random_checkpoint.is_embedding_config(config):
                dense = (4 * config["hidden_size"],)
                random_checkpoint.write_random_embedding_folder(partial, config, dense=dense, seed=0)
            else:
                random_checkpoint.write_random_checkpoint(partial, config, seed=0, max_shard_bytes=2**31)
        shutil.rmtree(checkpoint, ignore_errors=True)
        partial.rename(checkpoint)
    if not (artifact / "manifest.json").is_file():
        build(checkpoint, artifact, BuildOptions(force=True), stages)
    return checkpoint, artifact


def run_bench(
    artifact: Path,
    checkpoint: Path | None,
    new_tokens: list[int],
    prompt_tokens: int,
    threads: int,
    compare: bool,
    timeout: float,
    stages,
) -> dict[str, Any]:
    from gemma_export import package

    manifest = package.read_manifest(artifact)
    cfg = manifest["model"]["config"]
    prompt = bench_prompt(cfg["vocab_size"], prompt_tokens, cfg["bos_token_id"])
    rows = []
    for n in new_tokens:
        with stages.stage(f"gemma-export, {n} new tokens"):
            rows.append(run_worker("gemma-export", artifact, prompt, n, threads, timeout))
        if compare and checkpoint is not None:
            with stages.stage(f"transformers eager, {n} new tokens"):
                rows.append(run_worker("transformers", checkpoint, prompt, n, threads, timeout))
    for row in rows:
        ours = next(r for r in rows if r["system"] == "gemma-export" and r["new_tokens"] == row["new_tokens"])
        if row.get("decode_tok_s") and ours.get("decode_tok_s"):
            row["speedup_vs_this"] = round(ours["decode_tok_s"] / row["decode_tok_s"], 2)
    return {
        "task": "generation",
        "model": manifest["model"]["type"],
        "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in cfg},
        "prompt_tokens": prompt_tokens,
        "threads": threads or os.cpu_count(),
        "rows": rows,
    }


def run_embedding_bench(
    artifact: Path,
    folder: Path | None,
    batch_sizes: list[int],
    seq_lengths: list[int],
    threads: int,
    compare: bool,
    timeout: float,
    stages,
) -> dict[str, Any]:
    """Sentences/s of an embedding artifact, per (batch, length) cell, beside sentence-transformers on `folder`."""
    from gemma_export import package

    manifest = package.read_manifest(artifact)
    cfg = manifest["model"]["config"]
    max_length = manifest["build"]["max_length"]
    if max(seq_lengths) > max_length:
        raise BadInput(f"--seq-lengths {max(seq_lengths)} exceeds the model's maximum length of {max_length}")
    model = {"vocab_size": cfg["vocab_size"], "bos_token_id": cfg["bos_token_id"], "dim": manifest["model"]["dim"]}
    rows = []
    for length in seq_lengths:
        for batch in batch_sizes:
            cell = {"batch": batch, "seq_length": length}
            with stages.stage(f"gemma-export, {batch} x {length} tokens"):
                ours = run_embedding_worker("gemma-export", artifact, cell, model, threads, timeout)
            rows.append(ours)
            if compare and folder is not None:
                with stages.stage(f"sentence-transformers, {batch} x {length} tokens"):
                    theirs = run_embedding_worker("sentence-transformers", folder, cell, model, threads, timeout)
                if "embedding" in ours and "embedding" in theirs:
                    diff = np.abs(np.array(ours["embedding"]) - np.array(theirs["embedding"])).max()
                    theirs["max_abs_diff"] = float(f"{diff:.3g}")
                if ours.get("sentences_s") and theirs.get("sentences_s"):
                    theirs["speedup_vs_this"] = round(ours["sentences_s"] / theirs["sentences_s"], 2)
                rows.append(theirs)
            if ours.get("sentences_s"):
                ours["speedup_vs_this"] = 1.0
    for row in rows:
        row.pop("embedding", None)
    return {
        "task": EMBEDDING_TASK,
        "model": manifest["model"]["type"],
        "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in cfg},
        "dim": model["dim"],
        "threads": threads or os.cpu_count(),
        "min_cell_seconds": MIN_CELL_SECONDS,
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gemma_export.progress import human_bytes

    if result.get("task") == EMBEDDING_TASK:
        print_embedding_table(result)
        return

    title = (f"{result['model']} {result['config']}, prompt {result['prompt_tokens']} tokens, "
             f"{result['threads']} threads")  # fmt: skip
    table = Table("new tokens", "system", "prefill s", "decode tok/s", "ours / this", "peak RSS", "state", title=title)
    for r in result["rows"]:
        if "error" in r:
            table.add_row(str(r["new_tokens"]), r["system"], "-", r["error"], "-", "-", "-")
            continue
        table.add_row(str(r["new_tokens"]), r["system"], f"{r['prefill_s']:.3f}", str(r["decode_tok_s"]),
                      str(r.get("speedup_vs_this", "-")), human_bytes(r["peak_rss_bytes"]),
                      human_bytes(r["state_bytes"]))  # fmt: skip
    Console().print(table)


def print_embedding_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gemma_export.progress import human_bytes

    title = (f"{result['model']} {result['config']}, dim {result['dim']}, {result['threads']} threads, "
             f"synthetic ids, no padding")  # fmt: skip
    columns = ("batch", "tokens", "system", "sentences/s", "ms / batch", "calls", "ours / this", "peak RSS",
               "max |diff|")  # fmt: skip
    table = Table(*columns, title=title)
    for r in result["rows"]:
        cell = (str(r["batch"]), str(r["seq_length"]), r["system"])
        if "error" in r:
            table.add_row(*cell, "-", r["error"], "-", "-", "-", "-")
            continue
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        table.add_row(*cell, f"{r['sentences_s']:.2f}", f"{r['batch_ms']:.1f}", str(r["repetitions"]),
                      str(r.get("speedup_vs_this", "-")), human_bytes(r["peak_rss_bytes"]), diff)  # fmt: skip
    Console().print(table)


def _main() -> None:
    parser = argparse.ArgumentParser(description="gemma-export bench worker (internal)")
    parser.add_argument("--worker", choices=sorted({*SYSTEMS, *EMBEDDING_SYSTEMS}), required=True)
    parser.add_argument("path", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    decode = parser.add_argument_group("decoders")
    decode.add_argument("--prompt")
    decode.add_argument("--new-tokens", type=int)
    embed = parser.add_argument_group("embedding models (given --batch)")
    embed.add_argument("--batch", type=int)
    embed.add_argument("--seq-length", type=int)
    embed.add_argument("--vocab-size", type=int)
    embed.add_argument("--bos", type=int)
    embed.add_argument("--dim", type=int)
    embed.add_argument("--min-seconds", type=float, default=MIN_CELL_SECONDS)
    embed.add_argument("--max-repetitions", type=int, default=MAX_REPETITIONS)
    args = parser.parse_args()
    if args.batch is not None:
        ids = synthetic_batch(args.vocab_size, args.batch, args.seq_length, args.bos)
        timing = {"min_seconds": args.min_seconds, "max_repetitions": args.max_repetitions}
        embedders = {"gemma-export": measure_ours_embedding, "sentence-transformers": measure_sentence_transformers}
        result = embedders[args.worker](args.path, ids, args.dim, args.threads, timing)
        result = {"batch": args.batch, "seq_length": args.seq_length, **result, "peak_rss_bytes": peak_rss_bytes()}
    else:
        prompt = [int(t) for t in args.prompt.split(",")]
        measure = measure_ours if args.worker == "gemma-export" else measure_transformers
        result = measure(args.path, prompt, args.new_tokens, args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
