"""The build's memory: the verify stage's reference runs first and is freed (its memory-mapped weights
unmapped) before ONNX Runtime opens the artifact, in a child process that never imports torch, whose session
holds no pre-packed second copy of the weights; every stage's peak covers that child. The package stage and
the reference's forward passes do not keep the checkpoint's pages resident (memory.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from gemma_export.checkpoint import load
from gemma_export.config.model_config import parse_config
from gemma_export.dev.random_checkpoint import TINY_CONFIGS
from gemma_export.errors import BadInput, GemmaExportError
from gemma_export.manifest import FORMAT, ArtifactSpec
from gemma_export.pipeline import progress
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtDecoder
from gemma_export.verify import child as verify_worker
from gemma_export.verify import gate as verify


class _Echo:
    """A decoder whose logits are a fixed function of the inputs; it logs every step and cache it starts."""

    def __init__(self, vocab_size: int, log: list[str], tag: str) -> None:
        self.vocab_size, self.log, self.tag = vocab_size, log, tag

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        self.log.append(f"{self.tag}:cache")
        return [np.zeros((batch, 1), np.float32)]

    def step(self, input_ids, attention_mask, position_ids, cache):
        self.log.append(f"{self.tag}:step")
        seen = cache[0] + input_ids.sum(-1, keepdims=True)
        logits = np.sin(seen[:, :, None] + position_ids[:, :, None] * np.arange(self.vocab_size)).astype(np.float32)
        return logits, [seen]


def test_reference_runs_first_and_is_dropped_before_the_artifact_opens(tmp_path) -> None:
    cfg = parse_config(TINY_CONFIGS["gemma3_text"])
    log: list[str] = []
    alive: list[weakref.ref] = []
    seen_at_open: list[bool] = []

    def reference() -> _Echo:
        ref = _Echo(cfg.vocab_size, log, "ref")
        alive.append(weakref.ref(ref))
        return ref

    def artifact() -> _Echo:
        seen_at_open.append(alive[0]() is not None)
        return _Echo(cfg.vocab_size, log, "art")

    pairs = list(verify.paired_logits(reference, artifact, cfg, spill_dir=tmp_path))
    assert seen_at_open == [False]  # the reference was gone when the artifact was opened
    first_art = log.index("art:cache")
    assert all(entry.startswith("ref") for entry in log[:first_art])
    assert all(entry.startswith("art") for entry in log[first_art:])
    assert log.count("ref:step") == log.count("art:step") == len(pairs)
    # the same inputs in the same order: identical decoders agree exactly, pass by pass, through the spill file
    assert all(np.array_equal(ref, art) and ref.shape[-1] == cfg.vocab_size for *_, ref, art in pairs)
    assert {phase for _, _, phase, _, _ in pairs} == {"prefill", "decode"}
    assert list(tmp_path.iterdir()) == []  # the spill file is unlinked


# The ONNX Runtime child of a build, run through this wrapper: it records, in the file named by its first
# argument, whether torch was ever imported in it and how its session was made.
CHILD = """
import json, sys
from gemma_export.runtime import session as runtime
from gemma_export.verify import child as verify_worker
report = sys.argv.pop(1)
seen = {}
real = runtime.OrtDecoder
class Tracked(real):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.session.get_session_options()
        seen["prepacking"] = options.get_session_config_entry("session.disable_prepacking") != "1"
        seen["arena"] = options.enable_cpu_mem_arena
