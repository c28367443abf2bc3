"""The pipeline: load -> trace -> optimize -> package -> verify, one way, each stage timed.

checkpoint dir --load--> (config, reference model) --trace--> ONNX with ai.gemma nodes
    --optimize--> cleaned graph + function bodies
    [--calibrate--> GPTQ's weights, from the reference and a text --quantize--> MatMulNBits weights]
    [--lower--> ONNX Runtime's CPU kernels (--target ort-cpu)] --package--> staging folder
    --verify--> parity report (gate) --> manifest.json --> rename to OUT_DIR
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_export import targets
from gemma_export.checkpoint import load
from gemma_export.checkpoint.gguf import manifest_source
from gemma_export.errors import BadInput, ParityError
from gemma_export.manifest import FORMAT, MANIFEST, ArtifactSpec, BuildInfo, FileEntry, Manifest
from gemma_export.pipeline import (
    calibrate,
    gptq,
    logits_to_keep,
    memory,
    optimize,
    package,
    quantize,
    trace,
    vision,
    vocab_parts,
)
from gemma_export.pipeline.options import BuildOptions, check_output_location, check_recipe_architecture
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtEncoder
from gemma_export.targets.base import Target
from gemma_export.verify import gate as verify
from gemma_export.verify.child import ArtifactInChild
from gemma_export.verify.reference import TorchDecoder, TorchEncoder


def check_recipe(options: BuildOptions, loaded: Loaded, source: Path) -> None:
    """An encoder must also have the recipe's head; the recipe may bound the sequence length."""
    if options.recipe is None:
        return
    recipe = options.recipe.recipe
    if recipe.embedding is not None:
        widths = [d["out_features"] for d in loaded.model_info["head"]["dense"]][:-1]
        if widths != recipe.embedding.dense:
            raise BadInput(f"{source}: not a {recipe.name} folder (Dense widths {widths}, "
                           f"recipe {recipe.embedding.dense})")  # fmt: skip
    if recipe.export.max_length is not None:
        loaded.max_length = recipe.export.max_length


def recipe_record(options: BuildOptions) -> dict[str, Any] | None:
    """The manifest's `recipe` entry: name, file hash, validated content, and --random's seed and depth."""
    if options.recipe is None:
        return None
    record = options.recipe.to_json()
    if options.random_checkpoint is not None:
        record["random_checkpoint"] = options.random_checkpoint
    return record


@dataclass
class Loaded:
    """What the load stage hands on: the reference model and how the later stages treat its kind."""

    cfg: Any
    model: Any
    model_info: dict[str, Any]  # the manifest's "model" entry
    export: Callable[[Any], Any]  # trace stage for this kind
    # verify stage: (reference factory, staging, manifest, tolerance) -> report
    compare: Callable[[Callable[[], Any], Path, dict[str, Any], float], Any]
    tolerance: float
    max_length: int
    state: list[dict[str, Any]]
    vision: Any = None  # pipeline/vision.py Vision: an image + text checkpoint's tower and preprocessing

    def take_model(self) -> Any:
        """Hand the reference model over, keeping no reference to it here: the verify stage runs it first and
        drops it, freeing its weights (the memory-mapped checkpoint) before ONNX Runtime maps the artifact's,
        so that the two copies of the weights are never resident together."""
        model, self.model = self.model, None
        return model


def load_decoder(checkpoint_dir: Path, options: BuildOptions) -> Loaded:
    if options.dim is not None:
        raise BadInput("--dim applies to embedding models (a sentence-transformers folder)")
    vision_half = None
    if load.has_vision(checkpoint_dir):  # Gemma 3 with its SigLIP tower: an image + text artifact
        cfg, vision_half, model = _load_multimodal(checkpoint_dir, options)
    else:
        cfg, model = load.load_model(checkpoint_dir, allow_pickle=options.allow_pickle)
    if options.cache_layout is not None:
        model.use_cache_layout(options.cache_layout)
    source = manifest_source(checkpoint_dir)  # a GGUF's file, sha256 and tensor types; {} for a folder
    if vision_half is None and (parts := load.unexported_parts(checkpoint_dir)):
        source["not_exported"] = parts  # build() logs it once
    return Loaded(
        cfg=cfg,
        model=model,
        model_info={
            "type": cfg.model_type,
            "source_model_type": cfg.source_model_type,
            "config": cfg.to_json(),
            **source,
        },
        export=trace.export_decoder,
        # no closure over `model`: it would keep the weights alive through the artifact's half of verify
        # the artifact in a child process that never imports torch (verify.ArtifactInChild)
        compare=lambda reference, staging, manifest, tol: verify.compare(
            reference, verify.ArtifactInChild(staging, manifest, low_memory=True), cfg, tol, spill_dir=staging
        ),
        tolerance=options.tolerance or verify.DEFAULT_TOLERANCE,
        max_length=cfg.max_position_embeddings,
        state=[spec.to_json() for spec in model.state_specs()],
        vision=vision_half,
    )


