"""Shared fixtures: tiny random-weight checkpoints written by transformers itself (the oracle), and the
artifacts built from them (built once per test run, and shared by the pytest-xdist workers: an export takes
seconds, tens under load)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.support.artifacts import made_once, shared_artifact
from tests.support.checkpoints import FIXTURE_OVERRIDES, MODEL_TYPES, save_hf_checkpoint


@pytest.fixture(scope="session", params=MODEL_TYPES)
def model_type(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Written once per run, shared by the pytest-xdist workers (tests/support/artifacts.py): the artifacts
    built from them are shared too, and each records the checkpoint it was built from."""

    def make(t: str) -> Callable[[Path], Path]:
        return lambda out: save_hf_checkpoint(out, t, **FIXTURE_OVERRIDES.get(t, {}))

    return {t: made_once(tmp_path_factory, f"checkpoints/{t}", make(t)) for t in MODEL_TYPES}


@pytest.fixture(scope="session")
def checkpoint(checkpoints, model_type) -> Path:
    return checkpoints[model_type]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Built lazily, once per model type and run (tests/support/artifacts.py)."""
    return {}


@pytest.fixture(scope="session")
def artifact(artifacts, checkpoints, model_type, tmp_path_factory) -> Path:
    return shared_artifact(model_type, artifacts, checkpoints, tmp_path_factory)


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def vision_checkpoint(tmp_path_factory) -> Path:
    """A tiny `Gemma3ForConditionalGeneration` with its processor (tests/support/vision.py)."""
    from tests.support.vision import save_gemma3_vision_checkpoint

    return save_gemma3_vision_checkpoint(tmp_path_factory.mktemp("checkpoints") / "gemma3_vision")


@pytest.fixture(scope="session")
def vision_artifact(vision_checkpoint, tmp_path_factory) -> Path:
    """Its image + text artifact (--target ort-cpu, the default), built once per session."""
    from gemma_export.pipeline.build import BuildOptions, build
    from gemma_export.pipeline.progress import Stages

    out = tmp_path_factory.mktemp("artifacts") / "gemma3_vision"
    build(vision_checkpoint, out, BuildOptions(), Stages(quiet=True))
    return out


# ---- the `slow` marker: every test that builds or traces an artifact -------------------------------------

# Fixtures that trace or build (a test using one is slow, whatever module defines it).
BUILDING_FIXTURES = frozenset({
    "artifact", "artifacts", "built", "document", "real_artifacts", "perplexities", "portable_windowed",
    "lowered_windowed", "windowed", "griffin_artifact", "gguf_artifacts", "exported", "attached",
    "attached_session", "traced", "traced_file", "trace_once_per_model", "workdir", "trt_artifact", "trt_artifacts",
    "trt_bf16", "vision_artifact",
    "cpp_runtime", "decoder_artifact", "gemma3_artifact", "embedding_artifact",  # tests/cpp: compile the runtimes
})  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BUILDING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # The real-weight tier first: it is the longest file, and pytest-xdist (make test) hands whole files to its
    # workers in this order; started last, it would run alone at the end while the other worker idles.
    items.sort(key=lambda item: item.get_closest_marker("real") is None)


@pytest.fixture(autouse=True)
def _slow_if_it_builds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked slow that traces a model in its own body (every build does; a build refused for bad
    input never gets there) fails, naming the marker it lacks: the marker stays true as tests change
    (`pytest -m "not slow"` is the quick loop)."""
    if request.node.get_closest_marker("slow") is not None:
        return
    from gemma_export.pipeline import trace

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid} builds an artifact: mark it @pytest.mark.slow")

    for name in ("export_decoder", "export_encoder"):
        monkeypatch.setattr(trace, name, refuse)
