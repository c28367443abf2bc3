"""The pipeline: load -> trace -> optimize -> package -> verify, one way, each stage timed.

checkpoint dir --load--> (config, reference model) --trace--> ONNX with ai.gemma nodes
    --optimize--> cleaned graph + function bodies [--quantize--> MatMulNBits weights]
    [--lower--> ONNX Runtime's CPU kernels (--target ort-cpu)] --package--> staging folder
    --verify--> parity report (gate) --> manifest.json --> rename to OUT_DIR
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gemma_export.checkpoint import load
from gemma_export.checkpoint.gguf import manifest_source
from gemma_export.config import recipes
from gemma_export.config.model_config import load_config
from gemma_export.errors import BadInput, ParityError
from gemma_export.models.embedding import is_sentence_transformers_folder
from gemma_export.models.gemma import CACHE_LAYOUTS
from gemma_export.pipeline import logits_to_keep, memory, optimize, package, quantize, trace
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtEncoder, TorchDecoder, TorchEncoder
from gemma_export.targets import ort_cpu as lower
from gemma_export.verify import gate as verify

TARGETS = ("ort-cpu", "onnx")
PRECISIONS = ("fp32",)


@dataclass(frozen=True)
class BuildOptions:
    target: str = "ort-cpu"
    precision: str = "fp32"
    tolerance: float | None = None  # None: the model kind's default (verify.DEFAULT_TOLERANCE, EMBEDDING_TOLERANCE)
    force: bool = False
    dim: int | None = None  # embedding models: Matryoshka truncation
    allow_pickle: bool = False  # read pickled weights, with torch.load(weights_only=True) only
    recipe: recipes.LoadedRecipe | None = None  # checks the checkpoint; recorded in the manifest
    random_checkpoint: dict[str, Any] | None = None  # how --random made the checkpoint (seed, layers)
    quant: str = "none"  # weight-only quantization: none, int8, int4 (quantize.py)
    block_size: int | None = None  # None: the quantization's default (quantize.DEFAULTS)
    min_top1: float | None = None  # quantized builds' gate; None: verify.AGREEMENT_GATES[quant]
    max_kl: float | None = None
    cache_layout: str | None = None  # decoders' KV cache: full | windowed (models/gemma.py); None: the model's own

    def check(self) -> None:
        if self.target not in TARGETS:
            raise BadInput(f"--target {self.target!r} is not supported; choose one of: {', '.join(TARGETS)}")
        if self.precision == "fp16":
            raise BadInput(
                "--precision 'fp16' is refused: Gemma's residual activations exceed the fp16 range (65504), and "
                "fp16 weights with fp32 compute gain nothing on ONNX Runtime CPU (it folds the Casts back to fp32 "
                "at load); for smaller weights use --quant int8|int4 (bf16: no CPU MatMul kernel)"
            )
        if self.precision not in PRECISIONS:
            raise BadInput(
                f"--precision {self.precision!r} is not supported for {self.target}; choose one of: "
                f"{', '.join(PRECISIONS)}"
            )
        if self.tolerance is not None and not self.tolerance > 0:
            raise BadInput(f"--tolerance must be positive, got {self.tolerance}")
        if self.cache_layout is not None and self.cache_layout not in CACHE_LAYOUTS:
            raise BadInput(f"--cache-layout {self.cache_layout!r} is not supported; choose one of: "
                           f"{', '.join(CACHE_LAYOUTS)}")  # fmt: skip
        self.check_quant()

    def check_quant(self) -> None:
        if self.quant not in quantize.QUANTS:
            raise BadInput(f"--quant {self.quant!r} is not supported; choose one of: {', '.join(quantize.QUANTS)}")
        quant_only = {"--block-size": self.block_size, "--min-top1": self.min_top1, "--max-kl": self.max_kl}
        given = [flag for flag, value in quant_only.items() if value is not None]
        if self.quant == "none" and given:
            raise BadInput(f"{given[0]} applies to quantized builds (--quant int8 or int4)")
        if self.block_size is not None and not quantize.is_valid_block_size(self.block_size):
            raise BadInput(f"--block-size must be a power of two >= 16 (MatMulNBits), got {self.block_size}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise BadInput(f"--min-top1 must be a fraction in [0, 1], got {self.min_top1}")
        if self.max_kl is not None and not self.max_kl > 0:
            raise BadInput(f"--max-kl must be positive, got {self.max_kl}")

    def agreement_gate(self) -> tuple[float, float]:
        """(min_top1, max_kl) of a quantized build: the options', else the quantization's defaults."""
        min_top1, max_kl = verify.AGREEMENT_GATES[self.quant]
        return (min_top1 if self.min_top1 is None else self.min_top1, max_kl if self.max_kl is None else self.max_kl)


def with_recipe(options: BuildOptions, given: set[str]) -> BuildOptions:
    """Fill the options the user did not give (`given`: field names) from the recipe, and refuse what the
    recipe does not offer, with its reason."""
    if options.recipe is None:
        return options
    recipe = options.recipe.recipe
    fills: dict[str, Any] = {
        "target": recipe.build.targets[0],
        "precision": recipe.build.precisions[0],
        "tolerance": recipe.parity.tolerance,
    }
    if recipe.embedding is not None:
        fills["dim"] = recipe.embedding.dims[0]
    if recipe.export.cache_layout is not None:
        fills["cache_layout"] = recipe.export.cache_layout
    options = replace(options, **{k: v for k, v in fills.items() if k not in given})
    if options.target not in recipe.build.targets:
        raise BadInput(f"recipe {recipe.name} does not offer --target {options.target!r} "
                       f"(it offers: {', '.join(recipe.build.targets)})")  # fmt: skip
    if options.precision not in recipe.build.precisions:
        raise BadInput(recipe.refusal("--precision", options.precision))
    if options.quant != "none":
        if options.quant not in recipe.build.quantizations:
            raise BadInput(recipe.refusal("--quant", options.quant))
        gate = getattr(recipe.parity, options.quant)  # the schema requires one per offered quantization
        options = replace(options, **{k: getattr(gate, k) for k in ("min_top1", "max_kl") if k not in given})
    if recipe.embedding is not None and options.dim not in recipe.embedding.dims:
        raise BadInput(f"recipe {recipe.name} offers --dim {', '.join(map(str, recipe.embedding.dims))}; "
                       f"got {options.dim}")  # fmt: skip
    return options


def check_recipe_architecture(options: BuildOptions, checkpoint_dir: Path, encoder: bool) -> None:
    """Before any weight is read: the checkpoint's config must describe the recipe's model."""
    if options.recipe is None:
        return
    recipe = options.recipe.recipe
    if recipe.kind != ("embedding" if encoder else "decoder"):
        kind = "a sentence-transformers (embedding) folder" if encoder else "a decoder checkpoint"
        raise BadInput(f"{checkpoint_dir}: recipe {recipe.name} is for a {recipe.kind} model; this is {kind}")
    cut = bool(options.random_checkpoint and options.random_checkpoint.get("layers"))
    recipes.check_checkpoint(recipe, load_config(checkpoint_dir), str(checkpoint_dir), cut_depth=cut)


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


def recipe_record(options: BuildOptions) -> dict[str, Any]:
    """The manifest's `recipe` entry: name, file hash, validated content, and --random's seed and depth."""
    if options.recipe is None:
        return {}
    record = options.recipe.to_json()
    if options.random_checkpoint is not None:
        record["random_checkpoint"] = options.random_checkpoint
    return {"recipe": record}


def check_output_location(checkpoint_dir: Path, out_dir: Path, force: bool) -> None:
    """Fail before the slow stages if OUT_DIR cannot be (re)placed."""
    out, ckpt = out_dir.resolve(), checkpoint_dir.resolve()
    if out == ckpt or out in ckpt.parents:
        # with --force the build would replace OUT, and so delete the checkpoint it was built from
        raise BadInput(f"{out_dir}: the output directory must not be or contain the checkpoint {checkpoint_dir}")
    if out_dir.exists() and not force:
        raise BadInput(f"{out_dir}: output directory exists (pass --force to replace it)")
    package.check_writable(out_dir)


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

    def take_model(self) -> Any:
        """Hand the reference model over, keeping no reference to it here: the verify stage runs it first and
        drops it, freeing its weights (the memory-mapped checkpoint) before ONNX Runtime maps the artifact's,
        so that the two copies of the weights are never resident together."""
        model, self.model = self.model, None
        return model


def load_decoder(checkpoint_dir: Path, options: BuildOptions) -> Loaded:
    if options.dim is not None:
        raise BadInput("--dim applies to embedding models (a sentence-transformers folder)")
    cfg, model = load.load_model(checkpoint_dir, allow_pickle=options.allow_pickle)
    if options.cache_layout is not None:
        model.use_cache_layout(options.cache_layout)
    source = manifest_source(checkpoint_dir)  # a GGUF's file, sha256 and tensor types; {} for a folder
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
    )


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


def build(checkpoint_dir: Path, out_dir: Path, options: BuildOptions, stages: Stages) -> dict[str, Any]:
    """Build the artifact; returns its manifest. Raises BadInput / ParityError; leaves no partial OUT_DIR."""
    options.check()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_output_location(checkpoint_dir, out_dir, options.force)

    encoder = is_sentence_transformers_folder(checkpoint_dir)
    check_recipe_architecture(options, checkpoint_dir, encoder)
    with stages.stage("load"):
        loaded = (load_encoder if encoder else load_decoder)(checkpoint_dir, options)
        check_recipe(options, loaded, checkpoint_dir)
    with stages.stage("trace"):
        graph = loaded.export(loaded.model)
    with stages.stage("optimize"):
        graph = optimize.attach_functions(optimize.optimize(graph), trace.OPSET)
        if not encoder:  # the optional input `logits_to_keep`: the LM head on the last rows only
            logits_to_keep.add_logits_to_keep(graph)
    quantization: dict[str, Any] = {}
    if options.quant != "none":
        with stages.stage("quantize"):
            graph, record = quantize.quantize(graph, quantize.spec_for(options.quant, options.block_size))
            quantization = {"quantization": record}
    if options.target == "ort-cpu":  # `onnx` keeps the portable graph: ai.gemma ops + their function bodies
        with stages.stage("lower"):
            graph = lower.lower(graph)  # ONNX Runtime's CPU kernels (lower.py); drops the bodies it replaced

    with package.staging_dir(out_dir, options.force) as staging:
        with stages.stage("package") as st:
            package.write_model(graph, staging, progress=st.progress)
            del graph
            optimize.release_rewriter_state()  # else onnxscript keeps the graph, and the weights, alive (verify)
            memory.release_heap()
            proto = package.graph_proto(staging)
            shared = lower.shared_buffers(proto)  # caches the graph can write in place (README "Shared KV buffers")
            roles = {"model": package.MODEL_FILE, "weights": package.WEIGHTS_FILE}
            cache_layout = getattr(loaded.model, "cache_layout", None)  # decoders only
            if package.genai_supports(loaded.cfg, cache_layout) and not encoder:
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
                    "quant": options.quant,
                    "opset": trace.OPSET,
                    "domains": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
                    "max_length": loaded.max_length,
                    **({"cache_layout": cache_layout} if cache_layout else {}),
                },
                **package.io_spec(proto),
                "state": [{**s, "shared_buffer": True} if s["output"] in shared else s for s in loaded.state],
                "files": package.file_table(staging, roles),
                **quantization,
                **recipe_record(options),
                "versions": package.versions(),
            }
            st.bytes = sum(f["bytes"] for f in manifest["files"].values())

        with stages.stage("verify"):
            # Factories: verify opens each side when its turn comes, the reference first (taken from `loaded`).
            def take_reference() -> TorchDecoder | TorchEncoder:
                model = loaded.take_model()
                memory.drop_after_forward(model)  # about one layer of the checkpoint resident at a time
                return (TorchEncoder if encoder else TorchDecoder)(model)

            if quantization:  # agreement with the fp32 reference, not equality. The session as deployed: MatMulNBits
                # uses int8 activations only on pre-packed weights (and quantized weights are small anyway).
                artifact = verify.ArtifactInChild(staging, manifest, low_memory=False)
                report = verify.compare_agreement(take_reference, artifact, loaded.cfg, options.quant,
                                                  *options.agreement_gate(), spill_dir=staging)  # fmt: skip
            else:
                report = loaded.compare(take_reference, staging, manifest, loaded.tolerance)
        manifest["parity"] = report.to_json()
        if not report.passed:
            raise ParityError(f"parity gate failed: {report.summary()}")
        package.write_json(staging / package.MANIFEST, manifest)
    return manifest