verify_worker.OrtDecoder = Tracked
code = verify_worker.main(sys.argv[1:])
seen["torch_imported"] = "torch" in sys.modules
open(report, "w").write(json.dumps(seen))
sys.exit(code)
"""

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps, smaps, status")


@pytest.mark.slow
@LINUX
def test_build_runs_the_artifact_in_a_child_without_torch_after_unmapping_the_checkpoint(
    checkpoints, tmp_path, monkeypatch
) -> None:
    checkpoint = shutil.copytree(checkpoints["gemma3_text"], tmp_path / "ckpt")  # mapped by this build alone
    params: list[weakref.ref] = []
    at_spawn: list[dict] = []
    report = tmp_path / "child.json"
    load_model, command = load.load_model, verify_worker.command

    def tracked_load(*args, **kwargs):
        cfg, model = load_model(*args, **kwargs)
        params.extend(weakref.ref(p) for p in model.parameters())
        return cfg, model

    def child_command() -> list[str]:  # called in this process just before the child starts
        at_spawn.append({
            "parameters_alive": sum(p() is not None for p in params),
            "checkpoint_mapped": str(checkpoint.resolve()) in Path("/proc/self/maps").read_text(),
        })  # fmt: skip
        python, _, module, parent = command()
        assert module == "gemma_export.verify.child"
        return [python, "-c", CHILD, str(report), parent]

    monkeypatch.setattr(load, "load_model", tracked_load)
    monkeypatch.setattr(verify_worker, "command", child_command)
    monkeypatch.setattr(progress, "CHILDREN", [])
    stages = Stages(quiet=True)
    manifest = build(checkpoint, tmp_path / "out", BuildOptions(), stages)
    assert manifest.parity.passed and params
    assert at_spawn == [{"parameters_alive": 0, "checkpoint_mapped": False}]
    assert json.loads(report.read_text()) == {"prepacking": False, "arena": False, "torch_imported": False}

    # Every stage reports the max over the process tree; the verify stage names the child and its share.
    records = stages.to_json()
    assert all(isinstance(s["peak_rss"], int) and s["peak_rss"] > 0 for s in records)  # VmHWM per stage
    verify_stage = records[-1]
    assert verify_stage["stage"] == "verify" and [s for s in records if "children" in s] == [verify_stage]
    (child,) = verify_stage["children"]
    assert child["process"] == verify_worker.PROCESS_NAME and child["peak_rss"] > 10 << 20
    assert child["together"] == child["peak_rss"] + child["parent_rss"] and child["parent_rss"] > 0
    assert verify_stage["peak_rss"] == max(verify_stage["peak_rss_self"], child["peak_rss"])


def test_stage_peak_is_the_max_over_the_process_tree(monkeypatch) -> None:
    monkeypatch.setattr(progress, "CHILDREN", [])
    stages = Stages(quiet=True)
    with stages.stage("light"):
        pass
    with stages.stage("child"):
        progress.record_child("big child", peak_rss=1 << 50, parent_rss=3)
    with stages.stage("after"):
        pass
    light, child, after = stages.to_json()
    assert "children" not in light and "children" not in after
    if light["peak_rss"] is None:
        pytest.skip("no /proc/self/status here")
    assert light["peak_rss"] < 1 << 50
    assert child["peak_rss"] == after["peak_rss"] == 1 << 50  # a child's peak is never hidden, later either
    assert child["peak_rss_self"] < 1 << 50
    assert child["children"] == [{"process": "big child", "peak_rss": 1 << 50, "parent_rss": 3,
                                  "together": (1 << 50) + 3}]  # fmt: skip


def _artifact_in_child(folder: Path) -> verify.ArtifactInChild:
    config = {"model_type": "gemma", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "bos_token_id": 2,
              "eos_token_ids": [1], "pad_token_id": 0}  # fmt: skip
    spec = ArtifactSpec(
        format=FORMAT,
        model={"type": "gemma", "source_model_type": "gemma", "config": config},
        build={
            "target": "onnx",
            "providers": ["CPUExecutionProvider"],
            "precision": "fp32",
            "quant": "none",
            "opset": 23,
            "domains": {"ai.onnx": 23},
            "max_length": 16,
        },
        inputs=[{"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence_length"]}],
        outputs=[],
        state=[],
        files={"model": {"path": "model.onnx", "sha256": "0" * 64, "bytes": 11}},
        versions={},
    )
    return verify.ArtifactInChild(folder, spec)


def test_an_error_in_the_child_is_raised_again_as_it_was(tmp_path, monkeypatch) -> None:
    """The same class name and message as in this process, so the CLI prints the same line (exit 3)."""
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    artifact = _artifact_in_child(tmp_path)
    with pytest.raises(Exception) as in_process:
        OrtDecoder(tmp_path, artifact.manifest, low_memory=True)
    monkeypatch.setattr(progress, "CHILDREN", [])
    with tempfile.TemporaryFile() as spill, pytest.raises(Exception) as in_child:
        verify_worker.run_in_child(artifact, [], spill.fileno(), "max_abs_error")
    assert type(in_child.value).__name__ == type(in_process.value).__name__
    assert str(in_child.value) == str(in_process.value)
    assert len(progress.CHILDREN) == 1  # its peak is recorded all the same
    # our own errors keep their class, so their exit code
    error = verify_worker._error({"type": "BadInput", "message": "bad", "exit_code": 2})
    assert isinstance(error, BadInput) and str(error) == "bad"


def test_a_child_killed_by_a_signal_is_one_error(tmp_path, monkeypatch) -> None:
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(verify_worker, "command", lambda: [sys.executable, "-c", script])
    with tempfile.TemporaryFile() as spill, pytest.raises(GemmaExportError, match="killed by SIGKILL, out of memory"):
        verify_worker.run_in_child(_artifact_in_child(tmp_path), [], spill.fileno(), "max_abs_error")


@LINUX
def test_a_child_dies_with_its_parent(tmp_path) -> None:
    """A build killed outright (SIGKILL: no cleanup runs) takes its ONNX Runtime child with it."""
    ready = tmp_path / "child.pid"
    child = f"from gemma_export.pipeline import memory; import os, sys, time; memory.die_with_parent({{parent}}); " \
            f"open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(60)"  # fmt: skip
    parent = f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}.format(" \
             f"parent=os.getpid())]); time.sleep(60)"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the child never started"
            time.sleep(0.05)
        pid = int(ready.read_text())
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"child {pid} outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


SOME_PAGES = 256 << 10  # what reading around a page may map besides it (the kernel's fault-around: 64 KiB)


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    rss, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
    return rss


@LINUX
def test_package_writes_mapped_weights_without_keeping_them_resident(tmp_path) -> None:
    """A weight that is a span of the checkpoint file is copied by the kernel; a view of it (transposed, as the
    optimizer folds a Transpose) is read, and its pages are dropped once written. Same bytes either way."""
    import onnx_ir as ir
    import torch
    from safetensors.torch import save_file

    from gemma_export.checkpoint import files as checkpoint
    from gemma_export.pipeline import package

    path = tmp_path / "model.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(1024, 1024, generator=gen), "b": torch.randn(512, 1024, generator=gen)}, path)
    tensors = checkpoint.read_tensors(tmp_path)
    arrays = {"a": tensors["a"].numpy(), "b_t": tensors["b"].numpy().T}  # views of the mapped file
    assert _mapped_rss(path) < SOME_PAGES  # nothing read yet (the header, a few pages around)
    values = [ir.Value(name=name, const_value=ir.Tensor(array, name=name)) for name, array in arrays.items()]
    outputs = [ir.Value(name=f"{v.name}_out") for v in values]
    nodes = [ir.Node("", "Identity", [v], outputs=[o]) for v, o in zip(values, outputs, strict=True)]
    graph = ir.Graph([], outputs, nodes=nodes, initializers=values, opset_imports={"": 23})
    out = tmp_path / "out"
    out.mkdir()
    package.write_model(ir.Model(graph, ir_version=10), out)

    assert _mapped_rss(path) < SOME_PAGES  # neither weight stayed resident
    assert [v.const_value.raw for v in values] == list(arrays.values())  # the model is left as it was
    written = {v.name: v.const_value.numpy() for v in ir.load(out / package.MODEL_FILE).graph.initializers.values()}
    assert all(np.array_equal(written[name], array) for name, array in arrays.items())
    arrays["b_t"].sum()
    assert _mapped_rss(path) >= 2 << 20  # (the measure sees pages that are read)


@LINUX
def test_drop_after_forward_keeps_about_one_module_of_weights_resident(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from gemma_export.checkpoint import files as checkpoint
    from gemma_export.pipeline import memory

    path = tmp_path / "model.safetensors"
    layers, width = 6, 512  # 1 MiB of weights per layer
    gen = torch.Generator().manual_seed(0)
    save_file({f"{i}.weight": torch.randn(width, width, generator=gen) / width**0.5 for i in range(layers)}, path)

    def mapped_model() -> torch.nn.Module:
        with torch.device("meta"):
            model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
        model.load_state_dict(checkpoint.read_tensors(tmp_path), assign=True)
        return model

    x = torch.randn(3, width, generator=gen)
    with torch.inference_mode():
        expected = mapped_model()(x)
    model = mapped_model()
    seen: list[int] = []
    for module in model:  # hooked first, so it runs after each module's forward but before the drop
        module.register_forward_hook(lambda module, args, out: seen.append(_mapped_rss(path)))
    assert memory.drop_after_forward(model) == layers * width * width * 4
    for _ in range(2):  # the second pass starts with nothing resident (loading touched the first pages)
        seen.clear()
        with torch.inference_mode():
            assert torch.equal(model(x), expected)  # dropped pages read back the same weights
        assert _mapped_rss(path) < SOME_PAGES
    assert len(seen) == layers
    assert all(1 << 20 <= rss <= (1 << 20) + SOME_PAGES for rss in seen), seen  # the layer just run, no more
