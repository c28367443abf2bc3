"""The pipeline: load -> trace -> optimize -> package -> verify, one way, each stage timed.

checkpoint dir --load--> (config, reference model) --trace--> ONNX with ai.gemma nodes
    --optimize--> cleaned graph + function bodies --package--> staging folder
    --verify--> parity report (gate) --> manifest.json --> rename to OUT_DIR
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_export import load, optimize, package, trace, verify
from gemma_export.errors import BadInput, ParityError
from gemma_export.models.embedding import is_sentence_transformers_folder
from gemma_export.progress import Stages
from gemma_export.runtime import OrtDecoder, OrtEncoder, TorchDecoder, TorchEncoder

TARGETS = ("ort-cpu", "onnx")
PRECISIONS = ("fp32",)


@dataclass(frozen=True)
class BuildOptions:
    target: str = "ort-cpu"
    precision: str = "fp32"
    tolerance: float | None = None  # None: the model kind's default (logits 1e-4, embeddings 1e-5)
    force: bool = False
    dim: int | None = None  # embedding models: Matryoshka truncation

    def check(self) -> None:
        if self.target not in TARGETS:
            raise BadInput(f"--target {self.target!r} is not supported; choose one of: {', '.join(TARGETS)}")
        if self.precision == "fp16":
            raise BadInput(
                "--precision 'fp16' is refused: Gemma's residual activations exceed the fp16 range (65504); "
                "use fp32 (bf16 has no ONNX Runtime CPU kernels for MatMul)"
            )
        if self.precision not in PRECISIONS:
            raise BadInput(
                f"--precision {self.precision!r} is not supported for {self.target}; choose one of: "
                f"{', '.join(PRECISIONS)}"
            )
        if self.tolerance is not None and not self.tolerance > 0:
            raise BadInput(f"--tolerance must be positive, got {self.tolerance}")


def check_output_location(checkpoint_dir: Path, out_dir: Path, force: bool) -> None:
    """Fail before the slow stages if OUT_DIR cannot be (re)placed."""
    out, ckpt = out_dir.resolve(), checkpoint_dir.resolve()
    if out == ckpt or out in ckpt.parents:
        # with --force the build would replace OUT, and so delete the checkpoint it was built from
        raise BadInput(f"{out_dir}: the output directory must not be or contain the checkpoint {checkpoint_dir}")
    if out_dir.exists() and not force:
        raise BadInput(f"{out_dir}: output directory exists (pass --force to replace it)")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{out_dir}: cannot create the output directory here ({parent} is not a writable folder)")


@dataclass
class Loaded:
    """What the load stage hands on: the reference model and how the later stages treat its kind."""

    cfg: Any
    model: Any
    model_info: dict[str, Any]  # the manifest's "model" entry
    export: Callable[[Any], Any]  # trace stage for this kind
    compare: Callable[[Path, dict[str, Any], float], Any]  # verify stage: (staging, manifest, tolerance) -> report
    tolerance: float
    max_length: int
    state: list[dict[str, Any]]


def load_decoder(checkpoint_dir: Path, options: BuildOptions) -> Loaded:
    if options.dim is not None:
        raise BadInput("--dim applies to embedding models (a sentence-transformers folder)")
    cfg, model = load.load_model(checkpoint_dir)
    return Loaded(
        cfg=cfg,
        model=model,
        model_info={"type": cfg.model_type, "source_model_type": cfg.source_model_type, "config": cfg.to_json()},
        export=trace.export_decoder,
        compare=lambda staging, manifest, tol: verify.compare(
            TorchDecoder(model), OrtDecoder(staging, manifest), cfg, tol
        ),
        tolerance=options.tolerance or verify.DEFAULT_TOLERANCE,
        max_length=cfg.max_position_embeddings,
        state=[spec.to_json() for spec in model.state_specs()],
    )


def load_encoder(folder: Path, options: BuildOptions) -> Loaded:
    cfg, head, model = load.load_embedding(folder, options.dim)
    return Loaded(
        cfg=cfg,
        model=model,
        model_info={
            "type": cfg.model_type,
            "task": "sentence-embedding",
            "source_model_type": "sentence-transformers",
            "config": cfg.to_json(),
            "head": head.to_json(),
            "dim": model.dim,
        },
        export=trace.export_encoder,
        compare=lambda staging, manifest, tol: verify.compare_embeddings(
            TorchEncoder(model), OrtEncoder(staging, manifest), cfg, tol
        ),
        tolerance=options.tolerance or verify.EMBEDDING_TOLERANCE,
        max_length=head.max_seq_length or cfg.max_position_embeddings,
        state=[],
    )


def build(checkpoint_dir: Path, out_dir: Path, options: BuildOptions, stages: Stages) -> dict[str, Any]:
    """Build the artifact; returns its manifest. Raises BadInput / ParityError; leaves no partial OUT_DIR."""
    options.check()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_output_location(checkpoint_dir, out_dir, options.force)

    with stages.stage("load"):
        encoder = is_sentence_transformers_folder(checkpoint_dir)
        loaded = (load_encoder if encoder else load_decoder)(checkpoint_dir, options)
    with stages.stage("trace"):
        graph = loaded.export(loaded.model)
    with stages.stage("optimize"):
        graph = optimize.attach_functions(optimize.optimize(graph), trace.OPSET)

    with package.staging_dir(out_dir, options.force) as staging:
        with stages.stage("package") as st:
            package.write_model(graph, staging, progress=st.progress)
            del graph
            proto = package.graph_proto(staging)
            roles = {"model": package.MODEL_FILE, "weights": package.WEIGHTS_FILE}
            if package.genai_supports(loaded.cfg) and not encoder:
                genai = package.genai_config(loaded.cfg, loaded.max_length)
                package.write_json(staging / package.GENAI_CONFIG, genai)
                roles["genai_config"] = package.GENAI_CONFIG
            roles.update({name: name for name in package.copy_tokenizer(checkpoint_dir, staging)})
            manifest: dict[str, Any] = {
                "format": package.MANIFEST_FORMAT,
                "model": loaded.model_info,
                "build": {
                    "target": options.target,
                    "precision": options.precision,
                    "opset": trace.OPSET,
                    "domains": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
                    "max_length": loaded.max_length,
                },
                **package.io_spec(proto),
                "state": loaded.state,
                "files": package.file_table(staging, roles),
                "versions": package.versions(),
            }
            st.bytes = sum(f["bytes"] for f in manifest["files"].values())

        with stages.stage("verify"):
            report = loaded.compare(staging, manifest, loaded.tolerance)
        manifest["parity"] = report.to_json()
        if not report.passed:
            raise ParityError(f"parity gate failed: {report.summary()}")
        package.write_json(staging / package.MANIFEST, manifest)
    return manifest
