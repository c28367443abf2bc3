"""Our CUDA kernels (graphs/*/kernels/) and their loader, gemma_export/ops/cuda.py.

Here (CPU CI): the library compiles with nvcc for every architecture we ship and exports exactly its C ABI;
the ctypes signatures agree with the C headers; the loader's search order and its errors. On a machine with
a GPU the rest runs: every conformance vector, random shapes against the PyTorch reference, and a tiny model
generating through `torch.ops.gemma.*` on CUDA (the same functions `make gpu-check` runs, which adds speed).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import pytest

from gemma_export.dev import gpu_check
from gemma_export.ops import cuda
from tests.support import ROOT

HAS_NVCC = cuda.find_nvcc() is not None
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not _has_gpu(), reason="no CUDA device (torch.cuda.is_available() is False)")

C_TYPES = {
    "const void *": ctypes.c_void_p,
    "void *": ctypes.c_void_p,
    "const float *": ctypes.c_void_p,
    "float *": ctypes.c_void_p,
    "int64_t": ctypes.c_int64,
    "int": ctypes.c_int,
    "float": ctypes.c_float,
    "size_t": ctypes.c_size_t,
    "const char *": ctypes.c_char_p,
}


def header_prototypes() -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, [parameter types]) of every GEMMA_API function declared in the headers."""
    found = {}
    for header in cuda.HEADERS:
        text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
        for ret, name, params in re.findall(r"GEMMA_API\s+([\w\s]+?\*?)\s*(\w+)\s*\(([^)]*)\)\s*;", text):
            types = [] if params.strip() == "void" else [re.sub(r"\s*\w+$", "", p.strip()) for p in params.split(",")]
            found[name] = (" ".join(ret.split()), [" ".join(t.replace("*", " *").split()) for t in types])
    return found


def test_the_ctypes_signatures_are_the_headers() -> None:
    prototypes = header_prototypes()
    assert set(prototypes) == set(cuda.ABI_SYMBOLS)
    for name, (restype, argtypes) in cuda.SIGNATURES.items():
        ret, params = prototypes[name]
        assert C_TYPES[ret.replace("*", " *").replace("  ", " ")] == restype, name
        assert [C_TYPES[p] for p in params] == argtypes, name


def test_the_dtype_codes_and_abi_version_are_the_headers() -> None:
    common = (ROOT / "graphs" / "kernels" / "gemma_kernels_common.h").read_text()
    enums = {k: int(v) for k, v in re.findall(r"(GEMMA_(?:DTYPE|MASK)_\w+)\s*=\s*(\d+)", common)}
    assert {k: enums[f"GEMMA_DTYPE_{k.upper()}"] for k in cuda.DTYPES} == cuda.DTYPES
    assert {k: enums[f"GEMMA_MASK_{k.upper()}"] for k in cuda.MASK_DTYPES} == cuda.MASK_DTYPES
    assert f"#define GEMMA_KERNELS_ABI_VERSION {cuda.ABI_VERSION}\n" in common


