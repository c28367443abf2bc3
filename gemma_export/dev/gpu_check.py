"""`make gpu-check`: our CUDA kernels (graphs/*/kernels/) checked on a GPU, in one command of a few minutes.

    python3 -m gemma_export.dev.gpu_check [--dry-run] [--lib PATH] [--json PATH] [--quick]

Written for the GPU machine a task is sometimes lent (H100/H200, nvcc, the machine's own python3 with a CUDA
torch; our repository copied there, not our virtual environment, no internet). In order:

1. build: compile libgemma_kernels.so for this GPU's compute capability (+ sm_90 and compute_90 PTX), check
   that it exports the C ABI;
2. vectors: every conformance vector in graphs/attention/vectors and graphs/rglru/vectors through the kernels
   (float32, 1e-5 absolute on the compared rows, every element finite: the specs' tolerance), the attention
   ones also with int32 and bool masks;
3. random: the kernels against the PyTorch reference (`attention_reference`, `rglru_reference`, on the same
   GPU in float32) on random shapes: prefill longer than the window, chunked prefill over a past, decode over
   a long cache (the split-key path), GQA / MQA, left padding with fully masked rows, soft-cap,
   bidirectional windows, head sizes that are not multiples of 32, float16 and bfloat16;
4. models: tiny Gemma 2, Gemma 3 and RecurrentGemma (random weights, built in-process from
   `dev.random_checkpoint.TINY_CONFIGS`) generate greedily on the GPU with our kernels registered as
   `torch.ops.gemma.*` and on the CPU with the reference: the tokens must be identical;
5. bandwidth: each kernel's achieved memory bandwidth (bytes it must move / time) against the card's peak.

Prints one compact table and exits 1 if any check failed, 2 if it cannot run at all (no CUDA device, no
nvcc). `--dry-run` runs the same harness on the CPU with the PyTorch reference standing in for the kernels
(no CUDA, no nvcc): what tests/dev/test_gpu_check.py runs on every machine.

Only torch and numpy are needed. The exporter's modules import onnx and onnxscript at module level for the
ops' ONNX faces; where those are not installed (the GPU machine) they are replaced by inert placeholder
modules (`_stub_missing`), which is enough for the PyTorch faces this check uses. Nothing else of the
exporter's dependencies (pydantic, tokenizers, safetensors, transformers, onnxruntime) is imported.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ATTENTION_VECTORS = ROOT / "graphs" / "attention" / "vectors"
RGLRU_VECTORS = ROOT / "graphs" / "rglru" / "vectors"
BUILD_DIR = ROOT / "build" / "kernels" / "gpu-check"
VECTOR_TOLERANCE = 1e-5  # graphs/README.md: an implementation's tolerance on the vectors (float32)
# Against the reference on random inputs in [-1, 1]: float32 allows for another summation order over
# thousands of keys / steps; 16-bit outputs are rounded to their type (half an ulp at 1: 4.9e-4 for float16,
# 3.9e-3 for bfloat16) and the reference rounds P to the type before P.V where the kernel keeps float32.
RANDOM_TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# Imported at module level by ops/attention.py and ops/rglru.py for the ops' ONNX faces, unused here. Stubbed
# together (a lone onnx of another version could refuse the schema registration).
OPTIONAL_MODULES = ("onnx", "onnxscript")


# ---- placeholders for modules the GPU machine lacks ----------------------------------------------------


class _Inert:
    """Anything: every attribute, call, subscript or decorator use gives another inert object."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Inert:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(f"{self._name}()")

    def __getitem__(self, key: Any) -> _Inert:
        return self

    def __repr__(self) -> str:
        return f"<placeholder {self._name}>"


