"""Helpers the test modules share: running `./invoke` as a user would, and Python inside the train image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from finetune.host import containers

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`./invoke ARGS` from the project root, output captured."""
    return subprocess.run([str(ROOT / "invoke"), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def sets(run: str, *overrides: str) -> list[str]:
    """`--set run=RUN --set K=V ...` for an invoke task."""
    return [x for o in (f"run={run}", *overrides) for x in ("--set", o)]


def run_dir(run: str) -> Path:
    return ROOT / "artifacts" / run


def in_train_image(code: str, run: str, mounts: dict | None = None) -> str:
    """Run Python in the train image with the run's artifacts and the data mounted read-only; its last line."""
    volumes = {str(run_dir(run)): {"bind": "/artifacts", "mode": "ro"},
               str(ROOT / "data"): {"bind": "/work/data", "mode": "ro"}, **(mounts or {})}
    out = containers.client().containers.run(
        "finetune-train:latest", ["-c", code], entrypoint="python", remove=True, user=containers.container_user(),
        volumes=volumes, environment={"HF_HUB_OFFLINE": "1"})
    return out.decode().strip().splitlines()[-1]


def output(done: subprocess.CompletedProcess) -> str:
    """The end of a finished command's output, for assertion messages."""
    return done.stdout[-3000:] + done.stderr[-3000:]
