"""Decode speed of the C++ runtime (build/cpp/gemma-run) beside the Python client, in one run:

    python -m gemma_export.dev.native_bench ARTIFACT [--prompt-tokens 128] [--new-tokens 128] [--threads 2]
                                           [--repeat 3] [--gemma-run build/cpp/gemma-run]

Both run the same greedy loop on the same prompt (bench/workers.py's synthetic ids), end-of-sequence ignored so
that both decode exactly --new-tokens, each repeat in a fresh process, the two interleaved (who goes first
alternates); medians are
reported. prefill_s: prompt in -> first token picked; decode_s: the other N - 1 tokens. Both sides must pick
the same tokens (a check that they computed the same thing). ONNX Runtime: the onnxruntime package's library
for both ($GEMMA_ORT_LIBRARY set to it for gemma-run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gemma_export.bench.workers import synthetic_batch
from gemma_export.manifest import Manifest


def python_worker(artifact: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    """The Python client's loop (runtime/session.py's generate), timed at each forward pass's end."""
    from gemma_export.runtime.session import OrtDecoder, generate

    manifest = Manifest.read(artifact)
    decoder = OrtDecoder(artifact, manifest, threads=threads)
    ends: list[float] = []
    step = decoder.step

    def timed(*args, **kwargs):
        out = step(*args, **kwargs)
        ends.append(time.perf_counter())
        return out

    decoder.step = timed
    started = time.perf_counter()
    tokens = generate(decoder, [ids], new_tokens, eos_ids=(), pad_id=manifest.model.config.pad_token_id)[0]
    first_pass_calls = len(ends) - (new_tokens - 1)  # the prompt's chunks
    return {
        "prefill_s": ends[first_pass_calls - 1] - started,
        "decode_s": ends[-1] - ends[first_pass_calls - 1],
        "tokens": tokens,
    }


def ort_library() -> str:
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    return str(sorted(capi.glob("libonnxruntime.so.1*"))[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gemma-run", type=Path, default=Path("build/cpp/gemma-run"))
    parser.add_argument("--python-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = Manifest.read(args.artifact).model.config
    ids = synthetic_batch(cfg.vocab_size, 1, args.prompt_tokens, cfg.bos_token_id)[0].tolist()
    if args.python_worker:
        print(json.dumps(python_worker(args.artifact, ids, args.new_tokens, args.threads)))
        return 0

    python_cmd = [sys.executable, "-m", "gemma_export.dev.native_bench", str(args.artifact), "--python-worker",
                  "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                  "--threads", str(args.threads)]  # fmt: skip
    cpp_cmd = [str(args.gemma_run), str(args.artifact), "--token-ids", ",".join(map(str, ids)), "--max-new-tokens",
               str(args.new_tokens), "--threads", str(args.threads), "--ignore-eos", "--bench", "--json"]  # fmt: skip
    env = {**os.environ, "GEMMA_ORT_LIBRARY": os.environ.get("GEMMA_ORT_LIBRARY") or ort_library()}
    runs: dict[str, list[dict]] = {"python": [], "c++": []}
    for repeat in range(args.repeat):
        for side in ("python", "c++")[:: 1 if repeat % 2 == 0 else -1]:  # alternate who goes first
            if side == "python":
                py = subprocess.run(python_cmd, capture_output=True, text=True, check=True, env=env)
                runs["python"].append(json.loads(py.stdout.splitlines()[-1]))
            else:
                cpp = json.loads(subprocess.run(cpp_cmd, capture_output=True, text=True, check=True, env=env).stdout)
                runs["c++"].append({**cpp, "tokens": cpp["outputs"][0]["new_ids"]})
    same = sum(a == b for a, b in zip(runs["python"][0]["tokens"], runs["c++"][0]["tokens"], strict=True))
    print(f"{args.artifact}: prompt {args.prompt_tokens}, {args.new_tokens} new tokens, {args.threads} threads, "
          f"median of {args.repeat}; same greedy tokens: {same}/{args.new_tokens}")  # fmt: skip
    rows = {}
    for name, results in runs.items():
        prefill = statistics.median(r["prefill_s"] for r in results)
        decode = statistics.median(r["decode_s"] for r in results)
        rows[name] = (args.prompt_tokens / prefill, (args.new_tokens - 1) / decode)
        print(f"  {name:7s} prefill {rows[name][0]:8.1f} tok/s   decode {rows[name][1]:7.2f} tok/s")
    print(f"  c++ / python decode: {rows['c++'][1] / rows['python'][1]:.3f}")
    return 0 if same == args.new_tokens and np.isfinite(rows["c++"][1]) else 1


if __name__ == "__main__":
    sys.exit(main())
