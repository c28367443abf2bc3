"""Tiny checkpoints and artifacts made once per test run, shared by every test (and every pytest-xdist worker).

`make test` runs `pytest -n 2 --dist loadfile`: each worker has its own session, so a session fixture alone
builds the shared tiny artifacts once per worker. Made here, they are built once per run: the first worker to
ask builds under a lock, the other waits for it and reuses the folder. A folder appears only complete (it is
made under another name and renamed), and tests read these folders, never write into them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder `name` (e.g. "artifacts/gemma") under this run's shared temporary folder, `make(folder)`
    run by the first test to ask for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a folder of the run's
        root = root.parent
    final = root / "shared" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.with_name(final.name + ".lock")):
        if not final.exists():
            partial = final.parent / ".partial" / final.name  # the same name: nothing built differs
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(exist_ok=True)
            make(partial)
            partial.rename(final)
    return final


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, checkpoint: Path, **options: object) -> Path:
    """The artifact `name` (e.g. "gemma3_text-windowed"): `checkpoint` built with `BuildOptions(**options)`,
    once per run; every test asking for the same name must mean the same checkpoint and options."""
    from gemma_export.pipeline.build import BuildOptions, build
    from gemma_export.pipeline.progress import Stages

    make = lambda out: build(checkpoint, out, BuildOptions(**options), Stages(quiet=True))  # noqa: E731
    return made_once(tmp_path_factory, f"artifacts/{name}", make)


def shared_artifact(
    model_type: str, artifacts: dict[str, Path], checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The run's default build (`BuildOptions()`) of `model_type`'s checkpoint (conftest's `checkpoints`), built
    on first use. A test that needs that build for one model type (not parametrized over all) takes it here
    rather than building its own copy."""
    if model_type not in artifacts:
        artifacts[model_type] = built_once(tmp_path_factory, model_type, checkpoints[model_type])
    return artifacts[model_type]
