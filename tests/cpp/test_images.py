"""Image prompts in C++ (gemma-run --image) and Java against the Python client, on the tiny Gemma 3 image + text
and PaliGemma artifacts: the same JSON (greedy tokens) for a PNG and a JPEG of odd sizes, the preprocessed pixels
equal to Pillow's (the resized uint8 exactly, the normalised float32 within 1e-6), and Python's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma_export.manifest import Manifest
from gemma_export.runtime import images as python_images
from tests.support.cli import run
from tests.support.native import ERROR_PREFIX, error_message
from tests.support.vision import random_images

PROMPTS = {
    "gemma3": ["Describe <start_of_image> and compare it with <start_of_image> please", "<start_of_image> what?"],
    "paligemma": ["<image><image>cap", "<image>is"],
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """Odd sizes: a PNG, a JPEG, a PNG."""
    return random_images(tmp_path_factory.mktemp("images"), [(37, 23), (61, 90), (20, 31)], ["png", "jpg", "png"])


@pytest.fixture(scope="module", params=["gemma3", "paligemma"])
def image_artifact(request, vision_artifact, paligemma_artifact) -> tuple[str, Path]:
    return request.param, vision_artifact if request.param == "gemma3" else paligemma_artifact


def needs_images(cpp_runtime, artifact: Path, image: Path) -> None:
    done = cpp_runtime.run("pixels", artifact, "--image", image, "--out", "/dev/null")
    if "image support was not compiled in" in done.stderr:
        pytest.skip("gemma_runtime built without libpng/libjpeg (image support not compiled in)")


def test_pixels_equal_pillows(cpp_runtime, image_artifact, image_files, tmp_path) -> None:
    kind, artifact = image_artifact
    needs_images(cpp_runtime, artifact, image_files[0])
    pre = Manifest.read(artifact).vision.preprocessing.model_dump()
    height, width = pre["size"]
    for image in image_files:
        out = tmp_path / f"{image.name}.u8"
        assert_pixels_equal_pillows(cpp_runtime, artifact, [image], out)  # the resized uint8 exactly
        expected = python_images.pixel_values([python_images.load_image(image)], pre)[0]
        got = np.fromfile(f"{out}.f32", np.float32).reshape(3, height, width)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{kind} {image.name}")


def with_preprocessing(artifact: Path, folder: Path, **changes) -> Path:
    """A copy of `artifact` (links to its files) whose manifest's vision preprocessing has `changes`."""
    folder.mkdir()
    for f in artifact.iterdir():
        if f.name != "manifest.json":
            (folder / f.name).symlink_to(f)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["vision"]["preprocessing"].update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def assert_pixels_equal_pillows(cpp_runtime, artifact: Path, images: list[Path], out: Path) -> None:
    from PIL import Image

    pre = json.loads((artifact / "manifest.json").read_text())["vision"]["preprocessing"]
    height, width = pre["size"]
    filters = {v: k for k, v in python_images.RESAMPLE_NAMES.items()}
    for image in images:
        done = cpp_runtime.run("pixels", artifact, "--image", image, "--out", out)
        assert done.returncode == 0, done.stderr
        with Image.open(image) as im:
            expected = np.array(im.convert("RGB").resize((width, height), Image.Resampling(filters[pre["resample"]])))
        got = np.fromfile(out, np.uint8).reshape(height, width, 3)
        np.testing.assert_array_equal(got, expected, err_msg=f"{image.name} -> {width}x{height}")


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos", "box", "hamming"])
def test_every_resample_filter_equals_pillows(cpp_runtime, vision_artifact, image_files, tmp_path, resample) -> None:
    """The manifest's filter, each of Pillow's convolution filters, up- and downscaling."""
    needs_images(cpp_runtime, vision_artifact, image_files[0])
    copy = with_preprocessing(vision_artifact, tmp_path / "copy", resample=resample)
    assert_pixels_equal_pillows(cpp_runtime, copy, image_files, tmp_path / "px.u8")


