"""`make gpu-check` (gemma_export/dev/gpu_check.py) without a GPU: its harness runs (--dry-run, the reference
standing in for the kernels) where the GPU machine's modules are missing, it catches wrong kernels, and
without CUDA it stops with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gemma_export.dev import gpu_check
from gemma_export.ops.attention import attention_reference
from gemma_export.ops.rglru import rglru_reference
from tests.support import ROOT

# What the GPU machine may lack: every dependency of the exporter but torch and numpy.
ABSENT = "onnx,onnxscript,onnx_ir,onnxruntime,pydantic,tokenizers,safetensors,transformers,gguf,sentencepiece"


def _run(*args: str, absent: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GEMMA_GPU_CHECK_ABSENT": absent}
    return subprocess.run([sys.executable, "-m", "gemma_export.dev.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_the_dry_run_passes_with_only_torch_and_numpy(tmp_path) -> None:
    """The GPU machine has torch and numpy but maybe none of the exporter's other dependencies: the check
    imports the PyTorch faces (onnx/onnxscript behind inert placeholders) and runs every section but the
    bandwidth one."""
    done = _run("--dry-run", "--quick", "--json", str(tmp_path / "rows.json"), absent=ABSENT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "placeholders for onnx, onnxscript" in done.stdout
    assert "gpu-check: all checks passed" in done.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"vectors", "random", "model"}
    vectors = [r for r in rows if r["section"] == "vectors"]
    assert len(vectors) == len(list(gpu_check.ATTENTION_VECTORS.glob("*.json"))) + len(
        list(gpu_check.RGLRU_VECTORS.glob("*.json"))
    )
    assert all(r["ok"] for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_stops_with_the_reason() -> None:
    done = _run()
    assert done.returncode == 2
    assert "gpu-check: error: no CUDA device" in done.stderr
    assert "--dry-run" in done.stderr


def test_the_tiny_configs_read_without_importing_random_checkpoint_are_its_own() -> None:
    from gemma_export.dev import random_checkpoint

    assert gpu_check.tiny_configs() == random_checkpoint.TINY_CONFIGS


def _impl(attention=attention_reference, rglru=rglru_reference) -> gpu_check.Impl:
    return gpu_check.Impl("under test", "cpu", attention, rglru)


def test_the_vector_harness_passes_the_reference_and_fails_wrong_kernels() -> None:
    vectors = gpu_check.ATTENTION_VECTORS
    softcapped, padded = vectors / "gqa_causal_softcap.json", vectors / "left_padding_causal_softcap.json"
    window = vectors / "causal_window.json"
    assert gpu_check.attention_vector_error(_impl(), softcapped) <= gpu_check.VECTOR_TOLERANCE

    def no_softcap(q, k, v, m, scale, softcap, window, causal):
        return attention_reference(q, k, v, m, scale, 0.0, window, causal)

    def window_off_by_one(q, k, v, m, scale, softcap, window, causal):
        return attention_reference(q, k, v, m, scale, softcap, window + 1, causal)

    assert gpu_check.attention_vector_error(_impl(no_softcap), softcapped) > 1e-3
    assert gpu_check.attention_vector_error(_impl(window_off_by_one), window) > 1e-3

    def nan_rows(q, k, v, m, scale, softcap, window, causal):  # 0 / 0 where no key is visible
        out = attention_reference(q, k, v, m, scale, softcap, window, causal)
        seen = gpu_check.visible_rows(
            gpu_check.AttentionCase("", q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                    window, causal), m)  # fmt: skip
        return torch.where(seen[:, None, :, None], out, torch.nan)

    # excluded rows are not compared, but must be finite
    assert gpu_check.attention_vector_error(_impl(nan_rows), padded) == float("inf")

    def rglru_without_normalisation(x, log_a, reset, h0):
        return rglru_reference(x / torch.sqrt(1 - torch.exp(2 * log_a.float())), log_a, reset, h0)

    def rglru_without_reset(x, log_a, reset, h0):
        return rglru_reference(x, log_a, torch.zeros_like(reset), h0)

    long = gpu_check.RGLRU_VECTORS / "long.json"
    assert gpu_check.rglru_vector_error(_impl(), long) <= gpu_check.VECTOR_TOLERANCE
    assert gpu_check.rglru_vector_error(_impl(rglru=rglru_without_normalisation), long) > 1e-3
    assert gpu_check.rglru_vector_error(_impl(rglru=rglru_without_reset), long) > 1e-3


def test_the_random_harness_fails_a_kernel_that_ignores_the_window() -> None:
    case = gpu_check.ATTENTION_CASES[4]  # chunked prefill over a past, window 100
    assert case.window > 0 and case.q_len < case.kv_len
    assert gpu_check.attention_error(_impl(), case) == 0.0

    def global_attention(q, k, v, m, scale, softcap, window, causal):
        return attention_reference(q, k, v, m, scale, softcap, 0, causal)

    assert gpu_check.attention_error(_impl(global_attention), case) > 1e-3


def test_bytes_and_flops_of_the_bandwidth_cases() -> None:
    decode = gpu_check.AttentionCase("", 2, 8, 4, 1, 1000, 128, dtype="bfloat16")
    kv = 2 * 2 * 4 * 1000 * 128 * 2
    assert gpu_check.attention_bytes(decode, 2) == kv + 2 * 2 * 8 * 1 * 128 * 2 + 2 * 1000 * 8
    windowed = gpu_check.AttentionCase("", 1, 1, 1, 1, 1000, 64, window=100)
    assert gpu_check.attention_bytes(windowed, 4) == 2 * 100 * 64 * 4 + 2 * 64 * 4 + 1000 * 8
    square = gpu_check.AttentionCase("", 1, 1, 1, 4, 4, 1)
    assert gpu_check.attention_flops(square) == 4.0 * 4 * (1 + 2 + 3 + 4) / 4
