"""What the bench's stage modules share: the session (the bench run, its logs, the rows measured so far), a row
of the table, and the helpers that run `invoke` and baseline containers and time them."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

from docker.errors import NotFound

from finetune.core import layout
from finetune.core.config import RunConfig, load_config
from finetune.host import cache, containers

ROOT = Path(__file__).resolve().parent.parent.parent
FLAG_ABOVE = 1.10


class BenchError(RuntimeError):
    """A run that failed while being measured; the message has the end of its log."""


def tokens_per_second(run: dict) -> float:
    """Training throughput from a train summary.json or the plain script's result.json (the same keys)."""
    return run["tokens_seen"] / run["train_seconds"]


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class Row:
    """One figure of the table: our samples beside the baseline's."""

    stage: str
    figure: str
    unit: str
    ours: list[float]
    baseline_name: str
    baseline: list[float]
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        """The cost ratio: above 1, ours costs more than the baseline."""
        ours, theirs = statistics.median(self.ours), statistics.median(self.baseline) if self.baseline else None
        if not theirs or not ours:
            return None
        return theirs / ours if self.higher_is_better else ours / theirs

    def to_json(self) -> dict:
        return asdict(self) | {"ours_stats": summarize(self.ours), "ratio": self.ratio,
                               "baseline_stats": summarize(self.baseline) if self.baseline else None}


class Session:
    """One `invoke bench`: the config, the bench run, where results go, and what is measured so far; the
    stage modules (bench/train.py, ...) measure through it."""

    def __init__(self, config: RunConfig, config_path: str, overrides: list[str], out: Path, images: list[str]):
        self.config = config
        self.config_path = config_path
        self.repeats = config.bench.repeats
        self.run_name = layout.bench_run(config.run)
        self.run_dir = layout.run_dir(self.run_name, ROOT)
        # A bench training is a time sample, not a model to serve: after a few steps its greedy answers may run
        # on, which convert's quality check would refuse (convert.require_stop); here it only records them.
        self.sets = [*overrides, f"run={self.run_name}", f"train.max_steps={config.bench.train_steps}",
                     f"serve.port={config.bench.port}", "convert.require_stop=false"]
        self.out = out.resolve()
        self.images = images
        self.rows: list[Row] = []
        self.profiles: dict[str, dict[str, float]] = {}
        self.details: dict = {}
        self.baseline_walls: dict[str, float] = {}  # median wall time of each plain tool, for the pipeline
        self.train_rates: dict[str, list[float]] = {}  # tokens/s samples of each training variant
        self._logs = 0

    def bench_config(self, *extra: str) -> RunConfig:
        """The config that `invoke` gets in the bench's subprocesses."""
        return load_config(self.config_path, [*self.sets, *extra], root=ROOT)

    def log_path(self, label: str) -> Path:
        self._logs += 1
        return self.out / "logs" / f"{self._logs:03d}-{label.replace(' ', '-').replace('/', '-')}.log"

    def invoke(self, tasks: list[str], extra: tuple[str, ...] = (), force: bool = False) -> float:
        """Run `invoke <task>...` on the bench run as a user would; return its wall time in seconds."""
        argv = [sys.executable, "-m", "invoke"]
        for task in tasks:
            argv += [task, "--config", self.config_path]
            for value in [*self.sets, *extra]:
                argv += ["--set", value]
            argv += ["--force"] if force else []
        log = self.log_path("invoke " + " ".join(tasks))
        started = time.perf_counter()
        with log.open("w") as f:
            done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise BenchError(f"`invoke {' '.join(tasks)}` exited with {done.returncode}; {log} ends:\n{tail(log)}")
        return seconds

    def container(self, label: str, image: str, command: list[str], mounts: list[containers.Mount],
                  **kwargs) -> float:
        """Run a baseline in a stage image, its output to a log; return its wall time in seconds."""
        log = self.log_path(label)
        started = time.perf_counter()
        with log.open("w") as f, redirect_stdout(f):
            name = layout.container_name("bench", self.config.run)
            code = containers.run(image, command, mounts, name=name, **kwargs)
        seconds = time.perf_counter() - started
        if code != 0:
            raise BenchError(f"{label} exited with {code}; {log} ends:\n{tail(log)}")
        return seconds

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        print(f"bench: {row.stage}: {row.figure}: {fmt(statistics.median(row.ours))} {row.unit} "
              f"vs {fmt(statistics.median(row.baseline)) if row.baseline else '-'} ({row.baseline_name}); "
              f"ratio {ratio}", flush=True)

    def with_overheads(self, stage: str, wall: float, phases: dict[str, float]) -> dict[str, float]:
        """A stage's own phases (from inside its container) and what surrounds them: invoke on the host
        (image build check, cache key, lock, manifest) and the container's life around the stage code."""
        container = cache.read_stamp(self.run_dir, stage)["seconds"]
        return {"host: invoke, image check, cache, manifest": wall - container,
                "container create, start, removal; Python start": container - sum(phases.values()), **phases}

    def profile(self, name: str, samples: list[dict[str, float]]) -> None:
        phases = dict.fromkeys(p for s in samples for p in s)
        self.profiles[name] = {p: statistics.median(s.get(p, 0.0) for s in samples) for p in phases}


def fmt(x: float) -> str:
    """Three significant digits, without an exponent."""
    if x == 0:
        return "0"
    digits = max(0, 2 - int(f"{abs(x):e}".split("e")[1]))
    return f"{x:,.{digits}f}"


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def remove_volume(name: str) -> None:
    try:
        containers.client().volumes.get(name).remove(force=True)
    except NotFound:
        pass
