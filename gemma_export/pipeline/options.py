"""What a build is asked to do (`BuildOptions`), checked before any slow stage, and filled from a recipe."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gemma_export import targets
from gemma_export.config import recipes
from gemma_export.config.model_config import load_config
from gemma_export.errors import BadInput
from gemma_export.models.gemma import CACHE_LAYOUTS
from gemma_export.pipeline import package, quantize
from gemma_export.verify import gate as verify

PRECISIONS = ("fp32",)
# offered wherever a recipe offers int4: int4's widths by GPTQ on calibration text, int4 under its earlier name,
# and int4 everywhere (quantize.py)
INT4_VARIANTS = ("int4-gptq", "int4-rtn", "int4-plain")


@dataclass(frozen=True)
class BuildOptions:
    target: str = targets.DEFAULT
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
    calibration: Path | None = None  # GPTQ's calibration text (UTF-8); None: the built-in one (calibrate.py)
    # --target tensorrt only (targets/tensorrt/): GPUs to build engines for, the graph alone, which engine forms
    # (inlined, plugins, both), optimization-profile axes (AXIS=MIN:OPT:MAX)
    compute_capabilities: str | None = None
    onnx_only: bool = False
    engines: str | None = None
    profile: tuple[str, ...] = ()

    def check(self) -> None:
        target = targets.target(self.target)  # a one-line error naming the registered targets
        self.check_target_options()
        if target.precisions != PRECISIONS:  # a target with precisions of its own (tensorrt)
            if self.precision not in target.precisions:
                raise BadInput(f"--precision {self.precision!r} is not supported for {self.target}; choose one of: "
                               f"{', '.join(target.precisions)}")  # fmt: skip
            if self.precision == "fp16" and not self._recipe_offers("fp16"):
                raise BadInput(
                    "--precision 'fp16' needs a recipe that offers it for --target tensorrt: Gemma's activations "
                    "exceed the fp16 range (65504) unless a recipe proves otherwise; use bf16"
                )
        elif self.precision == "fp16":
            raise BadInput(
                "--precision 'fp16' is refused: Gemma's residual activations exceed the fp16 range (65504), and "
                "fp16 weights with fp32 compute gain nothing on ONNX Runtime CPU (it folds the Casts back to fp32 "
                "at load); for smaller weights use --quant int8|int4 (bf16: no CPU MatMul kernel)"
            )
        elif self.precision not in PRECISIONS:
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

    def check_target_options(self) -> None:
        """TensorRT's options apply to --target tensorrt only (and are checked by it, targets/tensorrt/)."""
        given = {"--compute-capability": self.compute_capabilities, "--onnx-only": self.onnx_only or None,
                 "--engines": self.engines, "--profile": self.profile or None}  # fmt: skip
        flags = [flag for flag, value in given.items() if value is not None]
        if flags and self.target != "tensorrt":
            raise BadInput(f"{flags[0]} applies to --target tensorrt")
        if self.target == "tensorrt":
            targets.target(self.target).configure(self)  # one-line errors before any slow stage

    def _recipe_offers(self, precision: str) -> bool:
        if self.recipe is None:
            return False
        trt = self.recipe.recipe.build.tensorrt
        return trt is not None and precision in trt.precisions

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
        if self.calibration is not None:
            calibrated = [name for name, spec in quantize.DEFAULTS.items() if spec.gptq is not None]
            if self.quant not in calibrated:
                raise BadInput(f"--calibration applies to the calibrated quantization (--quant {calibrated[0]})")
            if not Path(self.calibration).is_file():
                raise BadInput(f"--calibration {self.calibration}: no such file")

    def agreement_gate(self) -> tuple[float, float]:
        """(min_top1, max_kl) of a quantized or reduced-precision build: the options', else the defaults of its
        quantization or precision."""
        min_top1, max_kl = verify.AGREEMENT_GATES[self.quant if self.quant != "none" else self.precision]
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
    trt = recipe.build.tensorrt if options.target == "tensorrt" else None
    if trt is not None:  # the recipe's TensorRT precisions (16-bit products, float32 norms and residuals)
        if options.precision not in trt.precisions:
            reason = trt.refused.get(options.precision)
            raise BadInput(f"recipe {recipe.name} does not offer --precision {options.precision!r} for --target "
                           f"tensorrt" + (f": {reason}" if reason else ""))  # fmt: skip
    elif options.precision not in recipe.build.precisions:
        raise BadInput(recipe.refusal("--precision", options.precision))
    if options.quant in recipe.build.quantizations:
        gate = getattr(recipe.parity, options.quant)  # the schema requires one per offered quantization
        options = replace(options, **{k: getattr(gate, k) for k in ("min_top1", "max_kl") if k not in given})
    elif options.quant in INT4_VARIANTS and "int4" in recipe.build.quantizations:
        pass  # int4's other roundings (same widths, or int4 everywhere): their own default gates (verify.py)
    elif options.quant != "none":
        raise BadInput(recipe.refusal("--quant", options.quant))
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


def check_output_location(checkpoint_dir: Path, out_dir: Path, force: bool) -> None:
    """Fail before the slow stages if OUT_DIR cannot be (re)placed."""
    out, ckpt = out_dir.resolve(), checkpoint_dir.resolve()
    if out == ckpt or out in ckpt.parents:
        # with --force the build would replace OUT, and so delete the checkpoint it was built from
        raise BadInput(f"{out_dir}: the output directory must not be or contain the checkpoint {checkpoint_dir}")
    if out_dir.exists() and not force:
        raise BadInput(f"{out_dir}: output directory exists (pass --force to replace it)")
    package.check_writable(out_dir)