# (width, height) -> 28x28: Pillow 13 resizes vertically first iff in_h - out_h > 2 (in_w - out_w); each pass
# rounds to uint8, so the wrong order moves ~20% of the pixels by 1. Both sides of the rule, and equality.
PASS_ORDER_SIZES = [(61, 90), (50, 100), (38, 48), (39, 48), (20, 30), (90, 61), (17, 23), (61, 120)]


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_the_resize_pass_order_is_pillows(cpp_runtime, vision_artifact, tmp_path, resample) -> None:
    images = random_images(tmp_path, PASS_ORDER_SIZES, ["png"] * len(PASS_ORDER_SIZES))
    needs_images(cpp_runtime, vision_artifact, images[0])
    copy = with_preprocessing(vision_artifact, tmp_path / "copy", resample=resample, size=[28, 28])
    assert_pixels_equal_pillows(cpp_runtime, copy, images, tmp_path / "px.u8")


def generate_args(artifact: Path, kind: str, images: list[Path]) -> list[str]:
    prompts = [a for p in PROMPTS[kind] for a in ("--prompt", p)]
    return [str(artifact), *prompts, *[a for i in images for a in ("--image", str(i))], "--max-new-tokens", "8",
            "--threads", "1", "--json"]  # fmt: skip


def test_cpp_and_java_print_what_python_prints(cpp_runtime, image_artifact, image_files, capsys) -> None:
    kind, artifact = image_artifact
    needs_images(cpp_runtime, artifact, image_files[0])
    images = image_files[:3]  # a PNG, a JPEG, a PNG: three markers in each layout
    argv = generate_args(artifact, kind, images)
    code, python_out, err = run(capsys, "generate", *argv)
    assert code == 0, err
    outputs = json.loads(python_out)["outputs"]
    assert all(o["new_ids"] for o in outputs)
    cpp = cpp_runtime.run(*argv)
    assert cpp.returncode == 0, cpp.stderr
    assert cpp.stdout == python_out, kind
    java = cpp_runtime.java(*argv)
    assert java.returncode == 0, java.stderr
    assert java.stdout == python_out, kind


def bad_inputs(artifact: Path, kind: str, image: Path, tmp_path: Path) -> dict[str, list[str]]:
    marker = "<start_of_image>" if kind == "gemma3" else "<image>"
    text = tmp_path / "not_an_image.png"
    text.write_text("hello")
    return {
        "no marker": [str(artifact), "--prompt", "no marker here", "--image", str(image)],
        "more markers than images": [str(artifact), "--prompt", f"{marker} and {marker}", "--image", str(image)],
        "not an image": [str(artifact), "--prompt", f"a {marker}", "--image", str(text)],
        "no such file": [str(artifact), "--prompt", f"a {marker}", "--image", str(tmp_path / "missing.png")],
        "token ids": [str(artifact), "--token-ids", "2,3", "--image", str(image)],
    }


def test_bad_image_inputs_get_pythons_line(cpp_runtime, image_artifact, image_files, tmp_path, capsys) -> None:
    kind, artifact = image_artifact
    needs_images(cpp_runtime, artifact, image_files[0])
    for case, argv in bad_inputs(artifact, kind, image_files[0], tmp_path).items():
        code, _, err = run(capsys, "generate", *argv)
        assert code == 2, (case, err)
        expected = error_message(err, "gemma-export: error: ")
        for done, who in ((cpp_runtime.run(*argv), "C++"), (cpp_runtime.java(*argv), "Java")):
            assert done.returncode == 2, (case, who, done.stderr)
            assert error_message(done.stderr, ERROR_PREFIX) == expected, (case, who)


def test_an_image_on_a_text_only_artifact(cpp_runtime, gemma3_artifact, image_files, capsys) -> None:
    argv = [str(gemma3_artifact), "--prompt", "<start_of_image>", "--image", str(image_files[0])]
    code, _, err = run(capsys, "generate", *argv)
    assert code == 2
    expected = error_message(err, "gemma-export: error: ")
    done = cpp_runtime.run(*argv)
    assert done.returncode == 2 and error_message(done.stderr, ERROR_PREFIX) == expected, done.stderr
