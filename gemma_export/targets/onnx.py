"""`--target onnx`: the portable graph as the optimize (and quantize) stages leave it.

Each `ai.gemma` node keeps its ONNX function body (graphs/*.md), so any ONNX runtime runs it; ONNX Runtime
inlines the bodies. No lowering: the graph an integrator can port to another runtime, or lower themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from gemma_export.targets import genai_config
from gemma_export.targets.base import Target


class PortableOnnx(Target):
    name = "onnx"
    description = "the portable graph: ai.gemma ops with their ONNX function bodies"
    providers = ("CPUExecutionProvider",)

    def lower(self, model: ir.Model) -> ir.Model:
        return model

    def write_extra_files(self, folder: Path, cfg: Any, cache_layout: str | None, max_length: int, encoder: bool
                          ) -> dict[str, str]:  # fmt: skip
        return {} if encoder else genai_config.write(folder, cfg, cache_layout, max_length)


TARGET = PortableOnnx()