class _InertModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(f"{self.__name__}.{attr}")


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _stub_missing(names: tuple[str, ...] = OPTIONAL_MODULES) -> list[str]:
    """Install inert placeholders for `names` when any of them cannot be imported; returns their names.
    How the tests reproduce the GPU machine: GEMMA_GPU_CHECK_ABSENT=pydantic,... makes modules look missing."""
    absent = {n for n in os.environ.get("GEMMA_GPU_CHECK_ABSENT", "").split(",") if n}
    for name in absent:  # `import name` fails, importlib.util.find_spec(name) is None: as if not installed
        sys.modules[name] = None  # type: ignore[assignment]
    missing = {n for n in names if n in absent or importlib.util.find_spec(n) is None}
    if not missing:
        return []
    for name in names:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, _InertFinder(set(names)))
    return sorted(names)


# ---- results --------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    case: str
    ok: bool
    metric: str
    detail: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, case: str, ok: bool, metric: str, detail: str = "") -> None:
        self.rows.append(Row(section, case, ok, metric, detail))
        if not ok:  # as it happens; every row is in the table at the end
            print(f"  FAIL {section}: {case}: {metric} {detail}".rstrip(), flush=True)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        widths = [max(len(getattr(r, f)) for r in self.rows) for f in ("section", "case", "metric")]
        lines = [f"{'section':{widths[0]}}  {'case':{widths[1]}}  result  {'metric':{widths[2]}}  detail"]
        for r in self.rows:
            lines.append(f"{r.section:{widths[0]}}  {r.case:{widths[1]}}  {'ok    ' if r.ok else 'FAIL  '}"
                         f"{r.metric:{widths[2]}}  {r.detail}".rstrip())  # fmt: skip
        return "\n".join(lines)


# ---- the implementations under test ---------------------------------------------------------------------


@dataclass
class Impl:
    """The attention / RG-LRU under test (our kernels on CUDA, or the reference in a dry run) and its device."""

    name: str
    device: str
    attention: Callable[..., Any]
    rglru: Callable[..., Any]


def kernels_impl() -> Impl:
    from gemma_export.ops import cuda

    return Impl("cuda kernels", "cuda", cuda.attention_cuda, cuda.rglru_cuda)


def reference_impl() -> Impl:
    from gemma_export.ops.attention import attention_reference
    from gemma_export.ops.rglru import rglru_reference

    return Impl("reference (dry run)", "cpu", attention_reference, rglru_reference)


# ---- conformance vectors ------------------------------------------------------------------------------


def _array(tensor: dict[str, Any]) -> np.ndarray:
    dtype = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}[tensor["dtype"]]
    return np.array(tensor["data"], dtype=dtype).reshape(tensor["shape"])


def attention_vector_error(impl: Impl, path: Path, mask_dtype: str = "int64") -> float:
    """Largest error of `impl` on one attention vector over its compared rows; inf if any element is not
    finite (excluded rows included)."""
    import torch

    raw = json.loads(path.read_text())
    t = {n: torch.from_numpy(_array(v)).to(impl.device) for n, v in raw["inputs"].items()}
    mask = t["attention_mask"].to(getattr(torch, mask_dtype))
    a = raw["attributes"]
    out = impl.attention(t["query"], t["key"], t["value"], mask, a["scale"], a["softcap"], a["window"],
                         bool(a["causal"])).cpu().double().numpy()  # fmt: skip
    expected = _array(raw["output"]).astype(np.float64)
    if not np.isfinite(out).all() or out.shape != expected.shape:
        return math.inf
    keep = np.ones(out.shape[0:1] + out.shape[2:3], bool)
    for b, i in raw["excluded_rows"]:
        keep[b, i] = False
    return float(np.abs(np.where(keep[:, None, :, None], out - expected, 0.0)).max(initial=0.0))


def rglru_vector_error(impl: Impl, path: Path) -> float:
    import torch

    raw = json.loads(path.read_text())
    t = {n: torch.from_numpy(_array(v)).to(impl.device) for n, v in raw["inputs"].items()}
    y, h_last = impl.rglru(t["x"], t["log_a"], t["reset"], t["h0"])
    errors = []
    for name, got in (("y", y), ("h_last", h_last)):
        got = got.cpu().double().numpy()
        expected = _array(raw["outputs"][name]).astype(np.float64)
        if not np.isfinite(got).all() or got.shape != expected.shape:
            return math.inf
        errors.append(float(np.abs(got - expected).max(initial=0.0)))
    return max(errors)


