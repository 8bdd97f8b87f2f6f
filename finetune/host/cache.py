"""The stage cache: redo only the stages whose inputs changed, and say why.

Each stage declares beside its code what it reads (finetune/<stage>/__init__.py, a core.stage.Stage): config
keys, data files (by content), the stage before it. Its key is the sha256 of those, the key of the stage
before it, the ID of the image it runs in (which covers its code and pinned packages: each image copies only
finetune/core and its own stage folder, so host code cannot change it), and for serve, whose Modelfiles
are written on the host, the code that writes them. When a stage succeeds, `invoke` writes its stamp,
artifacts/<run>/stamps/<stage>.json, last; the stamp is removed before a stage runs. So a stage is up to
date exactly when its stamp holds the current key, and an interrupted stage has no stamp and runs again.

A lock per run (artifacts/.locks/<run>) keeps two `invoke`s from working on one run at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune import convert, serve, train
from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.core.stage import Stage, file_sha256

STAGES: dict[str, Stage] = {s.name: s for s in (train.STAGE, convert.STAGE, serve.STAGE)}


class CacheError(RuntimeError):
    """A run directory that is locked or lacks space; the message says what to do."""


@dataclass(frozen=True)
class Inputs:
    """Everything a stage's output depends on; its key is their hash."""

    stage: str
    config: dict[str, Any]
    files: dict[str, str]
    upstream: dict[str, str]
    image: str
    code: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def stage_inputs(stage: str, config: RunConfig, run_dir: Path, image_id: str, root: Path = Path(".")) -> Inputs:
    """A stage's inputs, from its declaration: what it reads (Stage.read), its upstream's key, image and code."""
    declared = STAGES[stage]
    read = declared.read(config, root)
    upstream = {}
    if (before := declared.upstream) is not None:
        upstream[before] = (read_stamp(run_dir, before) or {}).get("key", "none")
    code = {str(p.relative_to(root)): file_sha256(p) for folder in declared.code
            for p in sorted((root / folder).rglob("*.py"))}
    return Inputs(stage, read["config"], read["files"], upstream, image_id, code)


def read_stamp(run_dir: Path, stage: str) -> dict | None:
    try:
        return json.loads(layout.stamp_path(run_dir, stage).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def why_rerun(run_dir: Path, inputs: Inputs) -> str | None:
    """None when the stage's stamp holds the current key; else the reason, worded for the terminal."""
    old = read_stamp(run_dir, inputs.stage)
    if old is None:
        return "it has not completed (no stamp)"
    if old.get("key") == inputs.key:
        return None
    before = old.get("inputs", {})
    reasons = []
    config = before.get("config", {})
    changed = sorted(k for k in set(config) | set(inputs.config) if config.get(k) != inputs.config.get(k))
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        reasons.append(f"{shown} changed")
    reasons += [f"{path} changed" for path, digest in inputs.files.items() if before.get("files", {}).get(path) != digest]
    reasons += [f"{stage} was redone" for stage, key in inputs.upstream.items()
                if before.get("upstream", {}).get(stage) != key]
    if before.get("image") != inputs.image:
        reasons.append(f"its image changed ({inputs.image.removeprefix('sha256:')[:12]})")
    reasons += [f"{path} changed" for path, digest in inputs.code.items() if before.get("code", {}).get(path) != digest]
    return ", ".join(reasons) or "its inputs changed"


def clear_stamp(run_dir: Path, stage: str) -> None:
    layout.stamp_path(run_dir, stage).unlink(missing_ok=True)


def write_stamp(run_dir: Path, inputs: Inputs, record: dict) -> None:
    """The stage is done: write its stamp (via a temporary file and a rename, so it is whole or absent)."""
    path = layout.stamp_path(run_dir, inputs.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps({"key": inputs.key, "inputs": asdict(inputs), **record}, indent=2,
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    partial.rename(path)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold artifacts/.locks/<run> while a stage works on the run; a second holder fails at once, clearly.
    (Beside the run directory, not in it: a stage that fails early leaves its run directory untouched.)"""
    path = layout.lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CacheError(f"{run_dir} is in use by {holder}; wait for it to finish (or stop it), then run again "
                             "(a different run name works in parallel)") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"invoke (pid {os.getpid()})")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_space(path: Path, needed_bytes: int, what: str) -> None:
    """Fail before writing when the filesystem of `path` has less free space than `needed_bytes`."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise CacheError(f"{what} needs about {needed_bytes / 2**30:.1f} GiB free in {path}, and "
                         f"{free / 2**30:.1f} GiB are free; free some space (old runs in artifacts/, "
                         "`docker system prune`) and run again")
