"""Every bad input to the `gemma-export` CLI is one clear line on stderr, exit code 2, and no OUT_DIR.

The contract (gemma_export/cli/app.py): 0 ok, 1 a parity gate failed, 2 bad input, 3 internal error, 130
interrupted. Errors are one line `gemma-export: error: ...` naming the fault; a failed or interrupted build
leaves neither OUT_DIR nor its `.OUT.partial-*` staging sibling behind. Broken checkpoints are made from a
fresh `write_random_checkpoint` (no transformers, milliseconds); one artifact is built for the module, over
an existing folder with `--force`, and serves the generate and verify cases.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

from gemma_export.cli.main import main
from gemma_export.dev.random_checkpoint import TINY_CONFIGS, write_random_checkpoint
from gemma_export.manifest import MANIFEST
from gemma_export.pipeline import optimize, package, trace
from tests.support.cli import assert_no_output, error_line, run

MODEL_TYPE = "gemma3_text"
VOCAB = TINY_CONFIGS[MODEL_TYPE]["vocab_size"]  # 512
MAX_LENGTH = TINY_CONFIGS[MODEL_TYPE]["max_position_embeddings"]  # 1024


# ---- helpers ----------------------------------------------------------------------------------------


def checkpoint(root: Path, **write_options: object) -> Path:
    return write_random_checkpoint(root / "ckpt", TINY_CONFIGS[MODEL_TYPE], **write_options)


def edit_config(ckpt: Path, **changes: object) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(ckpt: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def edit_header(path: Path, edit: Callable[[str], str]) -> None:
    """Rewrite a safetensors file's JSON header as text (its length prefix follows), data section unchanged."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8 : 8 + n].decode()).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])


def _edit_entry(name: str, **changes: object) -> Callable[[str], str]:
    def edit(text: str) -> str:
        header = json.loads(text)
        header[name].update(changes)
        return json.dumps(header)

    return edit


