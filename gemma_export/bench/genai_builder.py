"""onnxruntime-genai's model builder, with the one shim it needs for Gemma 3 under transformers 5.

Why: transformers 5 nests Gemma 3's RoPE settings per layer type (`rope_parameters = {"full_attention":
{...}, "sliding_attention": {...}}`, and drops the top-level `rope_theta` / `rope_local_base_freq`), while the
builder of onnxruntime-genai 0.18.0 reads a flat `rope_parameters["rope_type"]` (`Model.make_rope_init`:
`KeyError: 'rope_type'`), the global theta from `config.rope_theta` and the local one from
`config.rope_local_base_freq` (`Gemma3Model.__init__`). The shim flattens the nested form before the
builder's RoPE initialisation: the global layers' settings become the flat ones (as transformers 4 wrote
them), the sliding layers' theta becomes `rope_local_base_freq`. A checkpoint in the flat form is untouched.

Checked: with the shim, the builder's model of a Gemma 3 without RoPE scaling (270M, 1B) gives transformers'
logits to 2e-6 and its greedy tokens (tests/bench/test_run.py), up to its rounding of the embedding scale
`sqrt(hidden)` to two decimals (~1e-3 at 270M's 640). Known limit of the builder itself, not fixed here: it
reuses the global layers' linear scaling factor for the local RoPE cache (`Gemma3Model.
make_rotary_embedding_multi_cache` changes only theta), so a Gemma 3 with `rope_type: linear` on its global
layers (4B and up, and TINY_CONFIGS["gemma3_text"]) gets wrong local RoPE, whatever the transformers version:
logits off by ~1 on the tiny config; setting the factor to 1 for the local cache makes them match (2e-6).
The speed it measures is unaffected; the bench's `same_tokens` check shows it.

Run as `python -m gemma_export.bench.genai_builder ARGS`, with the builder's own arguments
(`-i INPUT_DIR -o OUT -p fp32|int4|int8 -e cpu -c CACHE [--extra_options k=v ...]`).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

GENAI_VERSION = "0.18.0"  # the version the shim was written against (and checked with)


def flatten_rope(config: Any) -> bool:
    """Turn transformers 5's per-layer-type rope_parameters into the flat form; True if it changed."""
    params = getattr(config, "rope_parameters", None)
    if not (isinstance(params, dict) and "full_attention" in params and "rope_type" not in params):
        return False
    full, local = dict(params["full_attention"]), params.get("sliding_attention", params["full_attention"])
    config.rope_parameters = full
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = local["rope_theta"]
    return True


def patch(builder: Any) -> None:
    """Wrap `make_rope_init` of the Gemma 3 builder class that `builder` (the builder module) dispatches to."""
    cls = builder.Gemma3Model
    if getattr(cls.make_rope_init, "_gemma_export_shim", False):
        return
    original = cls.make_rope_init

    def make_rope_init(self: Any, config: Any) -> None:
        if flatten_rope(config):
            # The base __init__ read config.rope_theta (absent in the nested form) before this call.
            self.rope_attrs["theta"] = config.rope_theta
        original(self, config)

    make_rope_init._gemma_export_shim = True  # type: ignore[attr-defined]
    cls.make_rope_init = make_rope_init


def checkpoint_key(checkpoint: Path) -> str:
    """Names a checkpoint's cached genai models: its folder name and a hash of the genai version, where the
    checkpoint is and its files' names, sizes and times (a rewritten checkpoint gets a new key; hashing
    gigabytes of weights would not pay)."""
    from importlib.metadata import version

    checkpoint = checkpoint.resolve()
    h = hashlib.sha256(f"{version('onnxruntime-genai')}:{checkpoint}".encode())  # a new builder builds anew
    for f in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(checkpoint)}:{st.st_size}:{st.st_mtime_ns};".encode())
    name = checkpoint.parent.name if checkpoint.name == "checkpoint" else checkpoint.name
    return f"{name}-{h.hexdigest()[:12]}"


def builder_options(precision: str, block_size: int | None = None, accuracy_level: int | None = None) -> list[str]:
    """The builder's --extra_options for one build.

    fp32: shared_embeddings=false. The builder's default for tied embeddings (shared_embeddings=true) feeds the
    embedding Gather from a Transpose of the LM head's weight; ONNX Runtime folds that Transpose at load when
    the matrix is small (gemma-3-270m: 0.67 GB, folded, at the cost of a second copy), but not the 1.2 GB of
    gemma-3-1b, which it then transposes at every step (10x slower decode, measured). Unshared is its faster
    configuration at every size, so that is what we compare against. int4/int8 keep the default: the shared
    quantized matrix (GatherBlockQuantized + MatMulNBits, as ours) is the builder's intended design there.
    Block size and accuracy level (activations: 4 = int8) follow our artifact's. Symmetry does not: the builder's
    asymmetric (is_symmetric=false) shared embedding is a model ONNX Runtime refuses to load (0.18.0: "Type
    (tensor(uint8)) of output arg (/model/embed_tokens/Reshape/output_0) ... does not match expected type
    (tensor(float))"), so it keeps its default, symmetric (no zero points; ours has them).
    """
    if precision == "fp32":
        return ["shared_embeddings=false"]
    options = [f"block_size={block_size}"] if block_size is not None else []
    if accuracy_level is not None:  # MatMulNBits' 0 (unset) computes in float32: the builder's 1
        options.append(f"accuracy_level={max(accuracy_level, 1)}")
    return options


def variant(precision: str, options: list[str]) -> str:
    """The cache folder name of one build: its precision and builder options."""
    return "-".join([precision, *(o.replace("=", "") for o in options)])


def ensure_model(
    checkpoint: Path,
    workdir: Path,
    precision: str,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    timeout: float = 3600.0,
) -> Path:
    """The builder's model of `checkpoint` under workdir/genai/KEY/VARIANT, built once (in a fresh process).

    Built into a scratch folder and renamed when complete, so an interrupted build is redone, not reused.
    Raises RuntimeError with the builder's last error line.
    """
    options = builder_options(precision, block_size, accuracy_level)
    out = workdir / "genai" / checkpoint_key(checkpoint) / variant(precision, options)
    if (out / "genai_config.json").is_file():
        return out
    partial, cache = out.with_name(out.name + ".partial"), out.with_name(out.name + ".cache")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "gemma_export.bench.genai_builder", "-i", str(checkpoint), "-o", str(partial),
           "-p", precision, "-e", "cpu", "-c", str(cache)]  # fmt: skip
    cmd += ["--extra_options", *options] if options else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"its builder timed out after {timeout:.0f} s") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"its builder failed: {(lines or ['no output'])[-1]}")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main() -> None:
    # The builder imports its siblings as top-level modules (`builders`, `quantization`: onnxruntime_genai.models
    # puts its own folder on sys.path), so its classes are reached through the builder module, not by package.
    from onnxruntime_genai.models import builder

    patch(builder)
    args = builder.get_args()
    extra = builder.parse_extra_options(
        args.model_name, args.input, args.output, args.precision, args.execution_provider, args.cache_dir,
        args.extra_options, builder_config_version=args.builder_config_version, target_options=args.target_options,
        drafter_options=args.drafter_options, speculative_options=args.speculative_options,
        runtime_config=args.runtime_config, search=args.search,
    )  # fmt: skip
    builder.create_model(
        args.model_name, args.input, args.output, args.precision, args.execution_provider, args.cache_dir, **extra
    )


if __name__ == "__main__":
    main()
