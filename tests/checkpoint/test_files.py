"""Tests of the checkpoint reader: layouts, corrupt files refused with one-line `BadInput`, name mapping."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gemma_export.checkpoint.files import DTYPE_BYTES, read_tensors, select_weights
from gemma_export.config.model_config import WEIGHT_PREFIXES
from gemma_export.errors import BadInput


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: bytes, data: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _index(root: Path, weight_map: dict[str, str]) -> None:
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _one_line_bad_input(root: Path, *fragments: str) -> str:
    with pytest.raises(BadInput) as info:
        read_tensors(root)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- read_tensors: layouts --------------------------------------------------------------------------


def test_single_file_keeps_stored_dtypes(tmp_path: Path) -> None:
    stored = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
        "c": torch.zeros(2, 2, dtype=torch.float16),
    }
    _save(tmp_path / "model.safetensors", stored)
    got = read_tensors(tmp_path)
    assert set(got) == set(stored)
    for name, tensor in stored.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name], tensor)


def test_sharded_with_index(tmp_path: Path) -> None:
    _save(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2), "b": torch.zeros(3)})
    _save(tmp_path / "model-00002-of-00002.safetensors", {"c": torch.full((2, 2), 7.0)})
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                      "c": "model-00002-of-00002.safetensors"})  # fmt: skip
    got = read_tensors(tmp_path)
    assert sorted(got) == ["a", "b", "c"]
    assert torch.equal(got["c"], torch.full((2, 2), 7.0))


def test_missing_shard(tmp_path: Path) -> None:
    _save(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    _one_line_bad_input(tmp_path, "model-00002-of-00002.safetensors", "missing")


def test_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    _save(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    _save(tmp_path / "model-00002-of-00002.safetensors", {"c": torch.ones(2)})
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                      "c": "model-00002-of-00002.safetensors"})  # fmt: skip
    _one_line_bad_input(tmp_path, "'b'", "model-00001-of-00002.safetensors", "does not contain")


def test_index_shard_name_outside_directory(tmp_path: Path) -> None:
    _index(tmp_path, {"a": "../elsewhere.safetensors"})
    _one_line_bad_input(tmp_path, "../elsewhere.safetensors")


def test_duplicate_across_shards(tmp_path: Path) -> None:
    _save(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    _save(tmp_path / "model-00002-of-00002.safetensors", {"a": torch.ones(2), "b": torch.ones(1)})
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    _one_line_bad_input(tmp_path, "'a'", "twice", "model-00001-of-00002", "model-00002-of-00002")


def test_pickle_only_directory_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _one_line_bad_input(tmp_path, "pytorch_model.bin", "pickle", "safetensors")


def test_empty_directory(tmp_path: Path) -> None:
    _one_line_bad_input(tmp_path, f"no model.safetensors or model.safetensors.index.json in {tmp_path}")


def test_missing_directory(tmp_path: Path) -> None:
    _one_line_bad_input(tmp_path / "nope", "does not exist")


# ---- read_tensors: corrupt files --------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    tensors = {"w": torch.ones(4, 4), "v": torch.ones(8, dtype=torch.bfloat16)}
    return _save(tmp_path / "model.safetensors", tensors)


def test_truncated_file(good_file: Path) -> None:
    good_file.write_bytes(good_file.read_bytes()[:-5])
    _one_line_bad_input(good_file.parent, str(good_file), "truncated or corrupt", "past end of file")


def test_file_shorter_than_length_prefix(good_file: Path) -> None:
    good_file.write_bytes(b"\x01\x02\x03")
    _one_line_bad_input(good_file.parent, "truncated or corrupt", "3 bytes")


def test_corrupted_header_length(good_file: Path) -> None:
    header, data = _split(good_file)
    _write(good_file, json.dumps(header).encode(), data, length=123456)
    _one_line_bad_input(good_file.parent, "truncated or corrupt", "header length 123456 past end of file")


def test_header_not_json(good_file: Path) -> None:
    _, data = _split(good_file)
    _write(good_file, b"{not json at all", data)
    _one_line_bad_input(good_file.parent, "truncated or corrupt", "not JSON")


def test_header_deeply_nested_json(good_file: Path) -> None:
    _write(good_file, b"[" * 100_000 + b"]" * 100_000, b"")
    _one_line_bad_input(good_file.parent, "truncated or corrupt")


def test_header_not_an_object(good_file: Path) -> None:
    _write(good_file, b"[1, 2]", b"")
    _one_line_bad_input(good_file.parent, "expected an object")


def test_offsets_past_end(good_file: Path) -> None:
    header, data = _split(good_file)
    header["w"]["data_offsets"] = [len(data) - 8, len(data) + 56]
    _write(good_file, json.dumps(header).encode(), data)
    _one_line_bad_input(good_file.parent, "'w'", "past end of file")


def test_span_does_not_match_shape(good_file: Path) -> None:
    header, data = _split(good_file)
    header["w"]["shape"] = [4, 5]
    _write(good_file, json.dumps(header).encode(), data)
    _one_line_bad_input(good_file.parent, "'w'", "[4, 5]")


def test_unsupported_dtype(good_file: Path) -> None:
    header, data = _split(good_file)
    header["w"]["dtype"] = "F4"
    _write(good_file, json.dumps(header).encode(), data)
    _one_line_bad_input(good_file.parent, "'w'", "unsupported dtype 'F4'")


def test_overlapping_tensors_rejected_by_safetensors(good_file: Path) -> None:
    """Spans that pass the cheap checks but overlap are refused by the library; still a BadInput."""
    header, data = _split(good_file)
    begin = header["w"]["data_offsets"][0]
    header["v"]["data_offsets"] = [begin, begin + 16]
    _write(good_file, json.dumps(header).encode(), data)
    _one_line_bad_input(good_file.parent, "truncated or corrupt")


# ---- read_tensors: fuzzed headers never escape as anything but BadInput ----------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _plausible_header(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Headers close to valid (right keys, mostly consistent spans) so the fuzzing reaches safetensors."""
    data = draw(st.binary(max_size=64))
    header: dict = {}
    if draw(st.booleans()):
        values = st.text(max_size=4) | st.integers()
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), values, max_size=2))
    cursor = 0
    for name in draw(st.lists(st.text(min_size=1, max_size=4), max_size=4, unique=True)):
        dtype = draw(st.sampled_from([*DTYPE_BYTES, "F4", "X"]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = DTYPE_BYTES.get(dtype, 1)
        for dim in shape:
            nbytes *= dim
        begin = draw(st.sampled_from([cursor, 0, cursor + 1]))
        end = draw(st.sampled_from([begin + nbytes, begin + nbytes + 1, len(data)]))
        cursor = end
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    return json.dumps(header).encode(), data


def _reads_or_refuses(header: bytes, data: bytes, length: int | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp) / "model.safetensors", header, data, length)
        try:
            read_tensors(Path(tmp))
        except BadInput as e:
            assert "\n" not in str(e)


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=64), st.binary(max_size=32), st.none() | st.integers(0, 2**64 - 1))
def test_fuzz_random_header_bytes(header: bytes, data: bytes, length: int | None) -> None:
    _reads_or_refuses(header, data, length)


