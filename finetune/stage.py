"""The command line every stage module shares: `python -m finetune.<stage> --config run.yaml --out DIR`.

A stage is a function `(config, out) -> final directory`; its expected failures are exceptions whose
message says what to do. They, and config errors, print as `<stage>: <message>` and exit 2. A stage works
in a hidden directory (`publishing`) that becomes its output only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.config import ConfigError, RunConfig, load_config


def stage_main(name: str, description: str, run: Callable[[RunConfig, Path], Path],
               errors: tuple[type[Exception], ...], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m finetune.{name}", description=description)
    parser.add_argument("--config", required=True, help="resolved run config (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="the run's artifacts directory")
    args = parser.parse_args(argv)
    try:
        final = run(load_config(args.config), args.out)
    except (ConfigError, *errors) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    print(f"{name}: done -> {final}", flush=True)
    return 0


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


class Stopwatch:
    """Wall time per phase of a stage, its profile: `lap(phase)` ends the phase that began at the last lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now
