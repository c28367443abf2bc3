"""Pickled weights: refused unless `--allow-pickle`, and then read only by `torch.load(weights_only=True)`.

A checkpoint in the layout transformers 4 wrote with `save_pretrained(safe_serialization=False)` (transformers 5
ignores that flag and always writes safetensors, so the fixture writes the pickle as transformers 4 did, and
transformers 5 itself checks that it loads) builds and passes parity with `--allow-pickle`, once for this module.
A pickle whose unpickling would run code (`__reduce__` -> os.system / exec) is refused with exit 2, with or
without the flag, and the marker file its payload would create is never created; an unrestricted load of the
same file does create it, so the payload is live.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gemma_export.checkpoint.files import PICKLE_FILE, PICKLE_INDEX_FILE, read_tensors
from gemma_export.dev.random_checkpoint import write_tokenizer
from gemma_export.errors import BadInput
from tests.support.checkpoints import hf_config, randomize
from tests.support.cli import assert_no_output, error_line, run

MODEL_TYPE = "gemma"
LAYERS = 1  # the smallest decoder: the build is what this module pays for


# ---- checkpoints in transformers' pickle layouts ---------------------------------------------------------


def _hf_model():
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(hf_config(MODEL_TYPE, num_hidden_layers=LAYERS)).eval()
    randomize(model)
    return model


def save_pickled(model, out: Path, shards: int = 1) -> Path:
    """What transformers 4's `save_pretrained(safe_serialization=False)` wrote: config, and the state dict
    (tied lm_head included) via torch.save as `pytorch_model.bin`, or as shards plus `pytorch_model.bin.index.json`."""
    model.save_pretrained(out)  # config.json, generation_config.json (and safetensors, removed below)
    for f in out.glob("*.safetensors*"):
        f.unlink()
    write_tokenizer(out)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, out / PICKLE_FILE)
        return out
    names = list(state)
    weight_map = {}
    for k in range(shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, out / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (out / PICKLE_INDEX_FILE).write_text(json.dumps(index, indent=2))
    return out


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"single": ckpt, "sharded": ckpt} of the same model; transformers itself loads both."""
    import transformers

    root = tmp_path_factory.mktemp("pickled")
    model = _hf_model()
    out = {"single": save_pickled(model, root / "single"), "sharded": save_pickled(model, root / "sharded", 2)}
    ids = torch.tensor([[2, 40, 41, 42]])
    with torch.no_grad():
        want = model(ids).logits
        for ckpt in out.values():
            again = transformers.AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=False).eval()
            torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)
    return out


