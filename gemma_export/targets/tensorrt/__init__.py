"""`--target tensorrt`: a TensorRT-ready graph and, where a TensorRT builder is installed, engines built from it.

    lower    graph.py       ai.gemma ops -> GemmaAttention / GemmaRGLRU plugin nodes (function bodies kept);
                            --precision fp16|bf16: the weight products in 16 bits, the rest float32
    compile  builder.py     one engine per --compute-capability, with our plugins (plugins.py) and/or without
                            them (bodies inlined), in a child process (engine_child.py); profiles.py sizes them
    verify   (the build's)  the graph on ONNX Runtime CPU against the PyTorch reference (the same gate as every
                            target); bf16, which ONNX Runtime CPU cannot multiply, through emulation.py

`--onnx-only` (or no builder, which otherwise is a one-line error) writes the graph and a manifest with the
`trtexec` command that builds the engine elsewhere. The manifest's `build.tensorrt` records the builder, the
precision, the profile, the plugins and how to load them, and each engine (its file is in `files`).
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from gemma_export.errors import BadInput
from gemma_export.targets.base import Target
from gemma_export.targets.tensorrt import builder, emulation, graph, profiles

FORMS = {"inlined": (False,), "plugins": (True,), "both": (False, True)}  # --engines: which networks to build
PLUGINS_MODULE = "gemma_export.targets.tensorrt.plugins"
LOAD_PLUGINS = (
    f"before deserializing a *.plugins.engine: import tensorrt_rtx as trt (or tensorrt); from {PLUGINS_MODULE} "
    "import register; register(trt) (Python IPluginV3 creators, namespace ai.gemma; enqueue runs the CUDA kernels "
    "of gemma_export.ops.cuda); the other engines need no plugin"
)


@dataclass(frozen=True)
class Settings:
    precision: str = "fp32"
    compute_capabilities: tuple[str, ...] = ("8.6",)
    onnx_only: bool = False
    forms: str = "both"
    profile: dict[str, profiles.Range] = field(default_factory=dict)  # --profile axes
    recipe_profile: dict[str, Any] | None = None


class TensorRT(Target):
    name = "tensorrt"
    description = "TensorRT engines (GemmaAttention / GemmaRGLRU plugins or inlined bodies) and their graph"
    providers = ("CPUExecutionProvider",)  # the graph's own parity gate runs on ONNX Runtime (CPU)
    precisions = ("fp32", "bf16", "fp16")

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.builder: builder.Builder | None = None
        self.plugin_names: list[str] = []
        self.plugin_nodes = 0
        self.products = 0
        self.record: dict[str, Any] = {}

    def configure(self, options: Any) -> TensorRT:
        if options.quant != "none":
            raise BadInput(f"--quant {options.quant} makes com.microsoft.MatMulNBits nodes, which TensorRT cannot "
                           "parse; --target tensorrt takes --precision fp32|bf16|fp16")  # fmt: skip
        recipe_trt = options.recipe.recipe.build.tensorrt if options.recipe is not None else None
        settings = Settings(
            precision=options.precision,
            compute_capabilities=builder.parse_compute_capabilities(options.compute_capabilities or "8.6"),
            onnx_only=options.onnx_only,
            forms=options.engines or "both",
            profile=profiles.parse(options.profile),
            recipe_profile=dict(recipe_trt.profile) if recipe_trt and recipe_trt.profile else None,
        )
        if settings.forms not in FORMS:
            raise BadInput(f"--engines {settings.forms!r}: choose one of {', '.join(FORMS)}")
        configured = TensorRT(settings)
        if not settings.onnx_only:
            configured.builder = builder.find_builder()
            if configured.builder is not None:
                builder.check_targets(configured.builder, settings.compute_capabilities)
            else:
                raise BadInput("no TensorRT builder is installed (pip install tensorrt-rtx==1.7.1.116, or NVIDIA's "
                               "tensorrt); --onnx-only writes the graph and the trtexec command instead")  # fmt: skip
        return configured

    def lower(self, model: ir.Model) -> ir.Model:
        opset = model.opset_imports.get("", 23)
        self.plugin_names = graph.to_plugin_nodes(model, opset)
        self.plugin_nodes = sum(1 for n in model.graph.all_nodes() if n.op_type in graph.PLUGIN_NAMES.values())
        self.products = graph.reduce_precision(model, self.settings.precision)
        return model

    def compile(self, folder: Path, inputs: list[dict[str, Any]], max_length: int) -> dict[str, str]:
        """Engines beside the graph (none with --onnx-only): role -> file name; fills the manifest's record."""
        s = self.settings
        ranges = profiles.resolve(s.profile, s.recipe_profile, max_length)
        shapes = profiles.input_shapes(inputs, ranges)
        roles: dict[str, str] = {}
        engines: list[dict[str, Any]] = []
        for plugins in FORMS[s.forms] if self.builder is not None else ():
            names = {cc: builder.engine_name(cc, plugins) for cc in s.compute_capabilities}
            request = {"model": str(folder / "model.onnx"), "plugins": plugins, "shapes": shapes,
                       "engines": [{"cc": cc, "path": str(folder / n)} for cc, n in names.items()]}  # fmt: skip
            result = builder.build_engines(self.builder, request)
            expected = self.plugin_nodes if plugins else 0
            if result["plugin_layers"] != expected:  # the plugin form must really hold our plugins, and only it
                raise builder.BuilderError(f"{'plugin' if plugins else 'inlined'} network has "
                                           f"{result['plugin_layers']} plugin layers, expected {expected}")  # fmt: skip
            for e in result["engines"]:
                role = f"engine.sm{e['cc'].replace('.', '')}{'.plugins' if plugins else ''}"
                roles[role] = names[e["cc"]]
                engines.append({"file": role, "compute_capability": e["cc"], "plugins": plugins,
                                "layers": result["num_layers"], "plugin_layers": result["plugin_layers"]})  # fmt: skip
        self.record = {
            "builder": self.builder.module if self.builder else None,
            "builder_version": self.builder.version if self.builder else None,
            "precision": s.precision,
            "strongly_typed": True,
            "reduced_precision_products": self.products,
            "profile": {"axes": {k: list(v) for k, v in ranges.items()}, "shapes": shapes},
            "plugins": [
                {
                    "name": n,
                    "version": graph.PLUGIN_VERSION,
                    "namespace": graph.PLUGIN_NAMESPACE,
                    "op": f"{graph.DOMAIN}::{op}",
                    "module": PLUGINS_MODULE,
                }
                for op, n in graph.PLUGIN_NAMES.items()
                if n in self.plugin_names
            ],
            "load": LOAD_PLUGINS if self.plugin_names else "no plugin nodes: the engines need no plugin",
            "engines": engines,
            "trtexec": trtexec_command(shapes),
        }
        return roles

    def build_info(self) -> dict[str, Any]:
        return {"tensorrt": self.record} if self.record else {}

    @contextlib.contextmanager
    def verify_model(self, folder: Path) -> Iterator[str]:
        """The graph file the build's parity check runs: the artifact's, or for bf16 its emulation (ONNX Runtime's
        CPU provider has no bf16 MatMul), deleted afterwards."""
        if self.settings.precision != "bf16":
            yield "model.onnx"
            return
        path = emulation.write(folder)
        try:
            yield path.name
        finally:
            path.unlink(missing_ok=True)


def trtexec_command(shapes: dict[str, list[list[int]]]) -> str:
    """What a datacenter TensorRT user runs on the folder to build the engine for their GPU (no plugins: the
    bodies are inlined; trtexec loads only C++ plugin libraries)."""

    def dims(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, rows[i]))}" for name, rows in shapes.items())

    args = ["trtexec", "--onnx=model.onnx", "--stronglyTyped", f"--minShapes={dims(0)}", f"--optShapes={dims(1)}",
            f"--maxShapes={dims(2)}", "--saveEngine=model.engine"]  # fmt: skip
    return " ".join(shlex.quote(a) for a in args)


TARGET = TensorRT()
