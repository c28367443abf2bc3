"""The artifact's manifest (`manifest.json`): the contract every runtime reads (Python here; C++ and Java mirror it).

One module defines it; the build writes it (`Manifest.write`), every reader gets the typed object
(`Manifest.read`). Torch-free: only pydantic.

Format and compatibility rule: `format` is `gemma-export/manifest-vMAJOR.MINOR`.
  * A MINOR release only adds optional fields: a reader of MAJOR.N reads every MAJOR.M with M <= N, and
    refuses M > N (it would not know the new fields) with "written by a newer gemma-export".
  * A MAJOR release changes or removes a field: readers refuse other majors ("rebuild the artifact").
  * Within the versions a reader knows, an unknown or missing field is an error naming it (a typo, a
    truncated file or a hand edit is never read as a default).
The README's "Manifest fields" table is generated from these classes (`field_table`) and checked by a test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gemma_export.errors import BadInput

MANIFEST = "manifest.json"
FORMAT_PREFIX = "gemma-export/manifest-v"
# 2.0: the first typed manifest (1: the untyped dict of gemma-export 0.1); 2.1: GPTQ's records
# (quantization.gptq, .calibration) and build.tensorrt, all optional; 2.2: `vision` (image prompts), optional;
# 2.3: model.not_exported (a multimodal checkpoint's parts a text artifact leaves out), optional
VERSION = (2, 3)
FORMAT = f"{FORMAT_PREFIX}{VERSION[0]}.{VERSION[1]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A graph input or output."""

    name: str = Field(description="the ONNX value name")
    dtype: str = Field(description="float32 | int64 | float16 | ...")
    shape: list[int | str] = Field(description="ints, or symbolic names (batch, sequence_length, ...)")
    optional: bool = Field(False, description="an input with a default (`logits_to_keep`): may be left out")
    default: Any = Field(None, description="the value an optional input takes when left out")


class StateEntry(_Strict):
    """A cache tensor carried from one call to the next: `output` of a call feeds `input` of the next."""

    input: str = Field(description="the graph input (`past_key_values.0.key`)")
    output: str = Field(description="the graph output that feeds it (`present.0.key`)")
    shape: list[int | str] = Field(description="its initial shape; 0 marks the dimension that grows")
    dtype: str = Field(description="float32")
    shared_buffer: bool = Field(False, description="ort-cpu: the output may be written into the input's buffer")


class FileEntry(_Strict):
    path: str = Field(description="relative to the artifact folder")
    sha256: str = Field(description="hex digest of the file's bytes")
    bytes: int = Field(description="its size")


