"""Shared fixtures. Docker-marked tests need a Docker engine: without one they are skipped on a
developer machine and fail under CI (CI=true), where .ci/run must have started one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import ROOT, invoke, output, sets


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("docker") for item in items):
        return
    from finetune.host import containers

    try:
        containers.client()
    except containers.ContainerError as e:
        if os.environ.get("CI"):
            raise pytest.UsageError(f"CI needs a Docker engine for the docker-marked tests: {e}") from e
        skip = pytest.mark.skip(reason=f"no Docker engine: {e}")
        for item in items:
            if item.get_closest_marker("docker"):
                item.add_marker(skip)


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def trained_run() -> str:
    """The offline default, trained for the convert, serve and cache tests (artifacts/test-pipeline); the
    stage cache makes this a no-op while the stage's inputs are unchanged."""
    run = "test-pipeline"
    done = invoke("train", *sets(run))
    assert done.returncode == 0, output(done)
    return run