def test_the_nvcc_command_builds_every_source_for_every_arch(tmp_path) -> None:
    command = cuda.nvcc_command(tmp_path / "lib.so", ("80", "90"), "90")
    assert [a for a in command if a.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert all(str(s) in command for s in cuda.SOURCES) and all(s.is_file() for s in cuda.SOURCES)
    assert command[-2:] == ["-o", str(tmp_path / "lib.so")]


def test_the_library_is_found_by_env_first(monkeypatch, tmp_path) -> None:
    lib = tmp_path / "libgemma_kernels.so"
    monkeypatch.setenv("GEMMA_KERNELS_LIB", str(lib))
    with pytest.raises(cuda.KernelError, match="is not a file"):
        cuda.library_path()
    lib.write_bytes(b"")
    assert cuda.library_path() == lib
    with pytest.raises(cuda.KernelError, match="cannot load"):
        cuda.load(lib)  # an empty file is no library


def test_without_a_library_and_without_building_it_says_how_to_get_one(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("GEMMA_KERNELS_LIB", raising=False)
    monkeypatch.setattr(cuda, "REPO_LIBRARY", tmp_path / "absent.so")
    monkeypatch.setenv("GEMMA_EXPORT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cuda.KernelError, match="make kernels"):
        cuda.library_path(build=False)


def test_a_repository_library_older_than_the_sources_is_passed_over(monkeypatch, tmp_path) -> None:
    import os

    monkeypatch.delenv("GEMMA_KERNELS_LIB", raising=False)
    monkeypatch.setenv("GEMMA_EXPORT_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "libgemma_kernels.so"
    repo.write_bytes(b"")
    monkeypatch.setattr(cuda, "REPO_LIBRARY", repo)
    assert cuda.library_path(build=False) == repo  # written after the sources
    os.utime(repo, (0, 0))  # older than every source: stale
    with pytest.raises(cuda.KernelError, match="make kernels"):
        cuda.library_path(build=False)


def test_without_nvcc_building_fails_in_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None)
    with pytest.raises(cuda.KernelError, match="nvcc not found"):
        cuda.build_library(tmp_path / "lib.so")


def test_unknown_dtype_names_are_refused_before_anything_loads(monkeypatch) -> None:
    monkeypatch.setattr(cuda, "load", lambda *a: pytest.fail("loaded the library"))
    sizes = dict(batch=1, heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=8, scale=1.0, softcap=0.0, window=0)
    with pytest.raises(cuda.KernelError, match="dtype 'float64' is not one of: float32, float16, bfloat16"):
        cuda.attention_launch(1, 1, 1, 1, 1, **sizes, causal=True, dtype="float64", mask_dtype="int64", stream=0)
    with pytest.raises(cuda.KernelError, match="mask dtype 'uint8'"):
        cuda.attention_launch(1, 1, 1, 1, 1, **sizes, causal=True, dtype="float32", mask_dtype="uint8", stream=0)
    with pytest.raises(cuda.KernelError, match="dtype 'int8'"):
        cuda.rglru_launch(1, 1, 1, 1, 1, 1, batch=1, seq=1, width=1, dtype="int8", stream=0)


def test_importing_the_loader_needs_neither_torch_nor_cuda() -> None:
    code = "import sys, gemma_export.ops.cuda; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- the library itself: built once for every architecture (about a minute on 2 cores) --------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / cuda.LIBRARY_NAME
    return cuda.build_library(out, cuda.DEFAULT_ARCHS, cuda.DEFAULT_PTX)


@pytest.mark.slow
@needs_nvcc
def test_the_library_compiles_for_every_arch_and_exports_only_its_abi(built) -> None:
    assert cuda.exported_symbols(built) == sorted(cuda.ABI_SYMBOLS)  # the static CUDA runtime stays hidden
    fatbins = cuda.fatbin_entries(built)
    assert len(fatbins) >= 2  # attention.cu and rglru.cu at least
    for entries in fatbins:  # a cubin for each arch in every fatbin
        assert sorted(arch for kind, arch in entries if kind == "sass") == [int(a) for a in cuda.DEFAULT_ARCHS]
    ptx = [arch for entries in fatbins for kind, arch in entries if kind == "ptx"]
    assert set(ptx) == {int(cuda.DEFAULT_PTX)} and len(ptx) >= 2, fatbins


def test_the_fatbin_reader_reads_what_nvcc_wrote(tmp_path) -> None:
    """The reader against a hand-made fatbin (the layout of nvcc 13's, as found in the built library)."""

    def entry(kind: int, arch: int, payload: bytes) -> bytes:
        header = kind.to_bytes(2, "little") + b"\0\0" + (32).to_bytes(4, "little") + len(payload).to_bytes(8, "little")
        return header + bytes(12) + arch.to_bytes(4, "little") + payload

    body = entry(2, 80, b"x" * 10) + entry(1, 90, b"ptx")
    fatbin = (0xBA55ED50).to_bytes(4, "little") + b"\1\0" + (16).to_bytes(2, "little") + len(body).to_bytes(8, "little")
    blob = b"junk" + fatbin + body + b"more junk"
    (tmp_path / "lib.so").write_bytes(blob)
    assert cuda.fatbin_entries(tmp_path / "lib.so") == [[("sass", 80), ("ptx", 90)]]


@pytest.mark.slow
@needs_nvcc
def test_the_built_library_loads_and_answers_without_a_gpu(built) -> None:
    """Host-side code runs without a device: the ABI version, error strings, workspace sizes, and the shape
    rules, which are checked before anything is enqueued."""
    lib = cuda.load(built)
    assert lib.gemma_kernels_abi_version() == cuda.ABI_VERSION
    assert lib.gemma_kernels_error_string(-3) == b"head_dim must be between 1 and 256"
    assert lib.gemma_attention_workspace_size(1, 8, 1, 256) == 64 * 8 * (256 + 2) * 4
    assert lib.gemma_attention_workspace_size(1, 8, 17, 256) == 0  # long queries never split
    for batch, heads, q_len, head_dim in [(1, 8, 1, 256), (3, 2, 16, 64), (2, 4, 5, 1), (1, 1, 17, 8)]:
        # the Python mirror TensorRT plugins ask at build time (no library there) is the library's own size
        assert cuda.attention_workspace_bound(batch=batch, heads=heads, max_q_len=q_len, head_dim=head_dim) == (
            lib.gemma_attention_workspace_size(batch, heads, min(q_len, 16), head_dim)
        )
    args = [None] * 5
    # q_len > kv_len, heads not a multiple of kv_heads, head_dim 512, dtype 7: refused with their codes
    assert lib.gemma_attention_launch(*args, 1, 8, 2, 9, 8, 64, 1.0, 0.0, 0, 1, 0, 0, None, 0, None) == -1
    assert lib.gemma_attention_launch(*args, 1, 8, 3, 1, 8, 64, 1.0, 0.0, 0, 1, 0, 0, None, 0, None) == -1
    assert lib.gemma_attention_launch(*args, 1, 8, 2, 1, 8, 512, 1.0, 0.0, 0, 1, 0, 0, None, 0, None) == -3
    assert lib.gemma_attention_launch(*args, 1, 8, 2, 1, 8, 64, 1.0, 0.0, 0, 1, 7, 0, None, 0, None) == -2
    assert lib.gemma_attention_launch(*args, 0, 8, 2, 1, 8, 64, 1.0, 0.0, 0, 1, 0, 0, None, 0, None) == 0  # empty
    assert lib.gemma_rglru_launch(*[None] * 6, -1, 1, 1, 0, None) == -1
    assert lib.gemma_rglru_launch(*[None] * 6, 1, 1, 1, 5, None) == -2
    assert lib.gemma_rglru_launch(*[None] * 6, 1, 4, 8, 0, None) == -4


# ---- the kernels' own code on the CPU (graphs/kernels/emulation/; g++, slow: one OS thread per CUDA thread) ---

A, R = gpu_check.AttentionCase, gpu_check.RglruCase
# Small enough for the emulation (a few blocks each), yet through every path: key splits merged by the combine
# kernel (decode: an "H100" of 132 SMs), sliding windows shorter than the prompt, a past, padding with fully
# masked rows, soft-cap, bidirectional, float16 / bfloat16, head sizes that need padding (6) or none (80, 256).
EMULATED_ATTENTION = (
    A("decode split", 1, 4, 1, 1, 700, 64),
    A("decode window padding softcap split", 2, 4, 2, 1, 600, 32, window=200, softcap=5.0, left_pad=(0, 450)),
    A("decode bf16 d256 split", 1, 2, 1, 1, 300, 256, dtype="bfloat16"),
    A("prefill longer than the window, softcap", 1, 2, 1, 48, 48, 16, window=8, softcap=2.0),
    A("chunked prefill over a past", 1, 4, 2, 5, 90, 32, window=20),
    A("fp16 prefill window", 1, 2, 1, 40, 40, 32, window=16, dtype="float16"),
    A("bf16 prefill", 1, 2, 1, 40, 40, 32, dtype="bfloat16"),
    A("head_dim 80 int32 mask", 1, 2, 1, 20, 20, 80, window=5, mask_dtype="int32"),
    A("head_dim 6 fp16", 1, 2, 1, 20, 20, 6, dtype="float16"),
    A("head_dim 6 window 1 bool mask", 1, 2, 1, 20, 20, 6, window=1, mask_dtype="bool"),
    A("bidirectional window padding", 2, 2, 2, 30, 30, 16, window=5, causal=False, left_pad=(0, 10)),
)
EMULATED_RGLRU = (
    R("from zero state", 2, 50, 300),
    R("continuation", 1, 20, 100, resets="none"),
    R("packed fp16", 2, 60, 300, dtype="float16", resets="packed"),
    R("packed bf16", 1, 30, 64, dtype="bfloat16", resets="packed"),
    R("empty sequence", 2, 0, 10, resets="none"),
    R("decode step", 3, 1, 70, resets="none"),
)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from tests.support import kernel_emulation

    if kernel_emulation.available():
        pytest.skip(kernel_emulation.available())
    lib = cuda.load(kernel_emulation.build(tmp_path_factory.mktemp("emulation") / "libgemma_kernels_emulated.so"))
    saved, cuda._library = cuda._library, lib  # the launchers call this library for the module's tests
    yield gpu_check.Impl("emulated kernels", "cpu", kernel_emulation.attention, kernel_emulation.rglru)
    cuda._library = saved


@pytest.mark.slow
def test_registering_the_torch_kernels_leaves_cpu_tensors_to_the_reference(emulated) -> None:
    """`register_torch_kernels()` on this torch (in a child: registration is for the process's life) loads the
    library named by GEMMA_KERNELS_LIB and registers both ops for CUDA; CPU tensors still get the reference."""
    code = (
        "import os, torch\n"
        "from gemma_export.ops import cuda\n"
        "from gemma_export.ops.attention import attention_reference\n"
        "cuda.register_torch_kernels(); cuda.register_torch_kernels()  # idempotent\n"
        "assert str(cuda._library._name) == os.environ['GEMMA_KERNELS_LIB']\n"
        "q, k, v = torch.rand(1, 2, 3, 8), torch.rand(1, 1, 5, 8), torch.rand(1, 1, 5, 8)\n"
        "m = torch.ones(1, 5, dtype=torch.int64)\n"
        "got = torch.ops.gemma.attention(q, k, v, m, 0.5, 0.0, 2, True)\n"
        "assert torch.equal(got, attention_reference(q, k, v, m, 0.5, 0.0, 2, True))\n"
        "y, h = torch.ops.gemma.rglru(torch.rand(1, 4, 3), -torch.rand(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool),"
        " torch.zeros(1, 3))\n"
        "assert y.shape == (1, 4, 3) and h.dtype == torch.float32\n"
    )
    env = {**os.environ, "GEMMA_KERNELS_LIB": str(cuda._library._name), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


@pytest.mark.slow
def test_emulated_kernels_reproduce_every_vector(emulated) -> None:
    for path in _vectors("attention"):
        if gpu_check.has_blocks(path):  # the kernels have no image blocks
            continue
        for mask_dtype in ("int64", "int32", "bool"):
            error = gpu_check.attention_vector_error(emulated, path, mask_dtype)
            assert error <= gpu_check.VECTOR_TOLERANCE, (path.stem, mask_dtype, error)
    for path in _vectors("rglru"):
        assert gpu_check.rglru_vector_error(emulated, path) <= gpu_check.VECTOR_TOLERANCE, path.stem


@pytest.mark.slow
def test_emulated_kernels_match_the_reference(emulated) -> None:
    from tests.support import kernel_emulation

    for case in EMULATED_ATTENTION:
        error = gpu_check.attention_error(emulated, case)
        assert error <= gpu_check.RANDOM_TOLERANCE[case.dtype], (case.name, error)
    for case in EMULATED_RGLRU:
        error = gpu_check.rglru_error(emulated, case)
        assert error <= gpu_check.RANDOM_TOLERANCE[case.dtype], (case.name, error)
    # the split path with the launcher's own scratch (no workspace passed)
    no_workspace = gpu_check.Impl("", "cpu", lambda *a: kernel_emulation.attention(*a, workspace=False), None)
    assert gpu_check.attention_error(no_workspace, EMULATED_ATTENTION[1]) <= gpu_check.RANDOM_TOLERANCE["float32"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma2", "recurrent_gemma"])
def test_the_reference_model_generates_the_same_tokens_through_the_emulated_kernels(emulated, model_type) -> None:
    """What `make gpu-check` does on a GPU, on the CPU: a tiny model (Gemma 2: soft-cap, GQA, a window of 16;
    RecurrentGemma: the RG-LRU, a window of 8 over its buffer) generates greedily for a left-padded batch with
    `torch.ops.gemma.*` overridden by the emulated kernels (in a child, the override is for its life): the
    same tokens as the reference, and close logits."""
    code = f"""
import torch
from gemma_export.dev import gpu_check
from gemma_export.ops import cuda
from tests.support import kernel_emulation

model = gpu_check.tiny_model({model_type!r})
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (20, 9, 3)]
want, want_logits = gpu_check.greedy(model, prompts, 5, "cpu")
cuda.load()
override = torch.library.Library("gemma", "IMPL")
override.impl("attention", kernel_emulation.attention, "CPU")
override.impl("rglru", kernel_emulation.rglru, "CPU")
got, got_logits = gpu_check.greedy(model, prompts, 5, "cpu")
assert got == want, (got, want)
error = float((got_logits - want_logits).abs().max() / want_logits.abs().max())
assert 0 < error < 1e-5, error  # not 0: the kernels did run
"""
    env = {**os.environ, "GEMMA_KERNELS_LIB": str(cuda._library._name), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=600)


# ---- on a GPU --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels():
    cuda.register_torch_kernels()
    return gpu_check.kernels_impl()


def _vectors(op: str) -> list:
    return sorted((ROOT / "graphs" / op / "vectors").glob("*.json"))


@needs_gpu
@pytest.mark.parametrize("mask_dtype", ["int64", "int32", "bool"])
@pytest.mark.parametrize(
    "path", [p for p in _vectors("attention") if not gpu_check.has_blocks(p)], ids=lambda p: p.stem
)  # (the kernels have no image blocks: those vectors are the function body's and ort-cpu's)
def test_attention_kernel_reproduces_the_vectors(kernels, path, mask_dtype) -> None:
    assert gpu_check.attention_vector_error(kernels, path, mask_dtype) <= gpu_check.VECTOR_TOLERANCE


@needs_gpu
@pytest.mark.parametrize("path", _vectors("rglru"), ids=lambda p: p.stem)
def test_rglru_kernel_reproduces_the_vectors(kernels, path) -> None:
    assert gpu_check.rglru_vector_error(kernels, path) <= gpu_check.VECTOR_TOLERANCE


def _case_ids(cases) -> list[str]:
    return [re.sub(r"\W+", "-", c.name).strip("-") for c in cases]


@needs_gpu
@pytest.mark.parametrize("case", gpu_check.ATTENTION_CASES, ids=_case_ids(gpu_check.ATTENTION_CASES))
def test_attention_kernel_matches_the_reference(kernels, case) -> None:
    assert gpu_check.attention_error(kernels, case) <= gpu_check.RANDOM_TOLERANCE[case.dtype]


@needs_gpu
@pytest.mark.parametrize("case", gpu_check.RGLRU_CASES, ids=_case_ids(gpu_check.RGLRU_CASES))
def test_rglru_kernel_matches_the_reference(kernels, case) -> None:
    assert gpu_check.rglru_error(kernels, case) <= gpu_check.RANDOM_TOLERANCE[case.dtype]


@needs_gpu
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "recurrent_gemma"])
def test_the_reference_model_generates_the_same_tokens_on_the_gpu(kernels, model_type) -> None:
    import copy

    model = gpu_check.tiny_model(model_type)
    prompts = [[5, 9, 40, 7] * 10, [11, 3, 8]]
    want, _ = gpu_check.greedy(model, prompts, 12, "cpu")
    got, _ = gpu_check.greedy(copy.deepcopy(model).to("cuda"), prompts, 12, "cuda")
    assert got == want