def _load_multimodal(checkpoint_dir: Path, options: BuildOptions) -> tuple[Any, Any, Any]:
    from gemma_export.pipeline.vision import Vision
    from gemma_export.runtime.images import read_processor

    if options.target == "tensorrt":
        raise BadInput("--target tensorrt does not build image + text checkpoints yet (the attention plugin has "
                       "no image blocks): use --target ort-cpu or onnx")  # fmt: skip
    cfg, vision_cfg, vision_model, model = load.load_multimodal(checkpoint_dir, allow_pickle=options.allow_pickle)
    # PaliGemma's layout; its prompt of any length is one block, which sees itself past the sliding window (the
    # op's blocks=2): no longest prompt (0)
    prefix_window = 0 if cfg.source_model_type == "paligemma" else None
    pre = read_processor(checkpoint_dir, vision_cfg.mm_tokens_per_image, model.image_token_id,
                         prefix_window=prefix_window)  # fmt: skip
    return cfg, Vision(vision_cfg, vision_model, pre), model


def load_encoder(folder: Path, options: BuildOptions) -> Loaded:
    if options.quant != "none":
        raise BadInput(f"--quant {options.quant} applies to decoders; embedding models are built in fp32")
    if options.cache_layout is not None:
        raise BadInput("--cache-layout applies to decoders; an embedding model carries no cache")
    cfg, head, model = load.load_embedding(folder, options.dim, allow_pickle=options.allow_pickle)
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
        compare=lambda reference, staging, manifest, tol: verify.compare_embeddings(
            reference, lambda: OrtEncoder(staging, manifest, low_memory=True), cfg, tol
        ),
        tolerance=options.tolerance or verify.EMBEDDING_TOLERANCE,
        max_length=head.max_seq_length or cfg.max_position_embeddings,
        state=[],
    )


def calibrate_decoder(loaded: Loaded, checkpoint_dir: Path, spec: quantize.QuantSpec, text: Path | None,
                      report: Callable[[str], None] | None) -> gptq.Calibrated:  # fmt: skip
    """GPTQ's weights for every projection, from the calibration text tokenized as the checkpoint does."""
    settings = spec.gptq
    assert settings is not None
    content, record = calibrate.calibration_text(text)
    ids = calibrate.tokenizer_of(checkpoint_dir).encode(content).ids
    length = min(settings.sequence_length, loaded.max_length)
    sequences = calibrate.token_sequences(ids, loaded.cfg.bos_token_id, length, settings.tokens)
    return calibrate.calibrate(loaded.model, sequences, spec, record, report)


