"""A random checkpoint with Gemma 3's real 262,144-token vocabulary, for speed only.

The random checkpoints of the published sizes (`random_checkpoint.write_published`) carry the model's full
vocab_size (262,144 for Gemma 3 and Gemma 4) in their embedding, but a tiny random tokenizer (~500 tokens).
llama.cpp's converter (convert_hf_to_gguf.py; Gemma3Model.modify_tensors, which Gemma 4 inherits) cuts the token
embedding to the tokenizer's size ("remove OOV rows"): on such a folder it writes a GGUF whose tied output layer
is ~500 wide instead of 262,144, a cheaper model than the one measured (E2B's 262,144 x 1,536 output layer is a
large part of each decode step). This makes a sibling folder that it converts at the full size:

    OUT/config.json, *.safetensors, model.safetensors.index.json, generation_config.json
            symlinks to the random checkpoint's files (the 18 GB of E2B are not copied)
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model (those present)
            copied from the real Gemma 3 270M folder (`real_checkpoint.hf_folder()`: vocab 262,144)

The result is meant for measuring speed (llama.cpp's tokens/s on the E2B shape): the weights stay random and
the tokenizer is Gemma 3's, not Gemma 4's (the same size; Gemma 4's own added tokens are missing).

    python -m gemma_export.dev.real_vocab CKPT OUT     make OUT (replacing an OUT made before); print it
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from gemma_export.errors import BadInput

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
LINKED_SUFFIXES = (".safetensors", ".json")


def _vocab_size(folder: Path) -> int | None:
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or {}
    return config.get("vocab_size") or text.get("vocab_size")


def with_real_vocab(ckpt: Path, out: Path, tokenizer_folder: Path | None = None) -> Path:
    """OUT: CKPT's weights and config (symlinked) with the real Gemma 3 tokenizer files (copied).

    Built in a temporary folder beside OUT and renamed when complete; an OUT made before is replaced. The
    checkpoint's vocab_size must equal the tokenizer's (a one-line BadInput otherwise); CKPT is never written.
    """
    ckpt, out = ckpt.resolve(), out.absolute()
    if not (ckpt / "config.json").is_file():
        raise BadInput(f"{ckpt}: no config.json (not a Hugging Face checkpoint folder)")
    if out == ckpt:
        raise BadInput(f"{out}: the output folder must not be the checkpoint itself")
    if tokenizer_folder is None:
        from gemma_export.dev.real_checkpoint import hf_folder

        tokenizer_folder = hf_folder()
    want, have = _vocab_size(ckpt), _vocab_size(tokenizer_folder)
    if want != have:
        raise BadInput(f"{ckpt}: vocab_size {want} is not the real tokenizer's {have}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staged.chmod(0o755)
    try:
        for path in sorted(ckpt.iterdir()):
            if path.name not in TOKENIZER_FILES and path.suffix in LINKED_SUFFIXES and path.is_file():
                (staged / path.name).symlink_to(path)
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copyfile(tokenizer_folder / name, staged / name)
        if not (staged / "tokenizer.json").is_file():
            raise BadInput(f"{tokenizer_folder}: no tokenizer.json")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_export.dev.real_vocab", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a random checkpoint folder of vocab 262,144 (never written)")
    parser.add_argument("out", type=Path, help="the folder to make (symlinks + the real tokenizer files)")
    args = parser.parse_args(argv)
    try:
        print(with_real_vocab(args.checkpoint, args.out))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
