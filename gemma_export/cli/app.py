"""The `gemma-export` command line: the Typer app and the options its commands share (one file per command
beside this one; `main.py` runs them).

Exit codes: 0 ok, 1 a parity gate failed, 2 bad input (one line on stderr), 3 internal error.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn Gemma checkpoints into ONNX / ONNX Runtime artifacts and prove they compute what the model does.",
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable result on stdout.")]
AllowPickleFlag = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Read pickled weights (pytorch_model.bin, *.ckpt, *.pt) when there is no safetensors, with "
        "torch.load(weights_only=True) only: a file holding anything but tensors is refused.",
    ),
]


def emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
    else:
        print(text)
