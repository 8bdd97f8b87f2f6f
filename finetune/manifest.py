"""artifacts/<run>/manifest.json: the lineage of a run, from the dataset hashes to the served model.

For every artifact: its path (relative to the run directory), size and sha256. For every stage: its cache
key and inputs, the image it ran in (ID, and repo digests where the image came from a registry), the
versions of the tools that made the artifacts, start and end time, the host (CPU, GPU, engine), and the
resolved config. `invoke verify` recomputes every hash and names any file that differs or is missing.

The manifest is the record of a run, so it holds times; the artifacts themselves hold none, which is what
makes them byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from finetune.cache import Inputs
from finetune.stage import file_sha256

MANIFEST = "manifest.json"


def artifacts(run_dir: Path, stage: str) -> list[dict]:
    """Path, size and sha256 of every file a stage published in run_dir/<stage>/ (checkpoints and partial
    work live elsewhere), sorted by path."""
    out = run_dir / stage
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return [{"path": str(p.relative_to(run_dir)), "size": p.stat().st_size, "sha256": file_sha256(p)} for p in files]


# The packages whose versions a stage's artifacts depend on, read from the lock its image was built from.
LOCKED_PACKAGES = {
    "train": ("requirements/train.lock", ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate",
                                          "datasets", "sentencepiece")),
    "convert": ("requirements/convert.lock", ("torch", "transformers", "numpy", "sentencepiece")),
}


def stage_record(stage: str, image_attrs: dict, started: float, ended: float) -> dict:
    """What the stamp and the manifest say about one stage run besides its inputs."""
    return {
        "image": {"id": image_attrs["Id"], "tags": image_attrs.get("RepoTags") or [],
                  "repo_digests": image_attrs.get("RepoDigests") or []},
        "versions": versions(stage, image_attrs),
        "started": _iso(started), "ended": _iso(ended), "seconds": round(ended - started, 1),
        "host": host(),
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def versions(stage: str, image_attrs: dict) -> dict:
    """Tool versions: pinned packages from the stage's lock, llama.cpp's commit and Ollama's version from the
    image (its environment and labels, or `ollama --version`)."""
    found = {}
    if stage in LOCKED_PACKAGES:
        lock, names = LOCKED_PACKAGES[stage]
        text = Path(lock).read_text(encoding="utf-8")
        for name in names:
            if m := re.search(rf"^{re.escape(name)}==(\S+)", text, re.M):
                found[name] = m.group(1)
    env = dict(x.split("=", 1) for x in (image_attrs.get("Config") or {}).get("Env") or [] if "=" in x)
    if stage == "convert":
        found["llama.cpp"] = env.get("LLAMA_CPP_COMMIT", "unknown")
        found["llama-cpp-python"] = "0.3.36"
    if stage == "serve":
        found["ollama"] = ollama_version(image_attrs)
    return found


def ollama_version(image_attrs: dict) -> str:
    labels = (image_attrs.get("Config") or {}).get("Labels") or {}
    if (version := labels.get("org.opencontainers.image.version")) and "ollama" in labels.get(
            "org.opencontainers.image.title", ""):
        return version
    done = subprocess.run(["docker", "run", "--rm", "--entrypoint", "ollama", image_attrs["Id"], "--version"],
                          capture_output=True, text=True)
    found = re.search(r"version is (\S+)", done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def host() -> dict:
    """The machine a stage ran on: CPU model and count, GPUs (nvidia-smi), OS."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    gpus = []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
        gpus = [x.strip() for x in done.stdout.splitlines() if x.strip()] if done.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpus": gpus, "os": platform.platform()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def record_stage(run_dir: Path, inputs: Inputs, record: dict, config_yaml: str) -> None:
    """Put one completed stage, and the files it published, into the run's manifest (rewritten whole)."""
    path = run_dir / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    manifest["run"] = inputs.config.get("run", manifest.get("run", run_dir.name))
    manifest["config"] = config_yaml
    stages = manifest.setdefault("stages", {})
    stages[inputs.stage] = {"key": inputs.key, "inputs": asdict(inputs), **record}
    files = [f for f in manifest.get("artifacts", []) if not f["path"].startswith(inputs.stage + "/")]
    manifest["artifacts"] = sorted(files + artifacts(run_dir, inputs.stage), key=lambda f: f["path"])
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.rename(path)


def verify(run_dir: Path) -> tuple[int, list[str]]:
    """(files checked, one line per file that is missing or differs from the manifest)."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return 0, [f"{path}: no manifest; run the stages first (`invoke train convert serve`)"]
    entries = json.loads(path.read_text(encoding="utf-8")).get("artifacts", [])
    problems = []
    for entry in entries:
        target = run_dir / entry["path"]
        if not target.is_file():
            problems.append(f"{target}: missing")
        elif (size := target.stat().st_size) != entry["size"]:
            problems.append(f"{target}: {size} bytes, the manifest says {entry['size']}")
        elif (digest := file_sha256(target)) != entry["sha256"]:
            problems.append(f"{target}: sha256 {digest[:16]}…, the manifest says {entry['sha256'][:16]}…")
    return len(entries), problems