class ModelConfig(BaseModel):
    """The normalised model config (`config/model_config.py`'s `to_json`): the fields every runtime needs are
    checked; the family's architecture fields (Gemma's `layer_types`, Griffin's `block_types`, ...) ride along."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    bos_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class GgufSource(_Strict):
    format: Literal["gguf"]
    file: str
    sha256: str
    bytes: int
    architecture: str
    tensor_types: dict[str, int] = Field(description="tensor count per GGUF type (Q4_K, F32, ...)")


class EmbeddingHead(_Strict):
    pooling: Literal["mean"]
    dense: list[dict[str, Any]] = Field(description="in_features, out_features, bias, activation per layer")
    normalize: bool
    prompts: dict[str, str] = Field(description="task name -> prompt prefix")
    default_prompt_name: str | None
    max_seq_length: int | None


class ModelInfo(_Strict):
    type: str = Field(description="our model type: gemma, gemma2, gemma3_text, recurrent_gemma, ...")
    source_model_type: str = Field(description="the checkpoint's own model_type")
    config: ModelConfig = Field(description="the normalised config (vocab, ids, architecture)")
    source: GgufSource | None = Field(None, description="a GGUF checkpoint's file, sha256 and tensor types")
    task: Literal["sentence-embedding"] | None = Field(None, description="embedding models only")
    head: EmbeddingHead | None = Field(None, description="embedding models: pooling, Dense layers, prompts")
    dim: int | None = Field(None, description="embedding models: the output width (Matryoshka)")
    not_exported: list[str] | None = Field(
        None, description="a multimodal checkpoint's inputs this text artifact leaves out: vision, audio (2.3)"
    )


class TensorRTProfile(_Strict):
    axes: dict[str, list[int]] = Field(description="batch, sequence, past -> [min, opt, max]")
    shapes: dict[str, list[list[int]]] = Field(description="graph input -> [min shape, opt shape, max shape]")


class TensorRTPlugin(_Strict):
    name: str = Field(description="the plugin's name (the node's op_type): GemmaAttention, GemmaRGLRU")
    version: str = Field(description="plugin_version")
    namespace: str = Field(description="plugin_namespace")
    op: str = Field(description="the op it implements (graphs/): ai.gemma::Attention, ai.gemma::RGLRU")
    module: str = Field(description="the Python module whose register(trt) registers its creator")


class TensorRTEngine(_Strict):
    file: str = Field(description="its role in `files` (engine.sm86, engine.sm86.plugins, ...)")
    compute_capability: str = Field(description="the GPU generation it runs on: 8.0, 8.6, 8.9, 12.0")
    plugins: bool = Field(description="built with our plugins (else the function bodies inlined)")
    layers: int = Field(description="layers of the network it was built from")
    plugin_layers: int = Field(description="plugin layers among them")


class TensorRTInfo(_Strict):
    """`--target tensorrt` (targets/tensorrt/): how the engines were built and how to load them."""

    builder: str | None = Field(description="tensorrt | tensorrt_rtx; null: --onnx-only (no engines)")
    builder_version: str | None
    precision: str = Field(description="fp32 | bf16 | fp16: the weight products' type (the rest float32)")
    strongly_typed: bool = Field(description="the network is built with the graph's own types")
    reduced_precision_products: int = Field(description="MatMul / Gemm nodes computing in the 16-bit type")
    profile: TensorRTProfile = Field(description="the engines' optimization profile")
    plugins: list[TensorRTPlugin] = Field(description="plugin nodes in the graph (each keeps its function body)")
    load: str = Field(description="how a TensorRT user registers the plugins")
    engines: list[TensorRTEngine] = Field(description="one per compute capability and form")
    trtexec: str = Field(description="the command that builds the engine with datacenter TensorRT")


class BuildInfo(_Strict):
    target: str = Field(description="the target it was lowered for (targets/: onnx, ort-cpu, tensorrt)")
    providers: list[str] = Field(description="ONNX Runtime execution providers that run it, in order")
    precision: str = Field(description="fp32 (tensorrt: also bf16, fp16)")
    quant: str = Field(description="none | int8 | int4 | int4-gptq | int4-rtn | int4-plain")
    opset: int = Field(description="the default-domain ONNX opset")
    domains: dict[str, int] = Field(description="every opset import: domain -> version")
    max_length: int = Field(description="the longest sequence (prompt + generated) it serves")
    cache_layout: Literal["full", "windowed"] | None = Field(None, description="decoders' KV cache layout")
    tensorrt: TensorRTInfo | None = Field(None, description="--target tensorrt: builder, profile, plugins, engines")


class Width(_Strict):
    bits: int
    block_size: int
    symmetric: bool


class GptqSettings(_Strict):
    """How GPTQ rounded the projections (pipeline/gptq.py)."""

    damp: float = Field(description="added to the Hessian's diagonal, as a fraction of its mean")
    act_order: bool = Field(description="input features rounded in decreasing Hessian-diagonal order")
    range_steps: int = Field(description="shrink factors of each block's range tried, 1.0 down to 0.6 (0: none)")
    tokens: int = Field(description="calibration tokens asked for (`calibration.tokens`: used)")
    sequence_length: int = Field(description="tokens per calibration sequence, <bos> first")


class CalibrationText(_Strict):
    """The text GPTQ's Hessians were computed on."""

    source: str = Field(description="`built-in` (pipeline/calibration.txt) or the --calibration file's name")
    sha256: str = Field(description="of the text file's bytes")
    tokens: int = Field(description="tokens used, <bos> included")
    sequences: int = Field(description="how many sequences they were cut into")


