"""Fixtures of the cross-language tests: the C++ and Java runtimes (built once per session) and an artifact of
every kind the runtimes drive (the session's Gemma 1/2/3 artifacts, plus RecurrentGemma, a windowed cache and
EmbeddingGemma, built here once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import native
from tests.support.artifacts import built_once, shared_artifact

# kind -> (model type, cache layout; None = the model's own): every state contract the runtimes drive (a full
# cache in shared buffers, a windowed cache, RecurrentGemma's state)
DECODERS = {
    "gemma": ("gemma", None),
    "gemma2": ("gemma2", None),
    "gemma3_text": ("gemma3_text", None),
    "gemma3_text-windowed": ("gemma3_text", "windowed"),
    "recurrent_gemma": ("recurrent_gemma", None),
}


@pytest.fixture(scope="session")
def cpp_runtime() -> native.Native:
    return native.build()


def _build(checkpoint: Path, out: Path, **options) -> Path:
    from gemma_export.pipeline.build import BuildOptions, build
    from gemma_export.pipeline.progress import Stages

    build(checkpoint, out, BuildOptions(**options), Stages(quiet=True))
    return out


def _decoder(kind: str, artifacts: dict[str, Path], checkpoints: dict[str, Path], tmp_path_factory) -> Path:
    """Built once per run (tests/support/artifacts.py); the Gemma 1/2/3 full-cache ones are conftest's shared
    artifacts, the windowed one is tests/targets/test_ort_cpu.py's `lowered_windowed`."""
    model_type, layout = DECODERS[kind]
    if kind not in artifacts:
        if model_type == "recurrent_gemma":
            from gemma_export.dev.random_checkpoint import TINY_CONFIGS, write_random_checkpoint

            checkpoint = write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / kind, TINY_CONFIGS[model_type])
            artifacts[kind] = _build(checkpoint, tmp_path_factory.mktemp("artifacts") / kind)
        elif layout is None:
            artifacts[kind] = shared_artifact(model_type, artifacts, checkpoints, tmp_path_factory)
        else:
            artifacts[kind] = built_once(tmp_path_factory, kind, checkpoints[model_type], cache_layout=layout)
    return artifacts[kind]


@pytest.fixture(scope="session", params=sorted(DECODERS))
def decoder_artifact(request, artifacts, checkpoints, tmp_path_factory) -> tuple[str, Path]:
    """(kind, artifact folder), every kind in DECODERS."""
    return request.param, _decoder(request.param, artifacts, checkpoints, tmp_path_factory)


@pytest.fixture(scope="session")
def gemma3_artifact(artifacts, checkpoints, tmp_path_factory) -> Path:
    """One decoder, for what does not depend on the model (bad inputs)."""
    return _decoder("gemma3_text", artifacts, checkpoints, tmp_path_factory)


@pytest.fixture(scope="session")
def embedding_artifact(tmp_path_factory) -> Path:
    from gemma_export.dev.random_checkpoint import TINY_CONFIGS, write_random_embedding_folder

    config = {**TINY_CONFIGS["gemma3_text"], "use_bidirectional_attention": True}
    folder = write_random_embedding_folder(tmp_path_factory.mktemp("st") / "embedding", config, dense=(256,))
    return _build(folder, tmp_path_factory.mktemp("artifacts") / "embedding")


@pytest.fixture(scope="session")
def paligemma_artifact(tmp_path_factory) -> Path:
    """The tiny PaliGemma (tests/support/vision.py), built once per session."""
    from tests.support.vision import save_paligemma_checkpoint

    checkpoint = save_paligemma_checkpoint(tmp_path_factory.mktemp("checkpoints") / "paligemma")
    return _build(checkpoint, tmp_path_factory.mktemp("artifacts") / "paligemma")
