"""Recipes: one TOML file per shipped model variant (`gemma_export/recipes/*.toml`, package data; the repository's
top-level `recipes` links there), validated by a schema. Listing reads file names only; a recipe is parsed when
it is loaded.

A recipe pins what a release engineer would otherwise pass as flags and check by hand:

* `architecture`: the published `config.json` (the hub's spelling). A checkpoint built with the recipe must
  describe the same architecture; the fields that differ are named. It is also what `--random` writes.
* `[build]`: the targets, precisions and weight quantizations the variant supports, and why the others are
  refused (Gemma 2/3 residuals overflow fp16, say).
* `[export]`: opset, KV-cache layout, longest sequence.
* `[parity]`: the gates the build must pass against the PyTorch reference.
* `prompts`: sample prompts, for smoke runs and agreement checks.

The schema is pydantic (strict types, unknown keys refused): a mistake is one line naming the file, the key
and what was expected. The architecture table is checked by the same parser that reads checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from gemma_export import targets
from gemma_export.config.model_config import GemmaConfig, GriffinConfig, parse_config, parse_griffin_config
from gemma_export.errors import BadInput


def recipes_dir() -> Path:
    """The shipped recipes (package data, so a wheel install has them), or GEMMA_EXPORT_RECIPES's folder."""
    override = os.environ.get("GEMMA_EXPORT_RECIPES")
    return Path(override) if override else Path(str(resources.files("gemma_export") / "recipes"))


SUFFIX = ".toml"
SUPPORTED_OPSETS = (23,)


def _registered_target(name: str) -> str:
    if name not in targets.NAMES:
        raise ValueError(f"unknown target {name!r} (registered: {', '.join(targets.NAMES)})")
    return name


Target = Annotated[str, AfterValidator(_registered_target)]  # a name in the registry (targets/__init__.py)
Precision = Literal["fp32", "bf16", "fp16"]
Quantization = Literal["int8", "int4"]
CacheLayout = Literal["full", "windowed"]

# Config fields that do not change what the network computes: token ids (instruction-tuned checkpoints
# differ from the base ones in eos_token_id) and how the config was spelled.
NOT_ARCHITECTURE = ("bos_token_id", "eos_token_ids", "pad_token_id", "source_model_type")
# Fields a `--random --layers N` cut changes on purpose.
# Gemma 4: its per-layer head dims / KV heads, and its KV sharing kept where each shared layer has a producer.
DEPTH_FIELDS = (
    "num_hidden_layers",
    "layer_types",
    "block_types",
    "layer_head_dims",
    "layer_kv_heads",
    "num_kv_shared_layers",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


ProfileRange = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3, max_length=3)]


class TensorRTSection(_Strict):
    """`[build.tensorrt]`: what `--target tensorrt` offers for this variant (targets/tensorrt/)."""

    precisions: Annotated[list[Precision], Field(min_length=1)]  # 16-bit products; norms and residuals float32
    refused: dict[str, str] = {}  # precision -> why not (for TensorRT)
    profile: dict[Literal["batch", "sequence", "past"], ProfileRange] = {}  # axis -> [min, opt, max]


class BuildSection(_Strict):
    targets: Annotated[list[Target], Field(min_length=1)]
    precisions: Annotated[list[Precision], Field(min_length=1)]
    quantizations: list[Quantization] = []
    refused: dict[str, str] = {}  # precision or quantization -> why this variant does not offer it
    tensorrt: TensorRTSection | None = None

    @model_validator(mode="after")
    def _defaults_first(self) -> BuildSection:
        for key in ("targets", "precisions", "quantizations"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key} lists a value twice")
        offered = set(self.precisions) | set(self.quantizations)
        if offered & set(self.refused):
            raise ValueError(f"refused names offered options: {sorted(offered & set(self.refused))}")
        return self


class ExportSection(_Strict):
    opset: int = SUPPORTED_OPSETS[-1]
    cache_layout: CacheLayout | None = None  # None: the model keeps no cache (an encoder)
    max_length: Annotated[int, Field(gt=0)] | None = None  # default: the architecture's max_position_embeddings

    @model_validator(mode="after")
    def _known_opset(self) -> ExportSection:
        if self.opset not in SUPPORTED_OPSETS:
            raise ValueError(f"opset {self.opset} is not supported (supported: {list(SUPPORTED_OPSETS)})")
        return self


class QuantGate(_Strict):
    """Agreement of a weight-quantized build with the fp32 reference on the sample prompts."""

    min_top1: Annotated[float, Field(ge=0, le=1)]  # fraction of positions whose argmax token agrees
    max_kl: Annotated[float, Field(gt=0)]  # mean KL(reference || quantized) of the next-token distributions


class ParitySection(_Strict):
    tolerance: Annotated[float, Field(gt=0)]  # fp32: logit error relative to the logit scale, or embedding error
    int8: QuantGate | None = None
    int4: QuantGate | None = None


class EmbeddingSection(_Strict):
    # the head's Dense widths; [] for EmbeddingGemma 2, whose projection to the embedding width is in the backbone
    dense: list[Annotated[int, Field(gt=0)]]
    max_seq_length: Annotated[int, Field(gt=0)]
    dims: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)]  # Matryoshka dims, the full one first