def has_blocks(path: Path) -> bool:
    """An attention vector with image blocks (attribute `blocks`): the CUDA kernels have none, and
    --target tensorrt refuses image checkpoints, so such a vector is not theirs to reproduce."""
    return bool(json.loads(path.read_text())["attributes"].get("blocks", 0))


def check_vectors(impl: Impl, report: Report) -> None:
    for path in sorted(ATTENTION_VECTORS.glob("*.json")):
        if has_blocks(path):
            report.add("vectors", f"attention/{path.stem}", True, "skipped: image blocks (the kernels have none)")
            continue
        err = max(attention_vector_error(impl, path, mask_dtype) for mask_dtype in ("int64", "int32", "bool"))
        report.add("vectors", f"attention/{path.stem} (int64/int32/bool mask)", err <= VECTOR_TOLERANCE,
                   f"max err {err:.1e}")  # fmt: skip
    for path in sorted(RGLRU_VECTORS.glob("*.json")):
        err = rglru_vector_error(impl, path)
        report.add("vectors", f"rglru/{path.stem}", err <= VECTOR_TOLERANCE, f"max err {err:.1e}")


# ---- random shapes against the reference ----------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCase:
    name: str
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    window: int = 0
    causal: bool = True
    softcap: float = 0.0
    dtype: str = "float32"
    left_pad: tuple[int, ...] = ()  # padding slots at the start of each row
    mask_dtype: str = "int64"


ATTENTION_CASES = (
    AttentionCase("prefill > window, GQA 8/2, softcap", 2, 8, 2, 300, 300, 128, window=64, softcap=50.0),
    AttentionCase("prefill global, MQA 4/1, d256", 1, 4, 1, 257, 257, 256),
    AttentionCase("prefill > window, bf16, d256", 2, 4, 2, 200, 200, 256, window=48, dtype="bfloat16"),
    AttentionCase("prefill > window, fp16, softcap", 1, 8, 4, 190, 190, 128, window=32, softcap=30.0,
                  dtype="float16"),
    AttentionCase("chunked prefill over a past, window", 2, 6, 2, 37, 500, 64, window=100),
    AttentionCase("left padding, fully masked rows", 3, 4, 2, 70, 70, 32, softcap=20.0, left_pad=(0, 9, 69)),
    AttentionCase("decode global, long cache (split)", 1, 8, 1, 1, 4099, 256),
    AttentionCase("decode window 1024 (split)", 2, 8, 4, 1, 5000, 128, window=1024, dtype="bfloat16"),
    AttentionCase("decode padded rows, softcap (split)", 3, 4, 2, 1, 777, 256, softcap=50.0, left_pad=(0, 300, 776)),
    AttentionCase("decode fp16 GQA 16/8", 4, 16, 8, 1, 2048, 128, dtype="float16"),
    AttentionCase("4-token speculative step over cache", 2, 8, 2, 4, 3000, 256, window=512),
    AttentionCase("bidirectional window, padding", 2, 4, 4, 90, 90, 64, window=16, causal=False, left_pad=(0, 30)),
    AttentionCase("bidirectional global, bool mask", 2, 3, 1, 65, 65, 48, causal=False, left_pad=(5, 0),
                  mask_dtype="bool"),
    AttentionCase("head_dim 80, int32 mask", 2, 4, 2, 100, 100, 80, window=20, mask_dtype="int32"),
    AttentionCase("head_dim 6 (element loads), window 1", 1, 2, 1, 40, 40, 6, window=1),
)  # fmt: skip


@dataclass(frozen=True)
class RglruCase:
    name: str
    batch: int
    seq: int
    width: int
    dtype: str = "float32"
    resets: str = "start"  # "start": a document at step 0; "none": continues h0; "packed": several documents


