"""`gemma-export verify`: an artifact's files against its manifest, and its parity re-measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gemma_export.cli.app import AllowPickleFlag, JsonFlag, app, emit
from gemma_export.errors import BadInput, ParityError


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `build`.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint to re-run parity against (else: only file hashes).")
    ] = None,
    tolerance: Annotated[float | None, typer.Option(help="Default: the tolerance the artifact was built with.")] = None,
    allow_pickle: AllowPickleFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Re-check an artifact: file hashes against its manifest, and parity against CHECKPOINT."""
    from gemma_export.checkpoint import load
    from gemma_export.manifest import Manifest
    from gemma_export.pipeline import package
    from gemma_export.runtime.session import OrtDecoder, OrtEncoder
    from gemma_export.verify import gate as verify_stage
    from gemma_export.verify.reference import TorchDecoder, TorchEncoder

    manifest = Manifest.read(artifact)
    changed = package.changed_files(artifact, manifest)
    if changed:
        raise ParityError(f"{artifact}: files changed since the build: {', '.join(changed)}")
    result: dict[str, Any] = {"artifact": str(artifact), "files": "unchanged"}
    text = f"{artifact}: {len(manifest.files)} files match their manifest hashes"
    if checkpoint is not None:
        embedding = manifest.is_embedding_model
        if embedding:
            cfg, _, model = load.load_embedding(checkpoint, manifest.model.dim, allow_pickle=allow_pickle)
        else:
            cfg, model = load.load_model(checkpoint, allow_pickle=allow_pickle)
            if manifest.build.cache_layout is not None:  # the reference carries its state as the artifact does
                model.use_cache_layout(manifest.build.cache_layout)
        if cfg.to_json() != manifest.model.config.to_json():
            raise BadInput(f"{checkpoint}: config differs from the one the artifact was built from")
        parity = manifest.parity
        if parity.metric == "agreement" and tolerance is not None:
            raise BadInput(f"--tolerance gates fp32 artifacts; this one is {parity.quant} (agreement gate)")
        tol = tolerance if tolerance is not None else getattr(parity, "tolerance", None)
        with _runnable_graph(artifact, manifest) as (folder, opened):
            if parity.metric == "agreement":  # a quantized or 16-bit artifact: the agreement gate it was built with
                report = verify_stage.compare_agreement(TorchDecoder(model), OrtDecoder(folder, opened), cfg,
                                                        parity.quant, parity.min_top1, parity.max_kl)  # fmt: skip
            elif embedding:
                report = verify_stage.compare_embeddings(TorchEncoder(model), OrtEncoder(folder, opened), cfg, tol)
            else:
                report = verify_stage.compare(TorchDecoder(model), OrtDecoder(folder, opened), cfg, tol)
        result["parity"] = report.to_json()
        text += f"\nparity: {report.summary()}"
        passed = report.passed
        if manifest.build.tensorrt is not None:  # the engines: where a GPU and TensorRT can run them, else why not
            engines = _engine_parity(artifact, manifest, model, cfg, tol)
            result["engine_parity"] = engines
            text += "\nengine parity: " + (engines["summary"] if engines["ran"] else f"skipped: {engines['reason']}")
            passed = passed and engines.get("passed", True)
        if not passed:
            if as_json:
                print(json.dumps({"ok": False, **result}, indent=2))
            raise ParityError(text.replace("\n", "; "))
    emit(result, as_json, text)


def _runnable_graph(artifact: Path, manifest: Any) -> Any:
    """(folder, manifest) of the graph ONNX Runtime runs (a bf16 tensorrt graph: its emulation)."""
    import contextlib

    if manifest.build.tensorrt is None:
        return contextlib.nullcontext((artifact, manifest))
    from gemma_export.targets.tensorrt import verification

    return verification.graph_folder(artifact, manifest)


def _engine_parity(artifact: Path, manifest: Any, model: Any, cfg: Any, tolerance: float | None) -> dict[str, Any]:
    """Engine vs reference, the graph's gate, where an engine can run here; else the reason it cannot."""
    from gemma_export.targets.tensorrt import verification
    from gemma_export.verify import gate as verify_stage
    from gemma_export.verify.reference import TorchDecoder

    engine, reason = verification.engine_status(manifest)
    if engine is None:
        return {"ran": False, "reason": reason}
    decoder = verification.TrtDecoder(artifact, manifest, engine)
    parity = manifest.parity
    if parity.metric == "agreement":
        report = verify_stage.compare_agreement(TorchDecoder(model), decoder, cfg, parity.quant, parity.min_top1,
                                                parity.max_kl)  # fmt: skip
    else:
        report = verify_stage.compare(TorchDecoder(model), decoder, cfg, tolerance)
    summary = f"{manifest.files[engine['file']].path}: {report.summary()}"
    return {"ran": True, "engine": engine["file"], "passed": report.passed, "summary": summary,
            "parity": report.to_json()}  # fmt: skip