class Quantization(_Strict):
    method: str
    bits: int = Field(description="the narrowest width, what --quant names (`widths` has every role's)")
    block_size: int
    symmetric: bool
    accuracy_level: int = Field(description="MatMulNBits: 0 float32 activations, 4 int8")
    widths: dict[str, Width] = Field(
        description="per role: projections, embedding (`embedding_tail`: its less common rows), other roles"
    )
    quantized: dict[str, int | str] = Field(
        description="what was rewritten: MatMul count (`matmul_gptq`: by GPTQ), LM head, embedding "
        "(`embedding_parts`: its runs of ids and their widths, `0-40165 int8, 40165-236743 int4, ...`; "
        "`embedding_selection`: how the wide rows were chosen, `bpe-merge-rank` (the tokenizer's commonest "
        "tokens) or `id` (the first half)), `lookup_tables` (other tables looked up "
        "by token id, e.g. Gemma 4's per-layer embeddings)"
    )
    kept_float32: str
    weight_bytes: dict[Literal["before", "after"], int]
    gptq: GptqSettings | None = Field(None, description="--quant int4-gptq: GPTQ's settings (2.1)")
    calibration: CalibrationText | None = Field(None, description="--quant int4-gptq: GPTQ's calibration text (2.1)")


class RandomCheckpoint(_Strict):
    seed: int
    layers: int | None


class RecipeRecord(_Strict):
    name: str
    file: str
    sha256: str = Field(description="of the recipe file's bytes")
    content: dict[str, Any] = Field(description="the validated recipe (config/recipes.py's schema)")
    random_checkpoint: RandomCheckpoint | None = Field(None, description="--random: the seed and depth")


class Closeness(_Strict):
    max_abs_error: float
    top1: float
    max_flipped_margin: float
    positions: int


class LogitCase(_Strict):
    name: str
    prompt_lengths: list[int]
    prefill: Closeness
    decode: Closeness


class LogitParity(_Strict):
    """The fp32 gate: max abs logit error relative to the logit scale, and top-1 agreement (verify/gate.py)."""

    metric: Literal["relative_logit_error"]
    tolerance: float
    min_top1: float
    logit_scale: float
    prefill: float
    decode: float
    prefill_max_abs_error: float
    prefill_top1: float
    prefill_max_flipped_margin: float
    prefill_positions: int
    decode_max_abs_error: float
    decode_top1: float
    decode_max_flipped_margin: float
    decode_positions: int
    passed: bool
    cases: list[LogitCase]


class Agreement(_Strict):
    top1: float
    kl: float
    max_abs_logit_error: float
    positions: int


class AgreementCase(_Strict):
    name: str
    prompt_lengths: list[int]
    prefill: Agreement
    decode: Agreement


class AgreementParity(_Strict):
    """A quantized build's gate: top-1 agreement and mean KL against the fp32 reference."""

    metric: Literal["agreement"]
    quant: str
    min_top1: float
    max_kl: float
    prefill: Agreement
    decode: Agreement
    passed: bool
    cases: list[AgreementCase]


class EmbeddingParity(_Strict):
    """An embedding model's gate: max abs difference per sentence-embedding component."""

    metric: Literal["max_abs_embedding_error"]
    tolerance: float
    prompt_lengths: list[int]
    sentence_max_abs_error: float
    sentence_min_cosine: float
    token_max_abs_error: float
    passed: bool


Parity = Annotated[LogitParity | AgreementParity | EmbeddingParity, Field(discriminator="metric")]