@pytest.fixture(scope="module")
def built(pickled: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one build of this module: the single-file pickle, with --allow-pickle (parity gate included)."""
    out = tmp_path_factory.mktemp("pickled_artifact") / "artifact"
    assert main_ok("build", pickled["single"], "-o", out, "--allow-pickle", "--json")
    return out


def main_ok(*argv: object) -> bool:
    from gemma_export.cli.main import main

    return main([str(a) for a in argv]) == 0


# ---- --allow-pickle: builds, verifies; refused without it ----------------------------------------------


def test_pickled_checkpoint_builds_and_passes_parity(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    assert manifest["model"]["config"]["num_hidden_layers"] == LAYERS


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_verify_reruns_parity_against_pickled_weights(
    layout: str, built: Path, pickled: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, stderr = run(capsys, "verify", built, "--checkpoint", pickled[layout], "--allow-pickle")
    assert code == 0, stderr
    assert "parity" in stdout


def _as_ckpt(ckpt: Path) -> None:
    (ckpt / PICKLE_FILE).rename(ckpt / "model.ckpt")


def _as_pt(ckpt: Path) -> None:
    (ckpt / PICKLE_FILE).rename(ckpt / "weights.pt")


REFUSED_LAYOUTS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "pytorch_model.bin": ("single", lambda c: None, PICKLE_FILE),
    "sharded pytorch_model.bin.index.json": ("sharded", lambda c: None, PICKLE_INDEX_FILE),
    "lightning-style .ckpt": ("single", _as_ckpt, "model.ckpt"),
    ".pt": ("single", _as_pt, "weights.pt"),
}


@pytest.mark.parametrize("case", REFUSED_LAYOUTS)
@pytest.mark.parametrize("command", ["build", "verify"])
def test_pickle_refused_without_allow_pickle(
    case: str, command: str, pickled: dict[str, Path], built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout, rename, named = REFUSED_LAYOUTS[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pickled[layout], ckpt)
    rename(ckpt)
    out = tmp_path / "out"
    argv = ["build", ckpt, "-o", out] if command == "build" else ["verify", built, "--checkpoint", ckpt]
    code, stdout, stderr = run(capsys, *argv)
    assert code == 2, stderr
    error_line(stderr, named, "refused", "arbitrary code", "--allow-pickle", "safetensors")
    assert stdout == ""
    assert_no_output(out)


# ---- malicious pickles: refused even with --allow-pickle, the payload never runs ---------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _torch_zip(path: Path, payload: object) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "model.norm.weight": payload}, path)


def _torch_legacy(path: Path, payload: object) -> None:
    torch.save({"model.norm.weight": payload}, path, _use_new_zipfile_serialization=False)


def _raw_pickle(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps({"model.norm.weight": payload}, protocol=2))


def _lightning(path: Path, payload: object) -> None:
    torch.save({"state_dict": {"model.norm.weight": torch.zeros(2)}, "hyper_parameters": payload}, path)


PAYLOADS = {"os.system": _System, "exec": _Exec}
WRITERS = {
    "torch.save zip": (_torch_zip, PICKLE_FILE),
    "torch.save legacy": (_torch_legacy, PICKLE_FILE),
    "raw pickle": (_raw_pickle, PICKLE_FILE),
    "lightning .ckpt": (_lightning, "last.ckpt"),
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_pickle_is_refused_and_never_runs(
    writer: str,
    payload: str,
    pickled: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An environment asking torch for unrestricted loads must not matter: weights_only=True is explicit.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    write, name = WRITERS[writer]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pickled["single"], ckpt)
    (ckpt / PICKLE_FILE).unlink()
    marker = tmp_path / "PWNED"
    write(ckpt / name, PAYLOADS[payload](marker))
    out = tmp_path / "out"

    for extra in ([], ["--allow-pickle"]):
        code, stdout, stderr = run(capsys, "build", ckpt, "-o", out, *extra)
        assert code == 2, stderr
        facts = ("holds objects other than tensors", "weights_only=True") if extra else ("--allow-pickle",)
        error_line(stderr, name, *facts)
        assert stdout == ""
        assert not marker.exists(), "the pickle's payload ran"
        assert_no_output(out)

    # The payload is live: an unrestricted load (what --allow-pickle must never do) runs it.
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if writer == "raw pickle":
        pickle.loads((ckpt / name).read_bytes())
    else:
        torch.load(ckpt / name, weights_only=False)
    assert marker.exists()


def test_safetensors_wins_over_a_pickle(tmp_path: Path) -> None:
    """Both present: the pickle is not even opened, with or without allow_pickle."""
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    marker = tmp_path / "PWNED"
    _torch_zip(tmp_path / PICKLE_FILE, _System(marker))
    for allow in (False, True):
        assert list(read_tensors(tmp_path, allow_pickle=allow)) == ["a"]
    assert not marker.exists()


# ---- what a pickle may hold --------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip (memory-mapped)", "legacy format"])
def test_reads_both_torch_save_formats(legacy: bool, tmp_path: Path) -> None:
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / PICKLE_FILE, _use_new_zipfile_serialization=not legacy)
    got = read_tensors(tmp_path, allow_pickle=True)
    assert set(got) == set(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


def test_training_checkpoint_state_dict_is_unwrapped(tmp_path: Path) -> None:
    state = {"model.norm.weight": torch.ones(3)}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, tmp_path / "last.ckpt")
    got = read_tensors(tmp_path, allow_pickle=True)
    assert list(got) == ["model.norm.weight"] and torch.equal(got["model.norm.weight"], torch.ones(3))


def test_parameters_are_plain_tensors(tmp_path: Path) -> None:
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, tmp_path / PICKLE_FILE)
    got = read_tensors(tmp_path, allow_pickle=True)["w"]
    assert type(got) is torch.Tensor and not got.requires_grad


def _bad(root: Path, *fragments: str) -> str:
    with pytest.raises(BadInput) as info:
        read_tensors(root, allow_pickle=True)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    ("content", "facts"),
    [
        (torch.ones(3), ("holds a Tensor", "expected a dict of tensor name -> tensor")),
        ([torch.ones(3)], ("holds a list",)),
        ({"a": torch.ones(2), "b": [1, 2]}, ("entry 'b' holds a list",)),
        ({"a": torch.ones(2), 7: torch.ones(2)}, ("entry 7",)),
        ({"state_dict": {"a": 1.5}}, ("entry 'a' holds a float",)),
        ({"a": torch.ones(2).to_sparse()}, ("'a'", "layout", "dense")),
    ],
    ids=["bare tensor", "list", "non-tensor value", "non-string key", "nested non-tensor", "sparse tensor"],
)
def test_not_a_flat_dict_of_tensors(content: object, facts: tuple[str, ...], tmp_path: Path) -> None:
    torch.save(content, tmp_path / PICKLE_FILE)
    _bad(tmp_path, PICKLE_FILE, *facts)


def test_several_pickles_without_an_index_are_ambiguous(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(1)}, tmp_path / "model.ckpt")
    torch.save({"b": torch.ones(1)}, tmp_path / "optimizer.pt")
    _bad(tmp_path, "model.ckpt", "optimizer.pt", PICKLE_INDEX_FILE)


def test_sharded_pickle_with_a_missing_shard(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(1)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / PICKLE_INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    _bad(tmp_path, PICKLE_INDEX_FILE, "pytorch_model-00002-of-00002.bin", "missing")


def test_pickle_refusal_is_one_line_without_torch_warnings(tmp_path: Path) -> None:
    """torch warns about a protocol-4 pickle on stderr; that would break the one-line promise."""
    (tmp_path / PICKLE_FILE).write_bytes(pickle.dumps({"a": _System(tmp_path / "PWNED")}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bad(tmp_path, "holds objects other than tensors")
    assert caught == []
    assert not (tmp_path / "PWNED").exists()


# ---- corrupt pickles, fuzzed: only BadInput escapes ----------------------------------------------------------


def _valid_files() -> list[bytes]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for legacy in (False, True):
            path = Path(tmp) / "f.bin"
            torch.save({"w": torch.arange(4.0), "v": torch.ones(2, dtype=torch.float16)}, path,
                       _use_new_zipfile_serialization=not legacy)  # fmt: skip
            out.append(path.read_bytes())
    return out


VALID = _valid_files()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _reads_or_refuses(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / PICKLE_FILE).write_bytes(data)
        try:
            read_tensors(Path(tmp), allow_pickle=True)
        except BadInput as e:
            assert "\n" not in str(e)


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_pickle_bytes(data: bytes) -> None:
    _reads_or_refuses(data)


@_FUZZ
@given(_mutated())
def test_fuzz_mutated_torch_save_files(data: bytes) -> None:
    _reads_or_refuses(data)