def _entry_twice(text: str) -> str:
    """The first tensor's entry repeated at the end: JSON allows it, json.loads would silently keep the last."""
    header = json.loads(text)
    name = next(k for k in header if k != "__metadata__")
    body = text.rstrip()  # safetensors pads the header with spaces to a multiple of 8 bytes
    assert body.endswith("}")
    return body[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"


# ---- build: bad checkpoints ---------------------------------------------------------------------------

MISSING = "model.layers.3.self_attn.k_proj.weight"
RESHAPED = "model.layers.0.mlp.gate_proj.weight"  # [128, 64]


def _missing_dir(ckpt: Path) -> None:
    shutil.rmtree(ckpt)


def _no_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


def _pickle_only(ckpt: Path) -> None:
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()


def _sharded(ckpt: Path) -> list[Path]:
    write_random_checkpoint(ckpt, TINY_CONFIGS[MODEL_TYPE], max_shard_bytes=200_000)
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    return shards


def _missing_shard(ckpt: Path) -> None:
    _sharded(ckpt)[1].unlink()


def _stored_twice(ckpt: Path) -> None:
    """A tensor of the first shard also written into the second (e.g. two exports merged by hand)."""
    first, second = _sharded(ckpt)[:2]
    name, tensor = next(iter(load_file(str(first)).items()))
    save_file({**load_file(str(second)), name: tensor}, str(second))


def _mapped_to_wrong_shard(ckpt: Path) -> None:
    _sharded(ckpt)
    index = ckpt / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"][MISSING] = "model-00001-of-00006.safetensors"
    index.write_text(json.dumps(raw))


def _pickle_sharded_only(ckpt: Path) -> None:
    shards = _sharded(ckpt)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{len(shards):05d}.bin"
        tensors = load_file(str(shard))
        torch.save(tensors, ckpt / name)
        weight_map.update(dict.fromkeys(tensors, name))
        shard.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _ckpt_only(ckpt: Path) -> None:
    torch.save({"state_dict": load_file(str(ckpt / "model.safetensors"))}, ckpt / "last.ckpt")
    (ckpt / "model.safetensors").unlink()


# case -> (how to break a fresh checkpoint in place, facts the error line must state)
BROKEN_CHECKPOINTS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "missing checkpoint dir": (_missing_dir, ("ckpt", "checkpoint directory does not exist")),
    "no config.json": (_no_config, ("config.json", "no config.json")),
    "unknown model_type": (
        lambda c: edit_config(c, model_type="llama"),
        ("'llama'", "gemma, gemma2, gemma3_text, gemma3"),
    ),
    "config field of the wrong type": (
        lambda c: edit_config(c, hidden_size="64"),
        ("config.json", "'hidden_size'", "must be an integer", "'64'"),
    ),
    "config that is not JSON": (
        lambda c: (c / "config.json").write_text('{"model_type": "gemma3_text",'),
        ("config.json", "not valid JSON"),
    ),
    "config that is a JSON list": (
        lambda c: (c / "config.json").write_text("[1, 2]"),
        ("config.json", "expected a JSON object"),
    ),
    "gemma3 without text_config": (
        lambda c: (c / "config.json").write_text('{"model_type": "gemma3"}'),
        ("'gemma3'", "text_config"),
    ),
    "tensor missing from the weights": (
        lambda c: edit_tensors(c, lambda t: t.pop(MISSING)),
        (f"missing tensor {MISSING!r}",),
    ),
    "tensor of the wrong shape": (
        lambda c: edit_tensors(c, lambda t: t.update({RESHAPED: torch.zeros(128, 32)})),
        (repr(RESHAPED), "wrong shape", "expected [128, 64]", "found [128, 32]"),
    ),
    "extra tensor the model does not use": (
        lambda c: edit_tensors(c, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)})),
        ("unexpected tensor", "'model.layers.9.mlp.up_proj.weight'"),
    ),
    "integer tensor": (
        lambda c: edit_tensors(c, lambda t: t.update({RESHAPED: torch.zeros(128, 64, dtype=torch.int32)})),
        (repr(RESHAPED), "expected floating point"),
    ),
    "bool tensor": (
        lambda c: edit_tensors(c, lambda t: t.update({RESHAPED: torch.zeros(128, 64, dtype=torch.bool)})),
        (repr(RESHAPED), "torch.bool", "expected floating point"),
    ),
    "tensor stored twice across shards": (_stored_twice, ("model-00001-of-", "model-00002-of-", "stored twice")),
    "tensor named twice in one header": (
        lambda c: edit_header(c / "model.safetensors", _entry_twice),
        ("model.safetensors", "truncated or corrupt", "duplicate key"),
    ),
    "index mapping a tensor to the wrong shard": (
        _mapped_to_wrong_shard,
        ("model.safetensors.index.json", repr(MISSING), "model-00001-of-00006.safetensors", "does not contain it"),
    ),
    "safetensors header not JSON": (
        lambda c: edit_header(c / "model.safetensors", lambda text: "{not json" + text[9:]),
        ("model.safetensors", "truncated or corrupt", "header is not JSON"),
    ),
    "safetensors offsets past the end": (
        lambda c: edit_header(c / "model.safetensors", _edit_entry(RESHAPED, data_offsets=[0, 1 << 40])),
        ("model.safetensors", "truncated or corrupt", repr(RESHAPED), "past end of file"),
    ),
    "safetensors dtype unknown to torch": (
        lambda c: edit_header(c / "model.safetensors", _edit_entry(RESHAPED, dtype="F4")),
        ("model.safetensors", repr(RESHAPED), "unsupported dtype 'F4'"),
    ),
    "safetensors truncated in its data": (
        lambda c: truncate(c / "model.safetensors", (c / "model.safetensors").stat().st_size - 1000),
        ("model.safetensors", "truncated or corrupt", "past end of file"),
    ),
    "safetensors truncated in its header": (
        lambda c: truncate(c / "model.safetensors", 100),
        ("model.safetensors", "truncated or corrupt"),
    ),
    "safetensors shorter than its length prefix": (
        lambda c: truncate(c / "model.safetensors", 5),
        ("model.safetensors", "truncated or corrupt", "5 bytes"),
    ),
    "no weights at all": (
        lambda c: (c / "model.safetensors").unlink(),
        ("no model.safetensors or model.safetensors.index.json",),
    ),
    "sharded index naming a missing shard": (
        _missing_shard,
        ("model.safetensors.index.json", "model-00002-of-", "is missing"),
    ),
    "pickle-only checkpoint": (_pickle_only, ("pytorch_model.bin", "refused", "--allow-pickle", "safetensors")),
    "pickle-only sharded checkpoint": (
        _pickle_sharded_only,
        ("pytorch_model.bin.index.json", "pytorch_model-00001-of-", "refused", "--allow-pickle"),
    ),
    "pickle-only .ckpt": (_ckpt_only, ("last.ckpt", "refused", "--allow-pickle")),
}


