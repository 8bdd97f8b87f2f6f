"""What every stage shares: its declaration, its command line, all-or-nothing outputs, per-phase timings.

A stage declares, beside its code (`finetune/<stage>/__init__.py`), what it reads and writes: the config
keys (params), the files named by config keys (read by content), the stage whose output it reads
(upstream), and the directories it writes (outs): the DVC idea of params, deps and outs. The host's cache
key (finetune/host/cache.py) and the train stage's resume check are computed from that one declaration,
and the stage sees the config only through it (`Stage.view`): reading a key it does not declare fails at
once, naming the key and where to declare it, so a key cannot silently miss the cache key.

A stage image runs `python -m finetune.<stage> --config run.yaml --out DIR` (`stage_main`): the stage is a
function `(config view, out) -> final directory` (None in a training process that publishes nothing); its expected failures are exceptions whose message says
what to do. They, and config errors, print as `<stage>: <message>` and exit 2. A stage works in a hidden
directory (`publishing`) that becomes its output only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core.config import ConfigError, RunConfig, load_config
from finetune.core.layout import INPUTS


class UndeclaredKey(RuntimeError):
    """Stage code read a config key that its declaration does not list: a bug in the stage, not in the config."""


@dataclass(frozen=True)
class Stage:
    """What one stage reads and writes; declared in finetune/<stage>/__init__.py, beside its code.

    params    config keys it reads; a key covers everything below it ("train" covers "train.rank")
    files     config keys that may name local files or directories it reads (a model directory, a template);
              their content (sha256) is part of its key when they exist (a hub id or keyword is no path)
    upstream  the stage whose output it reads, or None
    outs      what it writes, relative to the run directory
    code      for a stage that runs on the host, the source folders whose content is part of its key (a stage
              that runs in an image has that covered by the image ID, which its key includes)
    """

    name: str
    params: tuple[str, ...]
    files: tuple[str, ...] = ()
    upstream: str | None = None
    outs: tuple[str, ...] = ()
    code: tuple[str, ...] = ()

    def declares(self, key: str) -> bool:
        """Whether `key` is a declared param or lies below one."""
        return any(key == p or key.startswith(p + ".") for p in self.params)

    def read(self, config: RunConfig, root: Path = Path(".")) -> dict[str, Any]:
        """What the stage reads of a run, besides its upstream and its code: the declared params' values,
        flattened ({"train.rank": 16, ...}), and {path as configured: sha256} of the declared files the config
        names. Its output's inputs.json holds it, and an interrupted stage resumes only if it is unchanged."""
        values = flatten(_whole(config).model_dump(mode="json"))
        return {"config": {k: v for k, v in values.items() if self.declares(k)},
                "files": {values[k]: path_sha256(root / values[k]) for k in self.files
                          if values.get(k) is not None and (root / values[k]).exists()}}

    def write_inputs(self, config: RunConfig, work: Path) -> None:
        """Write what the stage read (`read`) into its output, as inputs.json."""
        (work / INPUTS).write_text(json.dumps(self.read(config), indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")

    def view(self, config: RunConfig) -> Any:
        """The config as this stage may read it: the same attributes, but an undeclared key raises UndeclaredKey."""
        return Declared(config, "", self)


class Declared:
    """A read-only view of a config node that lets a stage read only what its Stage declares."""

    def __init__(self, node: Any, path: str, stage: Stage):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_stage", stage)

    def __getattr__(self, name: str) -> Any:
        key = f"{self._path}.{name}" if self._path else name
        value = getattr(self._node, name)
        if self._stage.declares(key):
            return value
        if any(p.startswith(key + ".") for p in self._stage.params):
            return Declared(value, key, self._stage)
        raise UndeclaredKey(f"the {self._stage.name} stage read the config key {key}, which its declaration "
                            f"(finetune/{self._stage.name}/__init__.py, STAGE.params) does not list: add it there, "
                            "so that a change to it reruns the stage")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the run config is read-only in a stage ({name})")


def _whole(config: Any) -> RunConfig:
    """The config behind a stage's view (for the declaration's own use)."""
    return object.__getattribute__(config, "_node") if isinstance(config, Declared) else config


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.rank": 16, ...} from the nested config."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, value in node.items()
            for k, v in flatten(value, f"{prefix}.{key}" if prefix else key).items()}


def stage_main(stage: Stage, description: str, run: Callable[[Any, Path], Path | None],
               errors: tuple[type[Exception], ...], argv: list[str] | None = None) -> int:
    """The stage's command line: load the resolved config, run the stage on its declared view of it."""
    parser = argparse.ArgumentParser(prog=f"python -m finetune.{stage.name}", description=description)
    parser.add_argument("--config", required=True, help="resolved run config (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="the run's artifacts directory")
    args = parser.parse_args(argv)
    try:
        final = run(stage.view(load_config(args.config)), args.out)
    except (ConfigError, *errors) as e:
        print(f"{stage.name}: {e}", file=sys.stderr)
        return 2
    if final is not None:  # None: a training process other than rank 0, which publishes nothing
        print(f"{stage.name}: done -> {final}", flush=True)
    return 0


def exit_without_teardown(code: int) -> None:
    """End a stage process with `code` once stage_main has returned: its output is published (or removed)
    and its files closed. Python's teardown of the modules a stage loads (torch, transformers, TRL) took 2.1 s
    after training and 0.25 s after the convert checks (measured on 2 vCPUs), for nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def publish(work: Path, final: Path) -> None:
    """Replace final/ with a completed work/ by renames: readers see the old complete output or the new one."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    work.rename(final)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def publishing(work: Path, final: Path) -> Iterator[Path]:
    """An empty work directory; published as `final` when the block completes, removed if anything fails."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
        publish(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    """file_sha256 of a file; of a directory, the digest of its files' relative paths and digests."""
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for p in sorted(x for x in path.rglob("*") if x.is_file()):
        digest.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()


class Stopwatch:
    """Wall time per phase of a stage, its profile: `lap(phase)` ends the phase that began at the last lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now
