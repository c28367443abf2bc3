"""The manifest as a contract: typed, strict, versioned, and documented by the table generated from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gemma_export import manifest
from gemma_export.errors import BadInput
from gemma_export.manifest import FORMAT, MANIFEST, Manifest
from tests.support import ROOT


def written(tmp_path: Path, data: dict) -> Path:
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    return tmp_path


@pytest.fixture(scope="module")
def document(artifact) -> dict:
    """A manifest as the build wrote it (the shared tiny Gemma artifact)."""
    return json.loads((artifact / MANIFEST).read_text())


def test_the_written_manifest_reads_back_as_the_same_document(document, artifact) -> None:
    read = Manifest.read(artifact)
    assert read.format == FORMAT
    assert read.to_json() == document  # nothing dropped, nothing invented
    assert read.build.providers == ["CPUExecutionProvider"]
    assert read.parity.metric == "relative_logit_error" and read.parity.passed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["build"].pop("max_length"), "build.max_length: missing field"),
        (lambda d: d["build"].update(max_lenght=1), "build.max_lenght: unknown field"),
        (lambda d: d.update(extra={}), "extra: unknown field"),
        (lambda d: d["state"][0].pop("dtype"), "state.0.dtype: missing field"),
        (lambda d: d["files"]["model"].update(bytes="many"), "files.model.bytes: Input should be a valid integer"),
        (lambda d: d["parity"].pop("tolerance"), "parity.relative_logit_error.tolerance: missing field"),
        (lambda d: d["parity"].update(metric="vibes"), "parity: Input tag 'vibes' found using 'metric'"),
        (lambda d: d["model"]["config"].pop("vocab_size"), "model.config.vocab_size: missing field"),
        (lambda d: d.pop("parity"), "parity: missing field"),
    ],
)
def test_a_wrong_field_is_one_line_naming_it(document, tmp_path, edit, message) -> None:
    data = json.loads(json.dumps(document))
    edit(data)
    with pytest.raises(BadInput) as e:
        Manifest.read(written(tmp_path, data))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(tmp_path / MANIFEST))


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (f"{manifest.FORMAT_PREFIX}{manifest.VERSION[0]}.{manifest.VERSION[1] + 1}", "newer gemma-export"),
        (f"{manifest.FORMAT_PREFIX}{manifest.VERSION[0] + 1}.0", "newer gemma-export: upgrade"),
        ("gemma-export/manifest-v1", "older gemma-export"),
        ("something-else", "unknown manifest format"),
        (None, "unknown manifest format"),
    ],
)
def test_the_format_rule(document, tmp_path, fmt, message) -> None:
    with pytest.raises(BadInput, match=message):
        Manifest.read(written(tmp_path, {**document, "format": fmt}))


def test_an_older_minor_of_the_same_major_is_read(document, tmp_path) -> None:
    major, minor = manifest.VERSION
    assert manifest.check_format(f"{manifest.FORMAT_PREFIX}{major}") == (major, 0)
    if minor:
        Manifest.read(written(tmp_path, {**document, "format": f"{manifest.FORMAT_PREFIX}{major}.{minor - 1}"}))


def test_not_an_artifact(tmp_path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        Manifest.read(tmp_path / "missing")
    with pytest.raises(BadInput, match="not a gemma-export artifact"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        Manifest.read(tmp_path)


def test_the_readme_table_is_the_schema() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- manifest-fields:start -->\n(.*?)\n<!-- manifest-fields:end -->", readme, re.S)
    assert block, "README lacks the manifest-fields block"
    assert block[1].splitlines() == manifest.field_table(), "regenerate it: python -m gemma_export.manifest"


def test_every_field_of_the_schema_is_in_the_table() -> None:
    rows = "\n".join(manifest.field_table())
    for name in Manifest.model_fields:
        assert f"| `{name}` |" in rows
    for name in manifest.BuildInfo.model_fields:
        assert f"| `build.{name}` |" in rows


def test_the_cpp_reader_knows_this_manifest_version() -> None:
    """The C++ runtime (and Java through it) refuses newer minors: it must be bumped with manifest.VERSION."""
    header = (ROOT / "cpp" / "src" / "manifest.h").read_text()
    found = re.search(r"kManifestMajor = (\d+), kManifestMinor = (\d+);", header)
    assert found and (int(found[1]), int(found[2])) == manifest.VERSION, "bump cpp/src/manifest.h with manifest.py"