class ImagePreprocessing(_Strict):
    """How an image becomes `pixel_values` and its prompt tokens, read from the checkpoint's processor files
    (runtime/images.py; transformers' PIL-backend image processor and processor)."""

    size: list[int] = Field(description="[height, width] every image is resized to")
    resample: str = Field(description="Pillow filter of the resize: bilinear, bicubic, ...")
    do_convert_rgb: bool = Field(description="convert to RGB first")
    do_rescale: bool
    rescale_factor: float = Field(description="pixel values (0..255) times this (1/255)")
    do_normalize: bool
    image_mean: list[float] = Field(description="per channel, subtracted after rescaling")
    image_std: list[float] = Field(description="per channel, divided by after the mean")
    image_marker: str = Field(description="the prompt's placeholder for one image: <start_of_image>")
    image_sequence: list[str] = Field(description="what a marker expands to: before, begin, image token (repeated "
                                      "mm_tokens_per_image times), end, after")  # fmt: skip
    mm_tokens_per_image: int = Field(description="image tokens (and feature rows) per image")
    image_token_id: int = Field(description="the image token's id: the decoder puts a feature row there")
    prompt_layout: Literal["gemma3", "paligemma"] = Field(
        "gemma3",
        description="gemma3: markers expand in place; paligemma: then bos after the last image and a closing "
        "newline, and the whole prompt is one bidirectional prefix (token_type_ids 1 over it)",
    )
    bos_token: str = Field("", description="paligemma: the bos text put after the image tokens")
    prefix_window: int = Field(0, description="paligemma: the longest prompt it takes; 0: any (nonzero, the "
                               "sliding window, only in artifacts built before the op's blocks=2)")  # fmt: skip


class VisionParity(_Strict):
    max_abs_error: float = Field(description="image features, artifact vs the PyTorch reference")
    tolerance: float
    images: int = Field(description="random images compared")
    passed: bool


class VisionInfo(_Strict):
    """An image + text artifact (Gemma 3 with its SigLIP tower, 2.2): the vision graph, its preprocessing, and
    the decoder's two extra inputs (README "Image prompts")."""

    model: str = Field(description="the role in `files` of the vision graph (vision_model)")
    inputs: list[TensorSpec] = Field(description="pixel_values [num_images, 3, height, width] float32")
    outputs: list[TensorSpec] = Field(description="image_features [num_images, mm_tokens_per_image, hidden]")
    config: dict[str, Any] = Field(description="the tower's config (models/siglip.py VisionConfig)")
    preprocessing: ImagePreprocessing
    quant: Literal["none"] = Field(description="the vision graph stays float32 whatever --quant")
    decoder_inputs: list[str] = Field(description="the decoder's extra inputs: token_type_ids, image_features")
    parity: VisionParity | None = Field(None, description="the build's check of the image features")