@_FUZZ
@given(_json, st.binary(max_size=32))
def test_fuzz_random_json_header(header: object, data: bytes) -> None:
    _reads_or_refuses(json.dumps(header).encode(), data)


@_FUZZ
@given(_plausible_header())
def test_fuzz_plausible_header(header_and_data: tuple[bytes, bytes]) -> None:
    _reads_or_refuses(*header_and_data)


# ---- read_tensors: fuzzed sharded indexes (two real shards beside the index) -------------------------------

_SHARDS = {"model-00001-of-00002.safetensors": ("a", "b"), "model-00002-of-00002.safetensors": ("c",)}
_SHARD_NAMES = st.sampled_from(
    [*_SHARDS, "model-00003-of-00002.safetensors", "model.safetensors.index.json", "sub", "config.json",
     "../model-00001-of-00002.safetensors", "sub/x.safetensors", "/etc/passwd", "", ".", ".."]
) | st.text(max_size=6) | _json  # fmt: skip


@st.composite
def _fuzzed_index(draw: st.DrawFn) -> bytes:
    """Mostly plausible: a weight_map of known, unknown and odd tensor names to real, missing, escaping or
    non-string shards; sometimes any JSON, sometimes bytes that are not JSON."""
    kind = draw(st.sampled_from(["plausible", "plausible", "plausible", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    names = st.sampled_from(["a", "b", "c", "d", "__metadata__"]) | st.text(max_size=4)
    weight_map = draw(st.dictionaries(names, _SHARD_NAMES, max_size=5))
    extra = draw(st.dictionaries(st.sampled_from(["metadata", "weight_map_", "total_size"]), _json, max_size=2))
    return json.dumps({**extra, "weight_map": weight_map}).encode()


def _index_reads_or_refuses(index: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for shard, names in _SHARDS.items():
            _save(root / shard, {name: torch.ones(2) for name in names})
        (root / "sub").mkdir()
        (root / "config.json").write_text("{}")
        (root / "model.safetensors.index.json").write_bytes(index)
        try:
            got = read_tensors(root)
        except BadInput as e:
            assert "\n" not in str(e)
        else:  # accepted: every mapped name was where the index said, and only the shards it named were read
            weight_map = json.loads(index)["weight_map"]
            assert set(weight_map) <= set(got)
            assert set(got) == {n for shard in set(weight_map.values()) for n in _SHARDS[shard]}


@_FUZZ
@given(_fuzzed_index())
def test_fuzz_sharded_index(index: bytes) -> None:
    _index_reads_or_refuses(index)


# ---- select_weights ---------------------------------------------------------------------------------

EXPECTED: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
    "embed_tokens.weight": ((8, 4), None),
    "layers.0.self_attn.q_proj.weight": ((4, 4), None),
    "norm.weight": ((4,), torch.float32),
}


def _checkpoint(prefix: str, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {prefix + name: torch.zeros(shape) for name, (shape, _) in EXPECTED.items()}
    tensors[prefix + "embed_tokens.weight"] = tensors[prefix + "embed_tokens.weight"].bfloat16()
    return {**tensors, **extra}


def _select_fails(tensors: dict[str, torch.Tensor], *fragments: str, ignore: tuple[str, ...] = ()) -> str:
    with pytest.raises(BadInput) as info:
        select_weights(tensors, EXPECTED, WEIGHT_PREFIXES, "ckpt/model.safetensors", ignore)
    message = str(info.value)
    assert "\n" not in message
    assert "ckpt/model.safetensors" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("prefix", WEIGHT_PREFIXES)
def test_select_detects_each_prefix(prefix: str) -> None:
    tensors = _checkpoint(prefix)
    got = select_weights(tensors, EXPECTED, WEIGHT_PREFIXES, "ckpt")
    assert set(got) == set(EXPECTED)
    assert got["norm.weight"] is tensors[prefix + "norm.weight"]
    assert got["embed_tokens.weight"].dtype == torch.bfloat16  # any floating dtype when None


def test_select_no_embedding_under_any_prefix() -> None:
    _select_fails({"decoder.embed_tokens.weight": torch.zeros(8, 4)}, "embed_tokens.weight", "decoder.")


def test_select_missing_tensor_named() -> None:
    tensors = _checkpoint("model.")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    _select_fails(tensors, "missing", "'model.layers.0.self_attn.q_proj.weight'")


def test_select_wrong_shape_shows_both() -> None:
    tensors = _checkpoint("model.", **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 5)})
    _select_fails(tensors, "'model.layers.0.self_attn.q_proj.weight'", "expected [4, 4], found [4, 5]")


def test_select_not_floating_point() -> None:
    tensors = _checkpoint("model.", **{"model.norm.weight": torch.zeros(4, dtype=torch.int32)})
    _select_fails(tensors, "'model.norm.weight'", "floating point")


def test_select_wrong_required_dtype() -> None:
    tensors = _checkpoint("model.", **{"model.norm.weight": torch.zeros(4, dtype=torch.float16)})
    _select_fails(tensors, "'model.norm.weight'", "torch.float16", "torch.float32")


def test_select_unexpected_tensors_reported() -> None:
    extra = {f"model.layers.9.mlp.w{i}": torch.zeros(1) for i in range(7)}
    message = _select_fails(_checkpoint("model.", **extra), "7 unexpected", "mlp.w0'", "mlp.w4'", "2 more")
    assert "w5" not in message and "w6" not in message


@pytest.mark.parametrize(
    ("prefix", "extra"),
    [
        ("language_model.model.", ["vision_tower.vision_model.x", "multi_modal_projector.p", "lm_head.w"]),
        ("model.language_model.", ["model.vision_tower.vision_model.x", "model.multi_modal_projector.p"]),
        ("model.", ["lm_head.weight"]),
    ],
)
def test_select_ignored_prefixes_ignored(prefix: str, extra: list[str]) -> None:
    tensors = _checkpoint(prefix, **{name: torch.zeros(1) for name in extra})
    ignore = ("vision_tower.", "multi_modal_projector.", "lm_head.")
    assert set(select_weights(tensors, EXPECTED, WEIGHT_PREFIXES, "ckpt", ignore)) == set(EXPECTED)
    _select_fails(tensors, "unexpected", extra[0])  # not ignored unless asked


def test_select_end_to_end_from_disk(tmp_path: Path) -> None:
    _save(tmp_path / "model.safetensors", {k: v.contiguous() for k, v in _checkpoint("model.").items()})
    got = select_weights(read_tensors(tmp_path), EXPECTED, WEIGHT_PREFIXES, str(tmp_path))
    assert got["layers.0.self_attn.q_proj.weight"].shape == (4, 4)