RGLRU_CASES = (
    RglruCase("prefill from zero state", 2, 600, 2560),
    RglruCase("continuation of h0", 3, 257, 1000, resets="none"),
    RglruCase("packed documents", 2, 300, 513, resets="packed"),
    RglruCase("decode step", 8, 1, 2560, resets="none"),
    RglruCase("empty sequence (h_last = h0)", 2, 0, 64, resets="none"),
    RglruCase("prefill fp16", 2, 400, 2560, dtype="float16", resets="packed"),
    RglruCase("prefill bf16", 2, 400, 2560, dtype="bfloat16", resets="packed"),
)


def attention_inputs(case: AttentionCase, device: str, seed: int = 0) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def uniform(*shape: int) -> Any:
        return (torch.rand(*shape, generator=g) * 2 - 1).to(dtype).to(device)

    q = uniform(case.batch, case.heads, case.q_len, case.head_dim)
    k = uniform(case.batch, case.kv_heads, case.kv_len, case.head_dim)
    v = uniform(case.batch, case.kv_heads, case.kv_len, case.head_dim)
    mask = torch.ones(case.batch, case.kv_len, dtype=torch.int64)
    for row, pad in enumerate(case.left_pad):
        mask[row, :pad] = 0
    return q, k, v, mask.to(getattr(torch, case.mask_dtype)).to(device)


def visible_rows(case: AttentionCase, mask: Any) -> Any:
    """[batch, q_len] bool: rows that see at least one key (the others' output is unspecified)."""
    from gemma_export.ops import visibility

    return visibility.visible(mask.cpu().to(bool), case.q_len, case.window, case.causal).any(-1)


def attention_error(impl: Impl, case: AttentionCase, seed: int = 0) -> float:
    """Largest error of `impl` against the reference (float32, same device, same rounded inputs) on the
    rows with a visible key; inf if any element is not finite."""
    import torch

    from gemma_export.ops.attention import attention_reference

    q, k, v, mask = attention_inputs(case, impl.device, seed)
    scale = case.head_dim**-0.5
    got = impl.attention(q, k, v, mask, scale, case.softcap, case.window, case.causal).float()
    want = attention_reference(q.float(), k.float(), v.float(), mask, scale, case.softcap, case.window, case.causal)
    if not torch.isfinite(got).all():
        return math.inf
    keep = visible_rows(case, mask).to(got.device)[:, None, :, None]
    return float(((got - want).abs() * keep).max())


def rglru_inputs(case: RglruCase, device: str, seed: int = 0) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    x = (torch.rand(case.batch, case.seq, case.width, generator=g) * 2 - 1).to(dtype)
    # log_a as the model makes it: -8 * sigmoid(.) * softplus(.), here in [-1.5, -1e-3]
    log_a = (-(torch.rand(case.batch, case.seq, case.width, generator=g) * 1.5 + 1e-3)).to(dtype)
    reset = torch.zeros(case.batch, case.seq, dtype=torch.bool)
    if case.resets in ("start", "packed") and case.seq:
        reset[:, 0] = True
    if case.resets == "packed":
        reset |= torch.rand(case.batch, case.seq, generator=g) < 0.02
    h0 = torch.rand(case.batch, case.width, generator=g) * 2 - 1
    return tuple(t.to(device) for t in (x, log_a, reset, h0))


def rglru_error(impl: Impl, case: RglruCase, seed: int = 0) -> float:
    import torch

    from gemma_export.ops.rglru import rglru_reference

    x, log_a, reset, h0 = rglru_inputs(case, impl.device, seed)
    y, h_last = impl.rglru(x, log_a, reset, h0)
    want_y, want_h = rglru_reference(x.float(), log_a.float(), reset, h0)
    finite = bool(torch.isfinite(y).all() and torch.isfinite(h_last).all())
    if y.dtype != x.dtype or h_last.dtype != torch.float32 or not finite:
        return math.inf
    err_y = float((y.float() - want_y).abs().max()) if y.numel() else 0.0
    return max(err_y, float((h_last - want_h).abs().max()) if h_last.numel() else 0.0)