class ArtifactSpec(_Strict):
    """What the artifact is, before its verification: everything a runtime needs to open and run it (the build's
    verify stage opens the artifact with this). `Manifest` adds the verification's result."""

    format: str = Field(description=f"`{FORMAT}`: the compatibility rule is in manifest.py's docstring")
    model: ModelInfo = Field(description="what was exported")
    build: BuildInfo = Field(description="how it was built")
    inputs: list[TensorSpec] = Field(description="the graph's inputs, in order")
    outputs: list[TensorSpec] = Field(description="the graph's outputs, in order")
    state: list[StateEntry] = Field(description="cache pairs carried between calls (empty for encoders)")
    files: dict[str, FileEntry] = Field(description="role (model, weights, genai_config, tokenizer.json, ...) -> file")
    quantization: Quantization | None = Field(None, description="quantized builds: widths and what was rewritten")
    recipe: RecipeRecord | None = Field(None, description="the recipe it was built from, if any")
    vision: VisionInfo | None = Field(None, description="image + text artifacts: the vision graph (2.2)")
    versions: dict[str, str] = Field(description="gemma-export and its toolchain (torch, onnx, onnxruntime, ...)")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        check_format(value)
        return value

    # --- reading and writing -----------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST) -> Self:
        """The typed manifest of a parsed JSON document; one line naming the first bad field otherwise."""
        if isinstance(data, dict):
            check_format(data.get("format"), source)  # before the fields: another version has other fields
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise BadInput(f"{source}: {describe(e)}") from None

    @classmethod
    def read(cls, artifact_dir: Path) -> Self:
        artifact_dir = Path(artifact_dir)
        path = artifact_dir / MANIFEST
        if not artifact_dir.is_dir():
            raise BadInput(f"{artifact_dir}: artifact directory does not exist")
        if not path.is_file():
            raise BadInput(f"{artifact_dir}: no {MANIFEST}; not a gemma-export artifact")
        try:
            data = json.loads(path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, str(path))

    def to_json(self) -> dict[str, Any]:
        """The JSON document: fields left at their default (None, False) are omitted."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @property
    def is_embedding_model(self) -> bool:
        return self.model.task == "sentence-embedding"


class Manifest(ArtifactSpec):
    """The whole manifest: the artifact (`ArtifactSpec`) and the parity gate it passed."""

    parity: Parity = Field(description="the gate it passed, and what was measured (`metric` says which)")


def check_format(value: Any, source: str = MANIFEST) -> tuple[int, int]:
    """(major, minor) of a format string this reader can read, or one line saying why it cannot."""
    match = re.fullmatch(re.escape(FORMAT_PREFIX) + r"(\d+)(?:\.(\d+))?", value) if isinstance(value, str) else None
    if match is None:
        raise BadInput(f"{source}: format: unknown manifest format {value!r} (expected {FORMAT!r})")
    major, minor = int(match[1]), int(match[2] or 0)
    if major != VERSION[0]:
        newer = "a newer gemma-export: upgrade to read it" if major > VERSION[0] else "an older gemma-export"
        raise BadInput(f"{source}: format: manifest {major}.{minor} was written by {newer}; this reader knows "
                       f"{VERSION[0]}.x (rebuild the artifact)")  # fmt: skip
    if minor > VERSION[1]:
        raise BadInput(f"{source}: format: manifest {major}.{minor} was written by a newer gemma-export (this "
                       f"reader knows up to {VERSION[0]}.{VERSION[1]}); upgrade gemma-export")  # fmt: skip
    return major, minor


def describe(error: ValidationError) -> str:
    """The first problem of a validation error, as `field.path: what is wrong`."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"  # a parity variant shows its metric
    kind = first["type"]
    if kind == "missing":
        return f"{where}: missing field"
    if kind == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where}: {first['msg']}"


# --- the README's table ------------------------------------------------------------------------------------


def field_table() -> list[str]:
    """Markdown rows `| field | type | meaning |` of every field, nested ones dotted (README "Manifest fields")."""
    rows = ["| field | type | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str, variant: str = "") -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            required = "" if info.is_required() else " (optional)"
            meaning = variant + (info.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {_type_name(annotation)}{required} | {meaning} |")
            nested = _nested_models(annotation)
            for model_type in nested if nested != [ModelConfig] else []:
                label = f"[{model_type.__name__}] " if len(nested) > 1 else variant
                walk(model_type, f"{prefix}{name}{'[]' if _is_list(annotation) else ''}.", label)

    walk(Manifest, "")
    return rows


def _args(annotation: Any) -> tuple[Any, ...]:
    return getattr(annotation, "__args__", ())


def _is_list(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is list or any(_is_list(a) for a in _args(annotation))


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field holds (several for a union), not those inside a dict's values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if getattr(annotation, "__origin__", None) is dict:
        return []
    return [m for arg in _args(annotation) for m in _nested_models(arg)]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    if text is None:
        # (run as `python -m gemma_export.manifest`, the classes live in __main__)
        text = str(annotation).replace("typing.", "").replace("gemma_export.manifest.", "").replace("__main__.", "")
        text = re.sub(r"Annotated\[(.*), FieldInfo\(.*\)\]", r"\1", text)
    return f"`{text}`".replace("NoneType", "None").replace("|", "\\|")


if __name__ == "__main__":  # python -m gemma_export.manifest: the README table
    print("\n".join(field_table()))
