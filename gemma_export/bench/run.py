"""`gemma-export bench`: speed and memory of an artifact beside the alternatives, in the same run.

Every measurement runs in a fresh worker process (`gemma_export.bench.workers`, a child of this one), so
that peak RSS is that system's alone and systems never share warm caches.

Decoders, per (batch, prompt tokens, new tokens) cell, each system `repeat` times (interleaved, so that a
busy moment of the machine does not fall on one system only), the median reported:

    gemma-export        the artifact on ONNX Runtime
    transformers        eager PyTorch on the checkpoint, fp32
    onnxruntime-genai   its model builder's model of the same checkpoint (`genai_builder`), at our precision
                        (fp32; int4/int8 with our block size when the artifact is quantized), run by its
                        Generator API
    llama.cpp           llama-bench on each GGUF file given (--gguf; `gemma_export.bench.llamacpp`, which builds
                        its tools once), the precision column its type (Q4_K_M, F32, ...); batch 1 only.
                        llama-bench picks no tokens: no same_tokens check (None)

Row keys (JSON):

    system, precision, batch, prompt_tokens, new_tokens, runs (measurements taken)
    first_token_s     prompt in -> first token out (median)
    prefill_tok_s     batch * prompt_tokens / first_token_s
    decode_tok_s      batch * (new_tokens - 1) / median time of the remaining new_tokens - 1 steps
    peak_rss_bytes    the worker's peak resident memory (VmHWM; the largest of its runs), loading included
    end_rss_bytes     its resident memory after the last token (VmRSS; the largest of its runs; None: not
                      observed, llama.cpp): ONNX Runtime's transient copies while it pre-packs weights are gone
    state_bytes       the carried decode state after the last token (None: not observable, genai, llama.cpp)
    same_tokens       how many leading generated tokens (first row) equal ours: a check, not a speed (None:
                      a system that picks no tokens, llama.cpp)
    prefill_ratio, decode_ratio   ours / this system (1.0 on our row)
    samples           each run's first_token_s and decode_tok_s
    error             instead of the numbers, when that system failed

Result keys: task ("generation"), model, config, precision, threads, repeat, systems, rows, notes (one line
per system that was skipped, and why), build (with --random: `gemma-export build`'s peak RSS against the fp32
weight bytes, measured in its own process: `peak_rss_bytes` is the max over its process tree, i.e. the build
process's VmHWM or its verify stage's ONNX Runtime child's, whichever is larger, with `peak_rss_parent_bytes`,
`peak_rss_child_bytes` and `peak_rss_together_bytes`, the two's sum while the child ran, beside it).

Embedding artifacts (beside sentence-transformers on PyTorch): a worker embeds a batch of B sentences of
exactly L synthetic token ids (no padding; both systems draw the same ids from the same seed), once to warm
up, then repeatedly until at least MIN_CELL_SECONDS have passed (at most MAX_REPETITIONS calls); rows have
sentences_s, batch_ms, repetitions, peak_rss_bytes, speedup_vs_this and (sentence-transformers' row)
max_abs_diff from our embeddings of the same ids.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.bench.llamacpp import NAME as LLAMA_CPP
from gemma_export.bench.workers import GENAI
from gemma_export.errors import BadInput, GemmaExportError
from gemma_export.manifest import Manifest

MIN_CELL_SECONDS = 2.0  # embedding cells: timed calls run at least this long (after one warm-up call) ...
MAX_REPETITIONS = 50  # ... but stop after this many calls
EMBEDDING_TASK = "sentence-embedding"
OURS = "gemma-export"
# --systems names -> systems. "transformers" is the PyTorch original of either kind (sentence-transformers
# for an embedding model).
SYSTEM_NAMES = {"transformers": "transformers", "genai": GENAI, GENAI: GENAI,
                "sentence-transformers": "transformers", LLAMA_CPP: LLAMA_CPP}  # fmt: skip
# The default (no --systems): every one available; llama.cpp when --gguf names its model.
OTHER_SYSTEMS = ("transformers", GENAI, LLAMA_CPP)


# ---------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------


def parse_counts(text: str) -> list[int]:
    """--new-tokens: at least 2 (the first token is the prefill's; decode speed needs another)."""
    return parse_sizes(text, "--new-tokens", minimum=2, what="counts")


def parse_sizes(text: str, option: str, minimum: int = 1, what: str = "integers") -> list[int]:
    """A comma-separated list of integers >= minimum (--batch-sizes, --seq-lengths, --prompt-tokens)."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BadInput(f"{option} must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < minimum:
        raise BadInput(f"{option} must list {what} >= {minimum}, got {text!r}")
    return sizes


def parse_systems(text: str | None, compare: bool) -> list[str] | None:
    """The other systems asked for: a list, or None for every one available. --no-compare: none."""
    if text is None:
        return None if compare else []
    if not compare:
        raise BadInput("--systems and --no-compare contradict each other: give one of them")
    systems: list[str] = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name not in SYSTEM_NAMES:
            raise BadInput(f"--systems: unknown system {name!r}; choose from: transformers, genai, {LLAMA_CPP}")
        if SYSTEM_NAMES[name] not in systems:
            systems.append(SYSTEM_NAMES[name])
    if not systems:
        raise BadInput("--systems must name at least one system (or use --no-compare)")
    return systems


def parse_ggufs(values: list[str] | None, systems: list[str] | None) -> list[Path]:
    """--gguf (repeatable, each comma-separated): llama.cpp's model files, which must exist and be GGUF."""
    from gemma_export.bench import llamacpp

    paths = [Path(t.strip()) for v in values or [] for t in v.split(",") if t.strip()]
    if paths and systems is not None and LLAMA_CPP not in systems:
        raise BadInput(f"--gguf gives {LLAMA_CPP}'s model: add {LLAMA_CPP} to --systems")
    for path in paths:
        if not path.is_file():
            raise BadInput(f"--gguf {path}: no such file")
        llamacpp.gguf_file_type(path)  # a one-line error when it is not GGUF
    return paths


def is_embedding_artifact(artifact: Path) -> bool:

    return Manifest.read(artifact).is_embedding_model


# ---------------------------------------------------------------------------------------------------------
# --random: a random-weight checkpoint of a published size, and our build of it (peak RSS measured)
# ---------------------------------------------------------------------------------------------------------


def prepare_random(
    name: str,
    workdir: Path,
    layers: int | None,
    stages,
    quant: str | None = None,
    timeout: float = 3600.0,
    rebuild: bool = False,
) -> tuple[Path, Path, dict[str, Any]]:
    """A random-weight checkpoint of a published size (optionally fewer layers) and its artifact, made once.

    Kept under workdir/NAME[-Nl]/: checkpoint/, artifact[-QUANT]/ and artifact[-QUANT].build.json (the build's
    figures, reported again when the artifact is reused; `rebuild` builds it again, e.g. after a code change).
    An embedding model (embeddinggemma-300m) is written as its sentence-transformers folder, Dense stack
    768 -> 3072 -> 768 (4 x hidden) as EmbeddingGemma's. The checkpoint is written to a scratch folder and
    renamed when complete, so an interrupted run is redone. The artifact is built by `gemma-export build` in a
    fresh process, whose peak RSS is the build's.
    """

    from gemma_export.dev import random_checkpoint

    if name not in random_checkpoint.PUBLISHED_CONFIGS:
        known = ", ".join(random_checkpoint.PUBLISHED_CONFIGS)
        raise BadInput(f"--random {name!r} is not a published size; choose one of: {known}")
    config = random_checkpoint.cut_depth(random_checkpoint.PUBLISHED_CONFIGS[name], layers, name)
    tag = name if layers is None else f"{name}-{layers}l"
    checkpoint = workdir / tag / "checkpoint"
    quant = None if quant == "none" else quant
    artifact = workdir / tag / ("artifact" if quant is None else f"artifact-{quant}")
    if not (checkpoint / "config.json").is_file():
        with stages.stage(f"random checkpoint {tag}"):
            dense = (4 * config["hidden_size"],)  # EmbeddingGemma's Dense stack: 4 x hidden (unused by decoders)
            random_checkpoint.write_once(checkpoint, config, seed=0, dense=dense)
    record = artifact.with_name(artifact.name + ".build.json")
    if (artifact / "manifest.json").is_file() and record.is_file() and not rebuild:
        return checkpoint, artifact, {**json.loads(record.read_text()), "cached": True}
    with stages.stage(f"gemma-export build {tag}" + (f" --quant {quant}" if quant else "")):
        info = measure_build(checkpoint, artifact, ["--quant", quant] if quant else [], timeout)
    record.write_text(json.dumps(info, indent=2) + "\n")
    return checkpoint, artifact, {**info, "cached": False}


def measure_build(checkpoint: Path, artifact: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    """`gemma-export build` in a fresh process: its time and peak RSS beside the fp32 bytes of the weights, read
    from the stages it reports (`--json`): each stage's peak is over the process tree (the build and the child
    its verify stage runs ONNX Runtime in), with the two apart where a child ran."""
    command = ["build", str(checkpoint), "-o", str(artifact), "--force", *extra]
    cmd = [sys.executable, "-m", "gemma_export.cli", *command, "--json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise GemmaExportError(f"gemma-export build {checkpoint} timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
        message = lines[-1].removeprefix("gemma-export: ").removeprefix("error: ")
        error = GemmaExportError(f"building {checkpoint}: {message}")
        error.exit_code = done.returncode if done.returncode in (1, 2) else 3
        raise error
    stages = json.loads(done.stdout)["stages"]
    children = [c for s in stages for c in s.get("children", [])]
    peak = max(s["peak_rss"] for s in stages)
    weights = fp32_weight_bytes(checkpoint)
    return {
        "command": "gemma-export " + " ".join(command),
        "seconds": round(sum(s["seconds"] for s in stages), 1),
        "peak_rss_bytes": peak,
        "fp32_weight_bytes": weights,
        "rss_over_fp32_weights": round(peak / weights, 3),
        "peak_rss_parent_bytes": max(s.get("peak_rss_self", s["peak_rss"]) for s in stages),
        "peak_rss_child_bytes": max((c["peak_rss"] for c in children), default=None),
        "peak_rss_together_bytes": max((c["together"] for c in children), default=None),
    }


def fp32_weight_bytes(checkpoint: Path) -> int:
    """4 bytes per stored weight (tied weights once), counted from the safetensors headers alone."""
    total = 0
    for path in sorted(checkpoint.rglob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(4 * int(np.prod(t["shape"])) for k, t in header.items() if k != "__metadata__")
    return total


# ---------------------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------------------


def _spawn(system: str, path: Path, args: list[str], cell: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one worker; its last stdout line is its JSON result. `cell` names the measurement in an error."""
    cmd = [sys.executable, "-m", "gemma_export.bench.workers", "--worker", system, str(path), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"system": system, **cell, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"system": system, **cell, "error": last}
    return {"system": system, **cell, **json.loads(done.stdout.strip().splitlines()[-1])}


def precision_label(manifest: Manifest) -> str:
    q = manifest.quantization
    if q is None:
        return manifest.build.precision
    return f"int{q.bits} b{q.block_size}"


def genai_installed() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def other_systems(
    manifest: Manifest, checkpoint: Path | None, requested: list[str] | None, workdir: Path, timeout: float,
    stages, ggufs: list[Path] | None = None,
) -> tuple[dict[str, tuple[Path, str]], list[str]]:  # fmt: skip
    """{target: (what its worker loads, precision)} for the systems that can run, and a note per skipped one.

    A target is a system's name, or for llama.cpp "llama.cpp" then " #i" past the first GGUF file (one target
    per file; `system_of` gives the system back).
    """
    ready: dict[str, tuple[Path, str]] = {}
    notes: list[str] = []
    for system in list(OTHER_SYSTEMS) if requested is None else requested:
        if system == LLAMA_CPP:
            if ggufs or requested is not None:  # by default, only when --gguf names its model
                targets, note = llamacpp_targets(ggufs or [], timeout, stages)
                ready.update(targets)
                notes.append(f"{LLAMA_CPP}: {note}")
        elif checkpoint is None:
            notes.append(f"{system}: skipped: no checkpoint (give --checkpoint CHECKPOINT_DIR, or use --random)")
        elif system == "transformers":
            ready[system] = (checkpoint, "fp32")
        else:
            try:
                ready[system], note = genai_target(manifest, checkpoint, workdir, timeout, stages)
                notes += [f"{system}: {note}"] if note else []
            except Skipped as e:
                notes.append(f"{system}: skipped: {e}")
    return ready, notes


class Skipped(Exception):
    """A system that cannot run here; the message says why."""


def system_of(target: str) -> str:
    return LLAMA_CPP if target.startswith(LLAMA_CPP) else target


def llamacpp_targets(ggufs: list[Path], timeout: float, stages) -> tuple[dict[str, tuple[Path, str]], str]:
    """llama.cpp's targets, one per GGUF file (its tools built first when missing), and the note about them."""
    from gemma_export.bench import llamacpp

    if not ggufs:
        return {}, "skipped: no GGUF file (give --gguf FILE)"
    try:
        if llamacpp.missing_tools(llamacpp.tools_dir()):
            with stages.stage(f"{LLAMA_CPP} tools (built once, into {llamacpp.tools_dir().parent})") as record:
                llamacpp.ensure_tools(record.report, timeout)
    except llamacpp.ToolsUnavailable as e:
        return {}, f"skipped: {e}"
    targets = {}
    for i, gguf in enumerate(ggufs):
        targets[LLAMA_CPP + (f" #{i + 1}" if i else "")] = (gguf, llamacpp.gguf_file_type(gguf) or "GGUF")
    return targets, ("llama-bench on random ids, batch 1, no warm-up: prompt alone (-p P -n 0), then N - 1 "
                     "tokens at depth P (-p 0 -n N-1 -d P); it picks no tokens, so same_tokens is None")  # fmt: skip


def genai_target(
    manifest: Manifest, checkpoint: Path, workdir: Path, timeout: float, stages
) -> tuple[tuple[Path, str], str | None]:
    """onnxruntime-genai's builder's model of the checkpoint at our precision (built once), and a note if any."""
    if not genai_installed():
        raise Skipped("onnxruntime_genai is not installed (pip install onnxruntime-genai)")
    if "genai_config" not in manifest.files:
        raise Skipped(f"it has no runtime for {manifest.model.type} models")
    q = manifest.quantization
    precision = f"int{q.bits}" if q else "fp32"
    if q and q.bits not in (4, 8):
        raise Skipped(f"its builder has no {precision} weights")
    block, accuracy = (q.block_size, q.accuracy_level) if q else (None, None)
    from gemma_export.bench import genai_builder

    try:
        with stages.stage(f"{GENAI} builder, {precision}"):
            folder = genai_builder.ensure_model(checkpoint, workdir, precision, block, accuracy, timeout)
    except RuntimeError as e:
        raise Skipped(str(e)) from None
    version = importlib.metadata.version("onnxruntime-genai")
    note = None
    if version != genai_builder.GENAI_VERSION:
        note = (f"version {version}; its builder shim was written for {genai_builder.GENAI_VERSION} "
                "(check the same tokens column)")  # fmt: skip
    return (folder, precision + (f" b{block}" if block else "")), note


def decoder_cells(
    batch_sizes: list[int], prompt_tokens: list[int], new_tokens: list[int], max_length: int
) -> list[dict[str, int]]:
    cells = [{"batch": b, "prompt_tokens": p, "new_tokens": n}
             for b in batch_sizes for p in prompt_tokens for n in new_tokens]  # fmt: skip
    for c in cells:
        if c["prompt_tokens"] + c["new_tokens"] > max_length:
            raise BadInput(f"--prompt-tokens {c['prompt_tokens']} + --new-tokens {c['new_tokens']} exceeds the "
                           f"model's maximum length of {max_length}")  # fmt: skip
    return cells


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def summarise(system: str, precision: str, cell: dict[str, int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a system's runs of one cell: medians of the times, the largest peak RSS."""
    row: dict[str, Any] = {"system": system, "precision": precision, **cell, "runs": len(runs)}
    failed = next((r for r in runs if "error" in r), None)
    if failed is not None:
        return {**row, "error": failed["error"]}
    batch, prompt, new = cell["batch"], cell["prompt_tokens"], cell["new_tokens"]
    first = statistics.median(r["prefill_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    return {
        **row,
        "first_token_s": _sig(first),
        "prefill_tok_s": _sig(batch * prompt / first),
        "decode_tok_s": _sig(batch * (new - 1) / decode) if decode > 0 else None,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "end_rss_bytes": max((r["end_rss_bytes"] for r in runs if r.get("end_rss_bytes")), default=None),
        "state_bytes": runs[-1]["state_bytes"],
        "tokens": runs[0]["tokens"],
        "samples": {
            "first_token_s": [_sig(r["prefill_s"]) for r in runs],
            "decode_tok_s": [_sig(batch * (new - 1) / r["decode_s"]) if r["decode_s"] > 0 else None for r in runs],
        },
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ours / this system, per cell, for prefill and decode; how many leading tokens match ours."""
    for row in rows:
        key = (row["batch"], row["prompt_tokens"], row["new_tokens"])
        ours = next(r for r in rows if r["system"] == OURS and (r["batch"], r["prompt_tokens"], r["new_tokens"]) == key)
        for metric, ratio in (("prefill_tok_s", "prefill_ratio"), ("decode_tok_s", "decode_ratio")):
            if row.get(metric) and ours.get(metric):
                row[ratio] = _sig(ours[metric] / row[metric])
        if row.get("tokens") is None and "error" not in row:
            row["same_tokens"] = None  # a system that picks no tokens (llama.cpp): nothing to compare
        elif "tokens" in row and "tokens" in ours:
            row["same_tokens"] = next((i for i, (a, b) in enumerate(zip(row["tokens"], ours["tokens"], strict=True))
                                       if a != b), len(ours["tokens"]))  # fmt: skip
    for row in rows:
        row.pop("tokens", None)


def measure_llamacpp(gguf: Path, cell: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """One run of llama.cpp on one cell (two llama-bench processes, `llamacpp.bench`), as a worker's result."""
    from gemma_export.bench import llamacpp

    if cell["batch"] != 1:
        return {"system": LLAMA_CPP, **cell, "error": "llama-bench runs one sequence: batch 1 only"}
    try:
        result = llamacpp.bench(gguf, cell["prompt_tokens"], cell["new_tokens"], threads, timeout=timeout)
    except GemmaExportError as e:
        return {"system": LLAMA_CPP, **cell, "error": str(e)}
    return {"system": LLAMA_CPP, **cell, "prefill_s": result["prefill_s"], "decode_s": result["decode_s"],
            "peak_rss_bytes": result["peak_rss_bytes"], "state_bytes": None, "tokens": None}  # fmt: skip


def run_bench(
    artifact: Path,
    checkpoint: Path | None,
    *,
    batch_sizes: list[int],
    prompt_tokens: list[int],
    new_tokens: list[int],
    threads: int,
    systems: list[str] | None,
    repeat: int,
    timeout: float,
    workdir: Path,
    stages,
    ggufs: list[Path] | None = None,
) -> dict[str, Any]:

    manifest = Manifest.read(artifact)
    cfg = manifest.model.config
    cells = decoder_cells(batch_sizes, prompt_tokens, new_tokens, manifest.build.max_length)
    others, notes = other_systems(manifest, checkpoint, systems, workdir, timeout, stages, ggufs)
    targets = {OURS: (artifact, precision_label(manifest)), **others}
    eos = ",".join(map(str, cfg.eos_token_ids))
    rows = []
    for cell in cells:
        args = ["--batch", str(cell["batch"]), "--prompt-tokens", str(cell["prompt_tokens"]),
                "--new-tokens", str(cell["new_tokens"]), "--vocab-size", str(cfg.vocab_size),
                "--bos", str(cfg.bos_token_id), "--eos", eos, "--threads", str(threads)]  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in targets}
        for r in range(repeat):
            for system, (path, _) in targets.items():
                if runs[system] and "error" in runs[system][-1]:
                    continue  # a system that failed once is not retried in this cell
                what = f"batch {cell['batch']}, prompt {cell['prompt_tokens']}, {cell['new_tokens']} new tokens"
                with stages.stage(f"{system}, {what}, run {r + 1}/{repeat}"):
                    if system_of(system) == LLAMA_CPP:
                        runs[system].append(measure_llamacpp(path, cell, threads, timeout))
                    else:
                        runs[system].append(_spawn(system, path, args, cell, timeout))
        rows += [summarise(system_of(t), precision, cell, runs[t]) for t, (_, precision) in targets.items()]
    add_ratios(rows)
    image = measure_image_encoding(artifact, manifest, threads, repeat) if manifest.vision is not None else None
    if image is not None:
        notes = [*notes, f"image encoding (ours, vision graph): one {image['size'][0]}x{image['size'][1]} image -> "
                         f"{image['mm_tokens']} tokens in {image['seconds']:.3g} s (median of {repeat})"]  # fmt: skip
    return {
        "task": "generation",
        **({"image_encoding": image} if image is not None else {}),
        "model": manifest.model.type,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "precision": precision_label(manifest),
        "threads": threads or os.cpu_count(),
        "repeat": repeat,
        "systems": list(dict.fromkeys(map(system_of, targets))),
        "rows": rows,
        "notes": notes,
    }


def measure_image_encoding(artifact: Path, manifest: Manifest, threads: int, repeat: int) -> dict[str, Any]:
    """An image + text artifact's vision graph: seconds to encode one image (preprocessed pixels of the
    manifest's size -> image features), after one warm-up run; the median of `repeat`."""
    import time

    import numpy as np

    from gemma_export.runtime.images import OrtVision

    vision = OrtVision(artifact, manifest, threads)
    height, width = vision.preprocessing["size"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
    vision.encode(pixels)  # warm-up: the first run allocates
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        vision.encode(pixels)
        samples.append(time.perf_counter() - start)
    return {"size": [height, width], "mm_tokens": vision.preprocessing["mm_tokens_per_image"],
            "seconds": _sig(statistics.median(samples)), "samples": [_sig(x) for x in samples]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Embedding models
# ---------------------------------------------------------------------------------------------------------


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


def run_embedding_bench(
    artifact: Path,
    folder: Path | None,
    batch_sizes: list[int],
    seq_lengths: list[int],
    threads: int,
    systems: list[str] | None,
    timeout: float,
    stages,
    ggufs: list[Path] | None = None,
) -> dict[str, Any]:
    """Sentences/s of an embedding artifact, per (batch, length) cell, beside sentence-transformers on `folder`."""

    manifest = Manifest.read(artifact)
    cfg = manifest.model.config
    max_length = manifest.build.max_length
    if max(seq_lengths) > max_length:
        raise BadInput(f"--seq-lengths {max(seq_lengths)} exceeds the model's maximum length of {max_length}")
    model = {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "dim": manifest.model.dim}
    notes = []
    compare = systems is None or "transformers" in systems
    if compare and folder is None:
        notes.append("sentence-transformers: skipped: no folder (give --checkpoint FOLDER, or use --random)")
    if systems is not None and GENAI in systems:
        notes.append(f"{GENAI}: skipped: it has no embedding models")
    if (LLAMA_CPP in systems) if systems is not None else bool(ggufs):
        notes.append(f"{LLAMA_CPP}: skipped: gemma-export bench runs it on decoders only")
    compare = compare and folder is not None
    rows = []
    for length in seq_lengths:
        for batch in batch_sizes:
            cell = {"batch": batch, "seq_length": length}
            with stages.stage(f"gemma-export, {batch} x {length} tokens"):
                ours = run_embedding_worker(OURS, artifact, cell, model, threads, timeout)
            rows.append(ours)
            if compare:
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
        "model": manifest.model.type,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "dim": model["dim"],
        "threads": threads or os.cpu_count(),
        "min_cell_seconds": MIN_CELL_SECONDS,
        "rows": rows,
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would wrap the table at 80 columns
        console = Console(width=200)
    console.print(embedding_table(result) if result.get("task") == EMBEDDING_TASK else decoder_table(result))
    for line in [*result.get("notes", []), *build_lines(result.get("build"))]:
        console.print(line, markup=False, highlight=False)


def decoder_table(result: dict[str, Any]):
    from rich.table import Table

    from gemma_export.pipeline.progress import human_bytes

    title = (f"{result['model']} {result['config']}, {result['threads']} threads, median of {result['repeat']}; "
             "x = ours / this")  # fmt: skip
    columns = ("batch", "prompt", "new", "system", "precision", "prefill tok/s", "first token s", "decode tok/s",
               "x prefill", "x decode", "peak RSS", "RSS at end", "state", "same tokens")  # fmt: skip
    table = Table(*columns, title=title)
    for r in result["rows"]:
        cell = (str(r["batch"]), str(r["prompt_tokens"]), str(r["new_tokens"]), r["system"], r["precision"])
        if "error" in r:
            table.add_row(*cell, "-", "-", r["error"], *["-"] * 6)
            continue
        table.add_row(*cell, f"{r['prefill_tok_s']:g}", f"{r['first_token_s']:.4g}", f"{r['decode_tok_s']:g}",
                      str(r.get("prefill_ratio", "-")), str(r.get("decode_ratio", "-")),
                      human_bytes(r["peak_rss_bytes"]), human_bytes(r.get("end_rss_bytes")),
                      human_bytes(r["state_bytes"]),
                      same_tokens_cell(r))  # fmt: skip
    return table


def same_tokens_cell(row: dict[str, Any]) -> str:
    same = row.get("same_tokens", "-")
    return "-" if same is None else f"{same}/{row['new_tokens']}"


def build_lines(build: dict[str, Any] | None) -> list[str]:
    if not build:
        return []
    from gemma_export.pipeline.progress import human_bytes

    when = " (measured when it was built)" if build.get("cached") else ""
    split = ""
    if build.get("peak_rss_child_bytes"):
        split = (f" (build process {human_bytes(build['peak_rss_parent_bytes'])}, its ONNX Runtime child "
                 f"{human_bytes(build['peak_rss_child_bytes'])}, "
                 f"{human_bytes(build['peak_rss_together_bytes'])} together)")  # fmt: skip
    return [f"build: peak RSS {human_bytes(build['peak_rss_bytes'])} = {build['rss_over_fp32_weights']:.2f} x the "
            f"fp32 weights ({human_bytes(build['fp32_weight_bytes'])}){split}, {build['seconds']:.0f} s{when}: "
            f"{build['command']}"]  # fmt: skip


def embedding_table(result: dict[str, Any]):
    from rich.table import Table

    from gemma_export.pipeline.progress import human_bytes

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
    return table