@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS)
def test_build_refuses_broken_checkpoint(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    breaker, facts = BROKEN_CHECKPOINTS[case]
    ckpt = checkpoint(tmp_path)
    breaker(ckpt)
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "build", ckpt, "-o", out)
    assert code == 2, stderr
    error_line(stderr, *facts)
    assert stdout == ""
    assert_no_output(out)


_INT = "must be an integer"
_ROPE_OK = {"rope_type": "default", "rope_theta": 10000.0}
# case -> (model_type, config.json fields to set, facts the error line must state: the field, the expected type)
BAD_CONFIG_TYPES: dict[str, tuple[str, dict[str, object], tuple[str, ...]]] = {
    "int as a string": (MODEL_TYPE, {"num_hidden_layers": "6"}, ("'num_hidden_layers'", _INT, "'6'")),
    "int as a float": (MODEL_TYPE, {"head_dim": 16.0}, ("'head_dim'", _INT, "16.0")),
    "int as a list": (MODEL_TYPE, {"hidden_size": [64]}, ("'hidden_size'", _INT, "[64]")),
    "int as a bool": (MODEL_TYPE, {"num_attention_heads": True}, ("'num_attention_heads'", _INT, "True")),
    "int as an object": (MODEL_TYPE, {"vocab_size": {"n": 512}}, ("'vocab_size'", _INT)),
    "number as a string": (MODEL_TYPE, {"rms_norm_eps": "1e-6"}, ("'rms_norm_eps'", "must be a number", "'1e-6'")),
    "number as a bool": (MODEL_TYPE, {"query_pre_attn_scalar": False}, ("'query_pre_attn_scalar'", "must be a number")),
    "bool as a string": (
        MODEL_TYPE,
        {"use_bidirectional_attention": "false"},
        ("'use_bidirectional_attention'", "must be true or false", "'false'"),
    ),
    "token ids as a bool": (MODEL_TYPE, {"eos_token_id": True}, ("'eos_token_id'", "integer")),
    "token ids as an empty list": (MODEL_TYPE, {"eos_token_id": []}, ("'eos_token_id'", "non-empty list")),
    "token ids as strings": (MODEL_TYPE, {"eos_token_id": ["1"]}, ("'eos_token_id'", "integer")),
    "list as a string": (
        MODEL_TYPE,
        {"layer_types": "sliding_attention"},
        ("'layer_types'", "must list 6 entries", "'sliding_attention'"),
    ),
    "object as a list": (MODEL_TYPE, {"rope_parameters": [10000.0]}, ("'rope_parameters'", "must be an object")),
    "nested number as a string": (
        MODEL_TYPE,
        {"rope_parameters": {"sliding_attention": _ROPE_OK, "full_attention": {**_ROPE_OK, "rope_theta": "1e6"}}},
        ("'rope_parameters.full_attention.rope_theta'", "must be a positive number", "'1e6'"),
    ),
    "hub spelling: rope_scaling as a number": (
        MODEL_TYPE,
        {"rope_parameters": None, "rope_scaling": 8.0},
        ("'rope_scaling'", "must be an object", "float"),
    ),
    "model_type as a list": (MODEL_TYPE, {"model_type": [MODEL_TYPE]}, ("model_type", "['gemma3_text']", "supported")),
    "recurrent_gemma: int as a float": ("recurrent_gemma", {"lru_width": 64.0}, ("'lru_width'", _INT, "64.0")),
    "recurrent_gemma: token id as a string": ("recurrent_gemma", {"eos_token_id": "1"}, ("'eos_token_id'", "integer")),
    "recurrent_gemma: list as a string": (
        "recurrent_gemma",
        {"block_types": "recurrent"},
        ("'block_types'", "must list 'recurrent' / 'attention'"),
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIG_TYPES)
def test_build_refuses_config_field_of_the_wrong_type(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_type, changes, facts = BAD_CONFIG_TYPES[case]
    ckpt = write_random_checkpoint(tmp_path / "ckpt", TINY_CONFIGS[model_type])
    edit_config(ckpt, **changes)
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "build", ckpt, "-o", out)
    assert code == 2, stderr
    error_line(stderr, "config.json", *facts)
    assert stdout == ""
    assert_no_output(out)


def test_build_json_mode_error_is_exactly_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --json there is no progress on stderr: a failure mid-stage prints the error line alone."""
    ckpt = checkpoint(tmp_path)
    edit_tensors(ckpt, lambda t: t.pop(MISSING))
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "build", ckpt, "-o", out, "--json")
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("gemma-export: error:") and MISSING in stderr, stderr
    assert stdout == ""
    assert_no_output(out)


# ---- build: impossible options and usage errors ---------------------------------------------------------

BAD_OPTIONS = {
    "fp16": (["--precision", "fp16"], ("--precision", "'fp16'", "fp32")),
    "unknown-target": (["--target", "coreml"], ("--target", "'coreml'", "ort-cpu, onnx, tensorrt")),
    "zero tolerance": (["--tolerance", "0"], ("--tolerance", "positive")),
    "negative tolerance": (["--tolerance", "-1e-3"], ("--tolerance", "positive")),
    "nan tolerance": (["--tolerance", "nan"], ("--tolerance",)),
    "tolerance not a number": (["--tolerance", "tight"], ("--tolerance",)),
    "unknown option": (["--quantize"], ("--quantize",)),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_build_refuses_impossible_options(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options, facts = BAD_OPTIONS[case]
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "build", checkpoint(tmp_path), "-o", out, *options)
    assert code == 2, stderr
    error_line(stderr, *facts)
    assert stdout == ""
    assert_no_output(out)


@pytest.mark.parametrize(
    ("argv", "fact"),
    [
        (["build"], "'checkpoint'"),
        (["build", "ckpt"], "'--out'"),
        (["generate", "art", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["frobnicate"], "'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv: list[str], fact: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run(capsys, *argv)
    assert code == 2, stderr
    error_line(stderr, fact)


def test_no_command_shows_help_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(capsys)
    assert code == 2
    assert "build" in stdout and "generate" in stdout


# ---- build: OUT_DIR exists, --force, interruption ----------------------------------------------------------


def test_existing_out_dir_is_refused_and_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, stderr = run(capsys, "build", checkpoint(tmp_path), "-o", out)
    assert code == 2
    error_line(stderr, str(out), "exists", "--force")
    assert stdout == ""
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_force_build_keeps_the_old_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = checkpoint(tmp_path)
    edit_tensors(ckpt, lambda t: t.pop(MISSING))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run(capsys, "build", ckpt, "-o", out, "--force")
    assert code == 2
    error_line(stderr, MISSING)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["same", "parent"])
def test_force_never_replaces_the_checkpoint(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`-o CKPT --force` (or a folder holding CKPT) would delete the checkpoint when the artifact replaces it."""
    ckpt = checkpoint(tmp_path)
    before = sorted(p.name for p in ckpt.iterdir())
    out = ckpt if where == "same" else tmp_path
    code, stdout, stderr = run(capsys, "build", ckpt, "-o", out, "--force")
    assert code == 2, stderr
    error_line(stderr, "must not be or contain the checkpoint")
    assert stdout == ""
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_internal_error_is_one_line_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of ours (not bad input): exit 3, still one line, even when the exception's text is not."""
    from gemma_export.checkpoint import load

    def crash(checkpoint_dir: Path, **options: object) -> None:
        raise ValueError("first line\n  second line")

    monkeypatch.delenv("GEMMA_EXPORT_DEBUG", raising=False)
    monkeypatch.setattr(load, "load_model", crash)
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "build", checkpoint(tmp_path), "-o", out)
    assert code == 3
    error_line(
        stderr, "ValueError: first line second line", "GEMMA_EXPORT_DEBUG", prefix="gemma-export: internal error:"
    )
    assert_no_output(out)