def check_random(impl: Impl, report: Report, quick: bool = False) -> None:
    cases = ATTENTION_CASES[:4] if quick else ATTENTION_CASES
    for case in cases:
        err = attention_error(impl, case)
        tol = RANDOM_TOLERANCE[case.dtype]
        report.add("random", f"attention: {case.name}", err <= tol, f"max err {err:.1e}", f"(tol {tol:.0e})")
    for case in RGLRU_CASES[:3] if quick else RGLRU_CASES:
        err = rglru_error(impl, case)
        tol = RANDOM_TOLERANCE[case.dtype]
        report.add("random", f"rglru: {case.name}", err <= tol, f"max err {err:.1e}", f"(tol {tol:.0e})")


# ---- the reference model, end to end -------------------------------------------------------------------

MODEL_TYPES = ("gemma2", "gemma3_text", "recurrent_gemma")


def tiny_configs() -> dict[str, dict[str, Any]]:
    """`dev.random_checkpoint.TINY_CONFIGS`, read without importing that module: importing it runs its recipe
    loading (pydantic) and imports tokenizers, neither needed here nor on the GPU machine. Its `_COMMON` and
    `TINY_CONFIGS` assignments are evaluated alone (tests/dev/test_gpu_check.py checks the result equals the
    module's own)."""
    from gemma_export.config.model_config import SLIDING

    source = Path(__file__).with_name("random_checkpoint.py").read_text()
    wanted = {"_COMMON", "TINY_CONFIGS"}
    body = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in wanted:
            body.append(ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node))
    namespace: dict[str, Any] = {"SLIDING": SLIDING, "Any": Any}
    exec(compile(ast.fix_missing_locations(ast.Module(body=body, type_ignores=[])), "random_checkpoint.py", "exec"),
         namespace)  # fmt: skip
    return namespace["TINY_CONFIGS"]


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A tiny random-weight model of `dev.random_checkpoint.TINY_CONFIGS`, built in-process (no files)."""
    import torch

    from gemma_export.config.model_config import parse_config, parse_griffin_config
    from gemma_export.models.gemma import GemmaModel
    from gemma_export.models.griffin import GriffinModel

    raw = tiny_configs()[model_type]
    torch.manual_seed(seed)
    if model_type == "recurrent_gemma":
        model = GriffinModel(parse_griffin_config(raw))
    else:
        model = GemmaModel(parse_config(raw))
    with torch.no_grad():  # every weight random (some modules start at zeros), the embedding at unit scale
        for name, param in model.named_parameters():
            param.normal_(0.0, 1.0 if "embed_tokens" in name else 0.05)
    return model.eval()


def greedy(model: Any, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[list[list[int]], Any]:
    """Greedy tokens of a left-padded batch with the state carried (as runtime.session.generate does), and
    the prefill's last logits; `model` is already on `device`."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    pos = torch.where(mask == 0, 1, mask.cumsum(-1) - 1)  # runtime.session.positions: pads get 1
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    state = [spec.empty(len(prompts)).to(device) for spec in model.state_specs()]
    out: list[list[int]] = [[] for _ in prompts]
    first = None
    with torch.inference_mode():
        for _ in range(new_tokens):
            step_mask = mask if model.mask_covers_past else mask[:, -ids.shape[1] :]
            logits, state = model(ids, step_mask, pos, state)
            if first is None:
                first = logits[:, -1].float().cpu()
            nxt = logits[:, -1].argmax(-1)
            for row, token in enumerate(nxt.tolist()):
                out[row].append(token)
            ids = nxt[:, None]
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            pos = pos[:, -1:] + 1
    return out, first


def check_models(impl: Impl, report: Report, new_tokens: int = 24) -> None:
    import torch

    for model_type in MODEL_TYPES:
        model = tiny_model(model_type)
        vocab = model.cfg.vocab_size
        g = torch.Generator().manual_seed(1)
        lengths = (45, 20, 3)  # longer than every tiny window (16, 8), left-padded rows, a short one
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
        want, want_logits = greedy(model, prompts, new_tokens, "cpu")
        on_device = copy.deepcopy(model).to(impl.device)
        got, got_logits = greedy(on_device, prompts, new_tokens, impl.device)
        same = sum(a == b for gr, wr in zip(got, want, strict=True) for a, b in zip(gr, wr, strict=True))
        total = sum(len(r) for r in want)
        scale = float(want_logits.abs().max())
        rel = float((got_logits - want_logits).abs().max()) / scale
        report.add("model", f"{model_type}: {len(prompts)} prompts x {new_tokens} greedy", same == total,
                   f"{same}/{total} tokens", f"prefill logits rel err {rel:.1e}")  # fmt: skip