class Recipe(_Strict):
    name: str
    description: str
    kind: Literal["decoder", "embedding"] = "decoder"
    architecture: dict[str, Any]
    build: BuildSection
    export: ExportSection = ExportSection()
    parity: ParitySection
    prompts: Annotated[list[str], Field(min_length=1)]
    embedding: EmbeddingSection | None = None
    # image + text models (Gemma 3 4B+): the published vision_config's fields and mm_tokens_per_image
    vision: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if (self.kind == "embedding") != (self.embedding is not None):
            raise ValueError("an [embedding] table is required for kind = 'embedding', and only then")
        if (self.kind == "decoder") != (self.export.cache_layout is not None):
            raise ValueError("export.cache_layout is required for decoders and meaningless for encoders")
        for quant in self.build.quantizations:
            if getattr(self.parity, quant) is None:
                raise ValueError(f"quantization {quant!r} is offered but [parity.{quant}] sets no gate")
        return self

    # -- derived ---------------------------------------------------------------------------------------------

    def config(self, source: str = "") -> GemmaConfig | GriffinConfig:
        """The architecture, parsed and checked like a checkpoint's config.json."""
        where = f"{source or self.name}: [architecture]"
        if self.architecture.get("model_type") == "recurrent_gemma":
            return parse_griffin_config(dict(self.architecture), source=where)
        return parse_config(dict(self.architecture), source=where)

    @property
    def max_length(self) -> int:
        if self.export.max_length is not None:
            return self.export.max_length
        return self.config().max_position_embeddings

    def refusal(self, option: str, value: str) -> str:
        reason = self.build.refused.get(value)
        return f"recipe {self.name} does not offer {option} {value!r}" + (f": {reason}" if reason else "")


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    sha256: str  # of the file's bytes, recorded in the manifest

    def to_json(self) -> dict[str, Any]:
        return {"name": self.recipe.name, "file": self.path.name, "sha256": self.sha256,
                "content": self.recipe.model_dump(mode="json")}  # fmt: skip


def available(root: Path | None = None) -> list[str]:
    root = root or recipes_dir()
    return sorted(p.stem for p in root.glob(f"*{SUFFIX}")) if root.is_dir() else []


def resolve(name_or_path: str | Path, root: Path | None = None) -> Path:
    """A recipe name (`gemma-3-1b`) or a path to a TOML file."""
    root = root or recipes_dir()
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(SUFFIX) or os.sep in text or path.is_file():
        if not path.is_file():
            raise BadInput(f"{path}: recipe file does not exist")
        return path
    candidate = root / f"{text}{SUFFIX}"
    if not candidate.is_file():
        raise BadInput(f"unknown recipe {text!r}; known: {', '.join(available(root)) or '(none)'}")
    return candidate


def load(name_or_path: str | Path, root: Path | None = None) -> LoadedRecipe:
    path = resolve(name_or_path, root)
    try:
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    return LoadedRecipe(parse(raw_bytes, path), path, hashlib.sha256(raw_bytes).hexdigest())


def parse(raw_bytes: bytes, path: Path) -> Recipe:
    """TOML bytes -> a validated Recipe; any fault is one BadInput line naming the file and the key."""
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"{path}: not valid TOML ({_one_line(e)})") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise BadInput(f"{path}: {_describe(e)}") from None
    if recipe.name != path.stem:
        raise BadInput(f"{path}: name {recipe.name!r} must match the file name {path.stem!r}")
    cfg = recipe.config(str(path))  # BadInput naming the field if the architecture does not parse
    if recipe.vision is not None:  # BadInput naming the field, as a checkpoint's vision_config would
        from gemma_export.models.siglip import VisionConfig

        vision = {k: v for k, v in recipe.vision.items() if k != "mm_tokens_per_image"}
        raw = {"vision_config": vision, "text_config": {"hidden_size": cfg.hidden_size},
               "mm_tokens_per_image": recipe.vision.get("mm_tokens_per_image", 256)}  # fmt: skip
        VisionConfig.from_checkpoint(raw, f"{path}: [vision]")
    if recipe.export.max_length is not None and recipe.export.max_length > cfg.max_position_embeddings:
        raise BadInput(f"{path}: export.max_length {recipe.export.max_length} exceeds the architecture's "
                       f"max_position_embeddings {cfg.max_position_embeddings}")  # fmt: skip
    return recipe


def check_checkpoint(recipe: Recipe, cfg: GemmaConfig | GriffinConfig, source: str, cut_depth: bool = False) -> None:
    """Refuse a checkpoint whose architecture is not the recipe's, naming the fields that differ."""
    ours, theirs = recipe.config().to_json(), cfg.to_json()
    skip = NOT_ARCHITECTURE + (DEPTH_FIELDS if cut_depth else ())
    if cut_depth and theirs.get("sliding_window") == 0:  # cut to global layers only (Gemma 4 --layers 1): no window
        skip += ("sliding_window",)
    differ = [k for k in sorted(set(ours) | set(theirs)) if k not in skip and ours.get(k) != theirs.get(k)]
    if differ:
        shown = "; ".join(f"{k}: recipe {_short(ours.get(k))}, checkpoint {_short(theirs.get(k))}" for k in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise BadInput(f"{source}: not a {recipe.name} checkpoint ({len(differ)} field(s) differ: {shown}{more})")


def _describe(error: ValidationError) -> str:
    """pydantic's first error as `key.path: what was expected (got ...)`."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if first["type"] == "missing":
        return f"{where}: missing required key"
    got = f" (got {_short(first['input'])})" if "input" in first and first["type"] != "value_error" else ""
    more = f"; {error.error_count() - 1} more error(s)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{got}{more}"


def _short(value: Any, limit: int = 50) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
