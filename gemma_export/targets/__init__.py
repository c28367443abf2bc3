"""Targets: what the portable graph is lowered to, behind one interface (`base.Target`).

    onnx     the portable graph: ai.gemma ops with their function bodies (any ONNX runtime; ONNX Runtime inlines)
    ort-cpu  ONNX Runtime's CPU kernels (GroupQueryAttention, fused norms and RoPE), where exact
    tensorrt TensorRT engines; the graph with plugin nodes that keep their function bodies (a package)

Adding a target: a module here with a `Target` subclass and `TARGET = ...`, and one entry below. Modules are
imported on first use: the lowering code (onnxscript's rewriter, torch's reference ops) is not loaded by a
command that only names a target.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gemma_export.errors import BadInput

if TYPE_CHECKING:
    from gemma_export.targets.base import Target

_MODULES = {  # name -> module defining TARGET; the first is the default
    "ort-cpu": "gemma_export.targets.ort_cpu",
    "onnx": "gemma_export.targets.onnx",
    "tensorrt": "gemma_export.targets.tensorrt",
}
NAMES: tuple[str, ...] = tuple(_MODULES)
DEFAULT = NAMES[0]


def target(name: str) -> Target:
    """The registered target called `name`; a one-line error naming the others otherwise."""
    if name not in _MODULES:
        raise BadInput(f"--target {name!r} is not supported; choose one of: {', '.join(NAMES)}")
    found = importlib.import_module(_MODULES[name]).TARGET
    assert found.name == name, f"{_MODULES[name]} registers {found.name!r}, not {name!r}"
    return found
