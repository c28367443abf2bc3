"""The pipeline: load -> trace -> optimize -> package -> verify, one way, each stage timed.

checkpoint dir --load--> (config, reference model) --trace--> ONNX with ai.gemma nodes
    --optimize--> cleaned graph + function bodies --package--> staging folder
    --verify--> parity report (gate) --> manifest.json --> rename to OUT_DIR
"""

from __future__ import annotations

import os
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
                "--precision fp16 is refused: Gemma's residual activations exceed the fp16 range (65504); "
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


def build(checkpoint_dir: Path, out_dir: Path, options: BuildOptions, stages: Stages) -> dict[str, Any]:
    """Build the artifact; returns its manifest. Raises BadInput / ParityError; leaves no partial OUT_DIR."""
    options.check()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_output_location(checkpoint_dir, out_dir, options.force)

    if is_sentence_transformers_folder(checkpoint_dir):
        return build_embedding(checkpoint_dir, out_dir, options, stages)
    if options.dim is not None:
        raise BadInput("--dim applies to embedding models (a sentence-transformers folder)")
    tolerance = options.tolerance or verify.DEFAULT_TOLERANCE
    with stages.stage("load"):
        cfg, model = load.load_model(checkpoint_dir)
    with stages.stage("trace"):
        graph = trace.export_decoder(model)
    with stages.stage("optimize"):
        graph = optimize.attach_functions(optimize.optimize(graph), trace.OPSET)

    with package.staging_dir(out_dir, options.force) as staging:
        with stages.stage("package") as st:
            package.write_model(graph, staging, progress=st.progress)
            del graph
            proto = package.graph_proto(staging)
            io = package.io_spec(proto)
            domains = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
            max_length = cfg.max_position_embeddings
            roles = {"model": package.MODEL_FILE, "weights": package.WEIGHTS_FILE}
            if package.genai_supports(cfg):
                package.write_json(staging / package.GENAI_CONFIG, package.genai_config(cfg, max_length))
                roles["genai_config"] = package.GENAI_CONFIG
            roles.update({name: name for name in package.copy_tokenizer(checkpoint_dir, staging)})
            manifest: dict[str, Any] = {
                "format": package.MANIFEST_FORMAT,
                "model": {
                    "type": cfg.model_type,
                    "source_model_type": cfg.source_model_type,
                    "config": cfg.to_json(),
                },
                "build": {
                    "target": options.target,
                    "precision": options.precision,
                    "opset": trace.OPSET,
                    "domains": domains,
                    "max_length": max_length,
                },
                **io,
                "state": [spec.to_json() for spec in model.state_specs()],
                "files": package.file_table(staging, roles),
                "versions": package.versions(),
            }
            st.bytes = sum(f["bytes"] for f in manifest["files"].values())

        with stages.stage("verify"):
            report = verify.compare(TorchDecoder(model), OrtDecoder(staging, manifest), cfg, tolerance)
        manifest["parity"] = report.to_json()
        if not report.passed:
            raise ParityError(
                f"parity gate failed: max abs logit error prefill {report.prefill_max_abs_error:.3g}, "
                f"decode {report.decode_max_abs_error:.3g} > tolerance {tolerance:g}"
            )
        package.write_json(staging / package.MANIFEST, manifest)
    return manifest


def build_embedding(folder: Path, out_dir: Path, options: BuildOptions, stages: Stages) -> dict[str, Any]:
    """The same stages for an EmbeddingGemma sentence-transformers folder: one encoder graph, no state."""
    tolerance = options.tolerance or verify.EMBEDDING_TOLERANCE
    with stages.stage("load"):
        cfg, head, model = load.load_embedding(folder, options.dim)
    with stages.stage("trace"):
        graph = trace.export_encoder(model)
    with stages.stage("optimize"):
        graph = optimize.attach_functions(optimize.optimize(graph), trace.OPSET)
    with package.staging_dir(out_dir, options.force) as staging:
        with stages.stage("package") as st:
            package.write_model(graph, staging, progress=st.progress)
            del graph
            proto = package.graph_proto(staging)
            roles = {"model": package.MODEL_FILE, "weights": package.WEIGHTS_FILE}
            roles.update({name: name for name in package.copy_tokenizer(folder, staging)})
            manifest: dict[str, Any] = {
                "format": package.MANIFEST_FORMAT,
                "model": {
                    "type": cfg.model_type,
                    "task": "sentence-embedding",
                    "source_model_type": "sentence-transformers",
                    "config": cfg.to_json(),
                    "head": head.to_json(),
                    "dim": model.dim,
                },
                "build": {
                    "target": options.target,
                    "precision": options.precision,
                    "opset": trace.OPSET,
                    "domains": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
                    "max_length": head.max_seq_length or cfg.max_position_embeddings,
                },
                **package.io_spec(proto),
                "state": [],
                "files": package.file_table(staging, roles),
                "versions": package.versions(),
            }
            st.bytes = sum(f["bytes"] for f in manifest["files"].values())
        with stages.stage("verify"):
            report = verify.compare_embeddings(TorchEncoder(model), OrtEncoder(staging, manifest), cfg, tolerance)
        manifest["parity"] = report.to_json()
        if not report.passed:
            raise ParityError(
                f"parity gate failed: max abs embedding error {report.sentence_max_abs_error:.3g} "
                f"> tolerance {tolerance:g}"
            )
        package.write_json(staging / package.MANIFEST, manifest)
    return manifest