def _tiny_proto() -> onnx.ModelProto:
    """Stands in for the traced decoder (tracing takes seconds): one input, one output, one big weight."""
    weight = numpy_helper.from_array(np.zeros(1024, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1024])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1024])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("force", [False, True], ids=["new", "force-over-existing"])
def test_interrupted_build_leaves_nothing(
    force: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the package stage writes: exit 130, the staging folder is gone, an old OUT_DIR intact."""
    monkeypatch.setattr(trace, "export_decoder", lambda model: ir.serde.deserialize_model(_tiny_proto()))
    monkeypatch.setattr(optimize, "optimize", lambda proto: proto)
    monkeypatch.setattr(optimize, "attach_functions", lambda proto, opset: proto)
    written: list[Path] = []
    real_write_model = package.write_model

    def write_then_interrupt(model: ir.Model, folder: Path, progress: object = None) -> None:
        real_write_model(model, folder)
        written.extend(sorted(folder.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "write_model", write_then_interrupt)
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    code, stdout, stderr = run(capsys, "build", checkpoint(tmp_path), "-o", out, *(["--force"] if force else []))
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == "gemma-export: interrupted"
    assert stdout == ""
    assert [p.name for p in written] == [package.MODEL_FILE, package.WEIGHTS_FILE]  # it was interrupted mid-way
    assert not written[0].parent.exists()
    if force:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    else:
        assert_no_output(out)


# ---- the real entry point ------------------------------------------------------------------------------


def test_console_script_maps_errors_to_exit_codes(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    script = shutil.which("gemma-export", path=str(bin_dir)) or shutil.which(
        "gemma-export", path=str(Path(sys.prefix) / "bin")
    )
    assert script, f"gemma-export is not installed in {bin_dir}"
    out = tmp_path / "out"
    proc = subprocess.run(
        [script, "build", str(tmp_path / "missing"), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, "missing", "does not exist")
    assert proc.stdout == ""
    assert_no_output(out)


# ---- one real artifact: --force replacement, generate and verify ------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, artifact): built with --force over a folder holding a stale file."""
    root = tmp_path_factory.mktemp("cli_errors")
    ckpt = checkpoint(root)
    out = root / "artifact"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier build")
    assert main(["build", str(ckpt), "-o", str(out), "--force", "--json"]) == 0
    return ckpt, out


def test_force_replaces_out_dir(built: tuple[Path, Path]) -> None:
    _, out = built
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names
    assert {MANIFEST, package.MODEL_FILE, package.WEIGHTS_FILE} <= names
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


LONG_PROMPT = ",".join(["5"] * MAX_LENGTH)
BAD_GENERATE = {
    "token id past the vocabulary": (["--token-ids", f"2,{VOCAB + 88}"], (str(VOCAB + 88), "outside the vocabulary")),
    "negative token id": (["--token-ids", "2,-3"], ("-3", "outside the vocabulary")),
    "token ids not integers": (["--token-ids", "2,x"], ("--token-ids", "comma-separated integers")),
    "empty token ids": (["--token-ids", ","], ("empty prompt",)),
    "prompt + new tokens past max length": (
        ["--token-ids", "2,3,4", "--max-new-tokens", str(MAX_LENGTH)],
        ("3 tokens", f"{MAX_LENGTH} new tokens", f"maximum length of {MAX_LENGTH}"),
    ),
    "prompt alone past max length": (
        ["--token-ids", LONG_PROMPT, "--max-new-tokens", "1"],
        (f"{MAX_LENGTH} tokens", f"maximum length of {MAX_LENGTH}"),
    ),
    "text prompt past max length": (
        ["--prompt", "the quick brown fox " * 300, "--max-new-tokens", "1"],
        (f"maximum length of {MAX_LENGTH}",),
    ),
    "nan temperature": (["--token-ids", "2,3", "--temperature", "nan"], ("--temperature", "nan")),
    "negative temperature": (["--token-ids", "2,3", "--temperature", "-1"], ("--temperature",)),
    "top-p of 0": (["--token-ids", "2,3", "--top-p", "0"], ("--top-p",)),
    "negative seed": (["--token-ids", "2,3", "--seed", "-1"], ("--seed", "-1")),
    "negative threads": (["--token-ids", "2,3", "--threads", "-1"], ("--threads", "-1")),
    "absurd threads": (["--token-ids", "2,3", "--threads", "100000"], ("--threads", "100000")),
    "both --prompt and --token-ids": (["--prompt", "hi", "--token-ids", "2,3"], ("--prompt", "--token-ids")),
    "neither --prompt nor --token-ids": ([], ("--prompt", "--token-ids")),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_generate_refuses_bad_prompts(case: str, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    options, facts = BAD_GENERATE[case]
    _, artifact = built
    code, stdout, stderr = run(capsys, "generate", artifact, *options)
    assert code == 2, stderr
    assert stderr.count("\n") == 1, stderr
    error_line(stderr, *facts)
    assert stdout == ""


def test_generate_refuses_a_folder_that_is_not_an_artifact(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = built
    for folder, facts in [
        (ckpt, (str(ckpt), "no manifest.json", "not a gemma-export artifact")),
        (tmp_path / "nowhere", ("nowhere", "does not exist")),
    ]:
        code, stdout, stderr = run(capsys, "generate", folder, "--token-ids", "2,3")
        assert code == 2, stderr
        assert stderr.count("\n") == 1, stderr
        error_line(stderr, *facts)
        assert stdout == ""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / MANIFEST).write_text("{not json")
    code, _, stderr = run(capsys, "generate", corrupt, "--token-ids", "2,3")
    assert code == 2
    error_line(stderr, "manifest.json", "not valid JSON")


def test_generate_works_on_the_artifact(built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The fixture is a real artifact: the refusals above are about the inputs, not a broken build."""
    _, artifact = built
    code, stdout, stderr = run(capsys, "generate", artifact, "--token-ids", "2,40,41", "--max-new-tokens", "3")
    assert code == 0, stderr
    assert len(stdout.strip().split(",")) <= 3


def test_verify_names_a_changed_file(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, artifact = built
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    code, _, stderr = run(capsys, "verify", copy)
    assert code == 0, stderr

    data = copy / package.WEIGHTS_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    code, stdout, stderr = run(capsys, "verify", copy)
    assert code == 1, stderr
    assert stderr.count("\n") == 1, stderr
    line = error_line(stderr, package.WEIGHTS_FILE, "changed")
    assert f"{package.MODEL_FILE} (" not in line  # only the file that changed is named
    assert stdout == ""

    data.unlink()
    code, _, stderr = run(capsys, "verify", copy)
    assert code == 1
    error_line(stderr, package.WEIGHTS_FILE)


def test_verify_reruns_parity_against_the_checkpoint(
    built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, artifact = built
    code, stdout, stderr = run(capsys, "verify", artifact, "--checkpoint", ckpt)
    assert code == 0, stderr
    assert "files match" in stdout and "parity" in stdout


def test_verify_refuses_a_different_checkpoint(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, artifact = built
    other = write_random_checkpoint(tmp_path / "gemma", TINY_CONFIGS["gemma"])
    code, _, stderr = run(capsys, "verify", artifact, "--checkpoint", other)
    assert code == 2, stderr
    error_line(stderr, "config differs")
