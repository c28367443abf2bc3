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


def prepare_random(name: str, workdir: Path, layers: int | None, stages) -> tuple[Path, Path]:
    """A random-weight checkpoint of a published size (optionally fewer layers) and its artifact, made once."""
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
        with stages.stage(f"random checkpoint {tag}"):
            random_checkpoint.write_random_checkpoint(checkpoint, config, seed=0, max_shard_bytes=2**31)
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
        "model": manifest["model"]["type"],
        "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in cfg},
        "prompt_tokens": prompt_tokens,
        "threads": threads or os.cpu_count(),
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gemma_export.progress import human_bytes

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


def _main() -> None:
    parser = argparse.ArgumentParser(description="gemma-export bench worker (internal)")
    parser.add_argument("--worker", choices=SYSTEMS, required=True)
    parser.add_argument("path", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    prompt = [int(t) for t in args.prompt.split(",")]
    measure = measure_ours if args.worker == "gemma-export" else measure_transformers
    print(json.dumps(measure(args.path, prompt, args.new_tokens, args.threads)))


if __name__ == "__main__":
    _main()
