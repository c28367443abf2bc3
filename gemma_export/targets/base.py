"""What a target is: how the portable graph becomes what one runtime runs, and what the artifact carries for it.

A target is one module in this folder defining a `Target` subclass and `TARGET = ThatClass()`, plus one line in
`targets/__init__.py`'s registry. The build (pipeline/build.py) asks it, in order: `lower` the optimized (and
maybe quantized) portable graph; after packaging, `shared_buffers` of the written graph and `write_extra_files`
beside it, then `compile` (a target that builds more from the written graph: TensorRT's engines). The manifest
records its name, `providers` and `build_info`; the runtime named by `runtime` verifies the artifact, on the graph
file `verify_model` names. A target with options of its own reads them in `configure`, which returns the
configured target for one build (the registered instance stays as it was).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir


class Target(ABC):
    name: ClassVar[str]  # the --target value
    description: ClassVar[str]  # one line for --help and the README
    # ONNX Runtime execution providers that run the artifact, in order of preference (manifest build.providers)
    providers: ClassVar[tuple[str, ...]]
    runtime: ClassVar[str] = "onnxruntime"  # which runtime runs and verifies it (runtime/session.py)
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)  # the --precision values it builds

    def configure(self, options: Any) -> Target:
        """This target for one build with `options` (pipeline.options.BuildOptions); one-line errors."""
        return self

    @abstractmethod
    def lower(self, model: ir.Model) -> ir.Model:
        """The portable graph (ai.gemma ops with their function bodies) -> this target's graph."""

    def shared_buffers(self, proto: onnx.ModelProto) -> set[str]:
        """Graph outputs that may be written into their past input's buffer (manifest state[].shared_buffer)."""
        return set()

    def write_extra_files(self, folder: Path, cfg: Any, cache_layout: str | None, max_length: int, encoder: bool
                          ) -> dict[str, str]:  # fmt: skip
        """Files the target's runtime needs beside the graph, written into `folder`: role -> file name."""
        return {}

    def compile(self, folder: Path, inputs: list[dict[str, Any]], max_length: int) -> dict[str, str]:
        """Files built from the written graph (`inputs`: the manifest's input table): role -> file name."""
        return {}

    def build_info(self) -> dict[str, Any]:
        """Fields of the manifest's `build` entry that only this target writes."""
        return {}

    @contextlib.contextmanager
    def verify_model(self, folder: Path) -> Iterator[str]:
        """The graph file (in `folder`) that the build's parity check runs."""
        yield "model.onnx"