def _spec(options: BuildOptions, target: Target, loaded: Loaded, proto: Any, io: dict[str, Any], shared: set[str],
          cache_layout: str | None, staging: Path, roles: dict[str, str], quantization: dict[str, Any] | None
          ) -> ArtifactSpec:  # fmt: skip
    """The manifest but for its parity: what the artifact is, its files hashed."""
    return ArtifactSpec(
        format=FORMAT,
        model=loaded.model_info,
        build=BuildInfo(
            target=target.name,
            providers=list(target.providers),
            precision=options.precision,
            quant=options.quant,
            opset=trace.OPSET,
            domains={imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
            max_length=loaded.max_length,
            cache_layout=cache_layout,
            **target.build_info(),
        ),
        **io,
        state=[{**s, "shared_buffer": s["output"] in shared} for s in loaded.state],
        files=package.file_table(staging, roles),
        quantization=quantization,
        recipe=recipe_record(options),
        versions=package.versions(),
    )


def _with_model_file(spec: ArtifactSpec, model_file: str) -> ArtifactSpec:
    """`spec` with another graph file in the `model` role (the verify stage's emulated graph)."""
    files = {**spec.files, "model": FileEntry(path=model_file, sha256="-", bytes=0)}
    return spec.model_copy(update={"files": files})


def build(checkpoint_dir: Path, out_dir: Path, options: BuildOptions, stages: Stages) -> Manifest:
    """Build the artifact; returns its manifest. Raises BadInput / ParityError; leaves no partial OUT_DIR."""
    options.check()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_output_location(checkpoint_dir, out_dir, options.force)
    target = targets.target(options.target).configure(options)  # this build's instance (its own options)

    encoder = load.is_embedding_folder(checkpoint_dir)  # sentence-transformers, or EmbeddingGemma 2
    check_recipe_architecture(options, checkpoint_dir, encoder)
    with stages.stage("load"):
        loaded = (load_encoder if encoder else load_decoder)(checkpoint_dir, options)
        check_recipe(options, loaded, checkpoint_dir)
    if parts := loaded.model_info.get("not_exported"):  # never a silent drop: one line here, and the manifest
        stages.note(f"load: {loaded.model_info['source_model_type']} checkpoint: its {' and '.join(parts)} inputs "
                    "are NOT exported; the artifact is its text decoder (manifest: model.not_exported)")  # fmt: skip
    with stages.stage("trace"):
        graph = loaded.export(loaded.model)
    with stages.stage("optimize"):
        graph = optimize.attach_functions(optimize.optimize(graph), trace.OPSET)
        if not encoder:  # the optional input `logits_to_keep`: the LM head on the last rows only
            logits_to_keep.add_logits_to_keep(graph)
    quantization: dict[str, Any] | None = None
    if options.quant != "none":
        spec = quantize.spec_for(options.quant, options.block_size)
        calibrated = None
        if spec.gptq is not None:  # the reference model is put back as it was: verify compares against it
            with stages.stage("calibrate") as st:
                calibrated = calibrate_decoder(loaded, checkpoint_dir, spec, options.calibration, st.report)
        with stages.stage("quantize"):
            parts = None  # the tied embedding's runs of common tokens' ids, stored wide (vocab_parts.py)
            if spec.embedding_tail is not None and not encoder:
                parts = vocab_parts.of_checkpoint(checkpoint_dir, loaded.cfg.vocab_size)
            graph, quantization = quantize.quantize(graph, spec, calibrated, parts)
            del calibrated
    if target.name != "onnx":  # `onnx` keeps the portable graph: ai.gemma ops + their function bodies
        with stages.stage("lower"):
            graph = target.lower(graph)

    with package.staging_dir(out_dir, options.force) as staging:
        with stages.stage("package") as st:
            package.write_model(graph, staging, progress=st.progress)
            del graph
            optimize.release_rewriter_state()  # else onnxscript keeps the graph, and the weights, alive (verify)
            memory.release_heap()
            proto = package.graph_proto(staging)
            shared = target.shared_buffers(proto)  # caches the graph can write in place (README "Shared KV buffers")
            cache_layout = getattr(loaded.model, "cache_layout", None)  # decoders only
            roles = {"model": package.MODEL_FILE, "weights": package.WEIGHTS_FILE}
            roles.update(target.write_extra_files(staging, loaded.cfg, cache_layout, loaded.max_length, encoder))
            roles.update({name: name for name in package.copy_tokenizer(checkpoint_dir, staging)})
            vision_info = None
            if loaded.vision is not None:  # the vision graph beside the decoder (pipeline/vision.py)
                vision_roles, vision_info = vision.build(loaded.vision, staging, target)
                roles.update(vision_roles)
                loaded.vision = None  # its weights are not needed by the decoder's verify
            io = package.io_spec(proto)
            compiles = type(target).compile is not Target.compile  # builds more from the graph (TensorRT engines)
            if not compiles:
                spec = _spec(options, target, loaded, proto, io, shared, cache_layout, staging, roles, quantization)
                spec = spec.model_copy(update={"vision": vision_info})
                st.bytes = sum(f.bytes for f in spec.files.values())
        if compiles:
            with stages.stage("compile") as st:
                compiled = target.compile(staging, io["inputs"], loaded.max_length)
                roles.update(compiled)
                spec = _spec(options, target, loaded, proto, io, shared, cache_layout, staging, roles, quantization)
                st.bytes = sum(spec.files[role].bytes for role in compiled)

        with stages.stage("verify"):
            # Factories: verify opens each side when its turn comes, the reference first (taken from `loaded`).
            def take_reference() -> TorchDecoder | TorchEncoder:
                model = loaded.take_model()
                memory.drop_after_forward(model)  # about one layer of the checkpoint resident at a time
                return (TorchEncoder if encoder else TorchDecoder)(model)

            with target.verify_model(staging) as model_file:  # the graph, or its emulation (bf16 on a CPU)
                checked = spec if model_file == spec.files["model"].path else _with_model_file(spec, model_file)
                if quantization or options.precision != "fp32":  # agreement with the fp32 reference, not
                    # equality. The session as deployed: MatMulNBits uses int8 activations only on pre-packed
                    # weights (and quantized weights are small anyway).
                    artifact = ArtifactInChild(staging, checked, low_memory=False)
                    label = options.quant if quantization else options.precision
                    report = verify.compare_agreement(take_reference, artifact, loaded.cfg, label,
                                                      *options.agreement_gate(), spill_dir=staging)  # fmt: skip
                else:
                    report = loaded.compare(take_reference, staging, checked, loaded.tolerance)
        manifest = Manifest(**dict(spec), parity=report.to_json())
        if not report.passed:
            raise ParityError(f"parity gate failed: {report.summary()}")
        package.write_json(staging / MANIFEST, manifest.to_json())
    return manifest