# ---- bandwidth ------------------------------------------------------------------------------------------


# Nominal peaks (GB/s) by product name, the last resort when no API reports the memory clock.
NOMINAL_PEAK_GBS = {"H100 80GB HBM3": 3352, "H100 PCIe": 2039, "H100 NVL": 3938, "H200": 4800,
                    "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}  # fmt: skip


def _driver_memory_clock() -> tuple[int, int] | None:
    """(memory clock in kHz, bus width in bits) of device 0 from the CUDA driver (cuDeviceGetAttribute 36, 37),
    which every GPU machine has, whatever the runtime's cudaDeviceProp still carries (CUDA 13 dropped its
    memoryClockRate)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, clock, bus = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if driver.cuInit(0) or driver.cuDeviceGet(ctypes.byref(device), 0):
        return None
    if driver.cuDeviceGetAttribute(ctypes.byref(clock), 36, device) or driver.cuDeviceGetAttribute(
        ctypes.byref(bus), 37, device
    ):
        return None
    return (clock.value, bus.value) if clock.value and bus.value else None


def peak_bandwidth() -> tuple[float | None, str]:
    """The card's peak DRAM bandwidth in GB/s (2 transfers per memory clock x bus width), and its source."""
    import torch

    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    source = "torch device properties"
    if not (clock_khz and bus_bits):
        found, source = _driver_memory_clock(), "CUDA driver attributes"
        if found is None:
            try:
                import cupy

                attrs = cupy.cuda.runtime.getDeviceProperties(0)
                found, source = (attrs["memoryClockRate"], attrs["memoryBusWidth"]), "cupy device properties"
            except Exception:  # any failure: try the names
                found = None
        if found is None:
            for name, gbs in NOMINAL_PEAK_GBS.items():
                if name in props.name:
                    return float(gbs), f"nominal for {name}"
            return None, "unknown (no API reports the memory clock)"
        clock_khz, bus_bits = found
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, source


def time_ms(fn: Callable[[], Any], repeat: int = 10, inner: int = 10) -> float:
    """Milliseconds per call of `fn` (the median over `repeat` timings of `inner` back-to-back calls between two
    CUDA events, after a warm-up): with calls queued back to back, the host's per-call overhead (tens of
    microseconds through torch and ctypes) hides behind kernels that take longer than it."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / inner)
    return float(np.median(times))


# Each moves >= 256 MB (>= ~80 us on an H100), long enough to time; Gemma-like shapes (head_dim 256).
BANDWIDTH_ATTENTION = (
    AttentionCase("decode B=8 4/1 T=32768 bf16", 8, 4, 1, 1, 32768, 256, dtype="bfloat16"),
    AttentionCase("decode B=1 16/8 T=32768 bf16", 1, 16, 8, 1, 32768, 256, dtype="bfloat16"),
    AttentionCase("decode B=4 8/4 T=8192 fp32", 4, 8, 4, 1, 8192, 256),
    AttentionCase("decode B=16 8/4 T=16384 window 4096 bf16", 16, 8, 4, 1, 16384, 256, window=4096, dtype="bfloat16"),
    AttentionCase("prefill B=1 8/4 S=T=4096 bf16", 1, 8, 4, 4096, 4096, 256, dtype="bfloat16"),
    AttentionCase("prefill B=1 8/4 S=T=4096 window 512 bf16", 1, 8, 4, 4096, 4096, 256, window=512,
                  dtype="bfloat16"),
)  # fmt: skip
BANDWIDTH_RGLRU = (
    RglruCase("prefill B=1 S=4096 W=2560 fp32", 1, 4096, 2560),
    RglruCase("prefill B=8 S=2048 W=2560 bf16", 8, 2048, 2560, dtype="bfloat16"),
    RglruCase("prefill B=32 S=1024 W=2560 fp32", 32, 1024, 2560),
    RglruCase("decode B=64 W=2560 fp32 (launch-bound)", 64, 1, 2560, resets="none"),
)


def device_attention_inputs(case: AttentionCase) -> tuple[Any, ...]:
    """Random inputs made on the GPU (the bandwidth cases are too large to draw on the CPU quickly)."""
    import torch

    dtype = getattr(torch, case.dtype)
    q = torch.rand(case.batch, case.heads, case.q_len, case.head_dim, device="cuda").to(dtype)
    k = torch.rand(case.batch, case.kv_heads, case.kv_len, case.head_dim, device="cuda").to(dtype)
    v = torch.rand(case.batch, case.kv_heads, case.kv_len, case.head_dim, device="cuda").to(dtype)
    return q, k, v, torch.ones(case.batch, case.kv_len, dtype=torch.int64, device="cuda")


def attention_bytes(case: AttentionCase, esize: int) -> int:
    """What the op must move at least: its inputs once (keys/values of the visible span only) and its output."""
    span = case.kv_len if case.window <= 0 else min(case.kv_len, case.window + case.q_len - 1)
    kv = 2 * case.batch * case.kv_heads * span * case.head_dim * esize
    q_out = 2 * case.batch * case.heads * case.q_len * case.head_dim * esize
    return kv + q_out + case.batch * case.kv_len * 8


def attention_flops(case: AttentionCase) -> float:
    """Useful flops (2 matmuls of 2 flops per multiply-add over the visible keys; causal halves a square)."""
    if case.window > 0:
        keys = min(case.window, case.kv_len)
    elif case.causal and case.q_len > 1:
        keys = case.kv_len - case.q_len + (case.q_len + 1) / 2
    else:
        keys = case.kv_len
    return 4.0 * case.batch * case.heads * case.q_len * keys * case.head_dim


def check_bandwidth(impl: Impl, report: Report) -> None:
    import torch

    peak, source = peak_bandwidth()
    peak_text = f"{peak:.0f} GB/s" if peak else "peak unknown"
    report.add("bandwidth", f"card: {torch.cuda.get_device_name(0)}", True, peak_text, f"({source})")
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    copy_ms = time_ms(big.clone)
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    report.add("bandwidth", "torch clone 256 MiB (achievable)", True, f"{copy_gbs:.0f} GB/s", _share(copy_gbs, peak))
    del big
    for case in BANDWIDTH_ATTENTION:
        q, k, v, mask = device_attention_inputs(case)
        scale = case.head_dim**-0.5
        ms = time_ms(functools.partial(impl.attention, q, k, v, mask, scale, case.softcap, case.window, case.causal))
        gbs = attention_bytes(case, q.element_size()) / ms / 1e6
        tflops = attention_flops(case) / ms / 1e9
        report.add("bandwidth", f"attention {case.name}", True, f"{gbs:.0f} GB/s",
                   f"{_share(gbs, peak)}, {ms:.3f} ms, {tflops:.1f} TFLOP/s")  # fmt: skip
        del q, k, v, mask
    for case in BANDWIDTH_RGLRU:
        x, log_a, reset, h0 = rglru_inputs(case, "cuda")
        ms = time_ms(functools.partial(impl.rglru, x, log_a, reset, h0))
        moved = 3 * x.numel() * x.element_size() + reset.numel() + 2 * h0.numel() * 4
        gbs = moved / ms / 1e6
        report.add("bandwidth", f"rglru {case.name}", True, f"{gbs:.0f} GB/s", f"{_share(gbs, peak)}, {ms:.3f} ms")
        del x, log_a, reset, h0


def _share(gbs: float, peak: float | None) -> str:
    return f"{100 * gbs / peak:.0f}% of peak" if peak else "peak unknown"


# ---- build ----------------------------------------------------------------------------------------------


def build_kernels(report: Report) -> Path | None:
    """Compile the library for this GPU (+ sm_90 / compute_90 PTX) and check its exported ABI."""
    from gemma_export.ops import cuda

    archs = sorted({*cuda.local_archs(), "90"})
    out = BUILD_DIR / cuda.LIBRARY_NAME
    start = time.monotonic()
    try:
        cuda.build_library(out, archs, cuda.DEFAULT_PTX)
    except cuda.KernelError as e:
        report.add("build", "nvcc", False, "failed", str(e).splitlines()[0])
        return None
    seconds = time.monotonic() - start
    report.add("build", f"nvcc sm_{', sm_'.join(archs)} + compute_90", True, f"{seconds:.0f} s", str(out))
    try:
        symbols = set(cuda.exported_symbols(out))
        missing = [s for s in cuda.ABI_SYMBOLS if s not in symbols]
        report.add("build", "exported ABI symbols", not missing, f"{len(cuda.ABI_SYMBOLS) - len(missing)}/"
                   f"{len(cuda.ABI_SYMBOLS)}", f"missing {missing}" if missing else "")  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        report.add("build", "exported ABI symbols", True, "not checked", f"(nm: {e})")
    return out


# ---- main -----------------------------------------------------------------------------------------------


def run(dry_run: bool, lib: Path | None, quick: bool, report: Report) -> int:
    stubbed = _stub_missing()
    try:
        import torch
    except ImportError as e:
        print(f"gpu-check: error: {e} (run it with a python3 that has torch; .venv's is CPU-only)", file=sys.stderr)
        return 2

    print(f"gpu-check: torch {torch.__version__}, numpy {np.__version__}"
          + (f"; placeholders for {', '.join(stubbed)}" if stubbed else ""), flush=True)  # fmt: skip
    if dry_run:
        impl = reference_impl()
    else:
        if not torch.cuda.is_available():
            print("gpu-check: error: no CUDA device (torch.cuda.is_available() is False; torch "
                  f"{torch.__version__}, built for CUDA {torch.version.cuda}); use --dry-run on a machine without "
                  "a GPU", file=sys.stderr)  # fmt: skip
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference's float32 matmuls stay float32
        torch.backends.cudnn.allow_tf32 = False
        if lib is None:
            lib = build_kernels(report)
            if lib is None:
                return 2
        os.environ["GEMMA_KERNELS_LIB"] = str(lib)
        from gemma_export.ops import cuda

        cuda.register_torch_kernels()
        impl = kernels_impl()
        print(f"gpu-check: {torch.cuda.get_device_name(0)}, kernels {lib}", flush=True)

    sections: list[tuple[str, Callable[[], None]]] = [
        ("vectors", lambda: check_vectors(impl, report)),
        ("random", lambda: check_random(impl, report, quick)),
        ("model", lambda: check_models(impl, report, 8 if quick else 24)),
    ]
    if not dry_run:
        sections.append(("bandwidth", lambda: check_bandwidth(impl, report)))
    for name, section in sections:
        start = time.monotonic()
        try:
            section()
        except Exception as e:  # a crash of one section is a failure of it; the others still run
            report.add(name, "crashed", False, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        print(f"gpu-check: {name} done in {time.monotonic() - start:.1f} s", flush=True)
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m gemma_export.dev.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: the reference stands in for the kernels")
    parser.add_argument("--lib", type=Path, help="use this libgemma_kernels.so instead of building one")
    parser.add_argument("--quick", action="store_true", help="fewer random cases and tokens")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    report = Report()
    start = time.monotonic()
    code = run(args.dry_run, args.lib, args.quick, report)
    if report.rows:
        print("\n" + report.table())
    verdict = {0: "all checks passed", 1: f"{len(report.failed)} check(s) FAILED", 2: "could not run"}[code]
    print(f"\ngpu-check: {verdict} ({len(report.rows)} rows, {time.monotonic() - start:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"exit": code, "rows": [r.__dict__ for r in report.rows]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
