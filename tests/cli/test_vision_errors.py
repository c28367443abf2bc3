"""`gemma-export generate --image`: bad input is one line (exit 2) naming the problem; a good call works."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.support.cli import error_line, run
from tests.support.vision import random_image


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    return random_image(tmp_path_factory.mktemp("images") / "a.png", 31, 17)


def test_image_prompt_generates(capsys, vision_artifact, picture) -> None:
    code, out, _ = run(capsys, "generate", vision_artifact, "--prompt", "See <start_of_image> here",
                       "--image", picture, "--max-new-tokens", "3", "--json")  # fmt: skip
    assert code == 0
    assert len(json.loads(out)["outputs"][0]["new_ids"]) == 3


def test_prompt_without_a_marker(capsys, vision_artifact, picture) -> None:
    code, _, err = run(capsys, "generate", vision_artifact, "--prompt", "no marker", "--image", picture)
    assert code == 2
    error_line(err, "0 image marker(s)", "1 --image(s)")


def test_more_markers_than_images(capsys, vision_artifact, picture) -> None:
    prompt = "<start_of_image> and <start_of_image>"
    code, _, err = run(capsys, "generate", vision_artifact, "--prompt", prompt, "--image", picture)
    assert code == 2
    error_line(err, "2 image marker(s)", "1 --image(s)")


@pytest.mark.parametrize("content", [b"not an image at all", b""], ids=["text", "empty"])
def test_a_file_that_is_not_an_image(capsys, vision_artifact, tmp_path, content) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    code, _, err = run(capsys, "generate", vision_artifact, "--prompt", "<start_of_image>", "--image", bad)
    assert code == 2
    error_line(err, str(bad), "not a readable image")


def test_a_missing_image_file(capsys, vision_artifact, tmp_path) -> None:
    code, _, err = run(capsys, "generate", vision_artifact, "--prompt", "<start_of_image>",
                       "--image", tmp_path / "nope.png")  # fmt: skip
    assert code == 2
    error_line(err, "no such file")


def test_image_on_a_text_only_artifact(capsys, vision_artifact, picture, tmp_path) -> None:
    """The same artifact with its manifest's `vision` entry removed reads as a text-only one."""
    text_only = tmp_path / "text_only"
    shutil.copytree(vision_artifact, text_only)
    manifest = json.loads((text_only / "manifest.json").read_text())
    del manifest["vision"]
    (text_only / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "generate", text_only, "--prompt", "<start_of_image>", "--image", picture)
    assert code == 2
    error_line(err, "text-only artifact", "--image")


def test_image_with_token_ids(capsys, vision_artifact, picture) -> None:
    code, _, err = run(capsys, "generate", vision_artifact, "--token-ids", "2,3", "--image", picture)
    assert code == 2
    error_line(err, "--token-ids")
