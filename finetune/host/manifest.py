"""artifacts/<run>/manifest.json: the lineage of a run, from the dataset hashes to the served model.

For every artifact: its path (relative to the run directory), size and sha256. For every stage: its cache
key and inputs, the image it ran in (ID, and repo digests where the image came from a registry), the
versions of the tools that made the artifacts, start and end time, the host (CPU, GPU, engine), and the
resolved config. `invoke verify` recomputes every hash and names any file that differs or is missing.

The manifest is the record of a run, so it holds times; the artifacts themselves hold none (nor the run's
name), which is what makes them byte-for-byte reproducible. golden/<config>.json publishes the sha256 of the
offline default's artifacts as made on any x86-64 CPU with AVX2 (finetune/train/numerics.py); `invoke verify
--golden` compares a run with them and names the first artifact, in pipeline order, that differs. CI runs it,
so every machine that runs CI proves that the build reproduces across machines.
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

from finetune.core import layout
from finetune.core.machine import cpu_flags
from finetune.core.stage import file_sha256, flatten
from finetune.host.cache import STAGES, Inputs

MANIFEST = "manifest.json"


def artifacts(run_dir: Path, out: str) -> list[dict]:
    """Path, size and sha256 of every file in run_dir/<out>/, an output a stage published (checkpoints and
    partial work live elsewhere), sorted by path."""
    out = run_dir / out
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return [{"path": str(p.relative_to(run_dir)), "size": p.stat().st_size, "sha256": file_sha256(p)} for p in files]


# The packages whose versions a stage's artifacts depend on, read from the locks its image was built from; a
# package its image takes from Debian instead (convert's torch and numpy) from the image's `finetune.version.<name>` label,
# and for a native run from the venv itself.
LOCKED_PACKAGES = {
    "train": (("requirements/train.lock", "requirements/deepspeed.lock"),
              ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "deepspeed", "datasets",
               "sentencepiece")),
    "convert": (("requirements/convert.lock",), ("torch", "transformers", "numpy", "sentencepiece")),
}


def stage_record(stage: str, image_attrs: dict, started: float, ended: float, run_dir: Path) -> dict:
    """What the stamp and the manifest say about one stage run besides its inputs (for a native run, that it
    was native, its Python, packages and, for train, device and precision); for train also the
    numerical pin it ran under (CPU kernels, MKL path, threads: finetune/train/numerics.py) and its processes
    (strategy, nodes, world size, effective batch: finetune/train/launch.py), from summary.json."""
    record = {
        "image": {"id": image_attrs["Id"], "tags": image_attrs.get("RepoTags") or [],
                  "repo_digests": image_attrs.get("RepoDigests") or []},
        "versions": versions(stage, image_attrs),
        "started": _iso(started), "ended": _iso(ended), "seconds": round(ended - started, 1),
        "host": host(),
    }
    if "Native" in image_attrs:  # the native runner (finetune/host/native.py): no image, the host's Python
        record["runner"] = {"native": True, **image_attrs["Native"]}
    if stage == "train" and (summary := layout.stage_dir(run_dir, "train") / layout.SUMMARY).is_file():
        summary = json.loads(summary.read_text(encoding="utf-8"))
        record |= {"numerics": summary.get("numerics"), "distributed": summary.get("distributed")}
        if "runner" in record:
            record["runner"] |= {"device": summary.get("device"), "precision": summary.get("precision")}
    return record


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def versions(stage: str, image_attrs: dict) -> dict:
    """Tool versions: pinned packages from the stage's lock, llama.cpp's commit and Ollama's version from the
    image (its environment and labels, or `ollama --version`)."""
    found = {}
    labels = (image_attrs.get("Config") or {}).get("Labels") or {}
    if stage in LOCKED_PACKAGES:
        locks, names = LOCKED_PACKAGES[stage]
        text = "".join(Path(lock).read_text(encoding="utf-8") for lock in locks)
        installed = (image_attrs.get("Native") or {}).get("packages") or {}
        for name in names:
            if m := re.search(rf"^{re.escape(name)}==(\S+)", text, re.M):
                found[name] = m.group(1)
            elif version := installed.get(name) or labels.get(f"finetune.version.{name}"):
                found[name] = version
    env = dict(x.split("=", 1) for x in (image_attrs.get("Config") or {}).get("Env") or [] if "=" in x)
    if stage == "convert":
        found["llama.cpp"] = env.get("LLAMA_CPP_COMMIT", "unknown")
        found["llama-cpp-python"] = "0.3.36"
    if stage == "serve":
        found["ollama"] = ollama_version(image_attrs)
        if "finetune.ollama.cpu_flags" in labels:  # Ollama from source: the flags its ggml was compiled with
            found["ollama_cpu_flags"] = labels["finetune.ollama.cpu_flags"]
        if layout.OLLAMA_PATCHES_LABEL in labels:  # ... and the patches on top of the release (docker/ollama/)
            found["ollama_patches"] = labels[layout.OLLAMA_PATCHES_LABEL]
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
    outs = STAGES[inputs.stage].outs  # what the stage declares it writes
    files = [f for f in manifest.get("artifacts", []) if not f["path"].startswith(tuple(f"{o}/" for o in outs))]
    manifest["artifacts"] = sorted(files + [f for o in outs for f in artifacts(run_dir, o)], key=lambda f: f["path"])
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


GOLDEN_DIR = Path("golden")
# What the published hashes cover, in pipeline order: the merged model, every GGUF, every Modelfile.
GOLDEN_FILES = ("train/merged/*", "convert/*.gguf", "serve/Modelfile*", "serve/models")
# Config keys that reach no artifact: where things go and where the server listens.
NOT_IN_ARTIFACTS = ("run", "serve.host", "serve.port", "eval", "bench")


def golden_path(config_path: str | Path) -> Path:
    return GOLDEN_DIR / f"{Path(config_path).stem}.json"


def artifact_config(config: dict) -> dict:
    """The resolved config's values that decide the artifacts' bytes (flattened)."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == x or k.startswith(x + ".") for x in NOT_IN_ARTIFACTS)}


def golden_files(run_dir: Path) -> dict[str, str]:
    """{path relative to run_dir: sha256} of the files the published hashes cover, in pipeline order."""
    return {str(p.relative_to(run_dir)): file_sha256(p)
            for pattern in GOLDEN_FILES for p in sorted(run_dir.glob(pattern)) if p.is_file()}


def write_golden(path: Path, config_path: str, config: dict, run_dir: Path, numerics: dict | None) -> dict:
    """Publish the hashes of run_dir's artifacts as the golden ones for `config_path`."""
    golden = {
        "config": str(config_path),
        "about": "sha256 of the offline default's artifacts, the same on every x86-64 CPU with AVX2; checked by "
                 "`./invoke verify --golden` (CI runs it). A change meant to change them rewrites this file with "
                 "`./invoke verify --golden --update` in the same commit, and says why in its message.",
        "made_on": {"cpu": host()["cpu"], "avx512": "avx512f" in cpu_flags()},
        "made_with": numerics or {},
        "artifact_config": artifact_config(config),
        "files": golden_files(run_dir),
    }  # other machines' records are dropped: made from the old artifacts, they must be made again
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(golden, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return golden


def add_other_machine(path: Path, run_dir: Path, numerics: dict | None) -> dict:
    """Record run_dir's hashes in the published file as another CPU class's (`other_machines`), beside the
    reference machine's, replacing an earlier record of the same CPU model; return the record.

    For a CPU on which the pinned training gives other bytes than the reference machine's, with the cause not
    found yet (README, "Reproducibility"): CI on such a machine then proves that its class reproduces, while
    the difference stays written down rather than hidden."""
    golden = json.loads(path.read_text(encoding="utf-8"))
    record = {"made_on": {"cpu": host()["cpu"], "avx512": "avx512f" in cpu_flags()}, "made_with": numerics or {},
              "files": golden_files(run_dir)}
    others = [m for m in golden.get("other_machines", []) if m["made_on"] != record["made_on"]]
    golden["other_machines"] = [*others, record]
    path.write_text(json.dumps(golden, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return record


def matching_machine(golden: dict, run_dir: Path) -> dict | None:
    """The `other_machines` record whose hashes run_dir's artifacts match exactly, or None."""
    found = golden_files(run_dir)
    return next((m for m in golden.get("other_machines", []) if m["files"] == found), None)


def config_difference(golden: dict, config: dict) -> str | None:
    """Why a run's artifacts cannot match the published hashes: its config differs from the published one in
    keys that reach the artifacts; None when it does not."""
    published, ours = golden["artifact_config"], artifact_config(config)
    changed = sorted(k for k in set(published) | set(ours) if published.get(k) != ours.get(k))
    if not changed:
        return None
    shown = ", ".join(f"{k}={ours.get(k)!r} (published: {published.get(k)!r})" for k in changed[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return (f"the run's config differs from {golden['config']} where it reaches the artifacts: {shown}{more}; the "
            "published hashes are for that config as committed")


def compare_golden(golden: dict, run_dir: Path) -> list[str]:
    """Every artifact that differs from the published hashes, in pipeline order (the first is the first that
    differs); [] when all match."""
    found = golden_files(run_dir)
    problems = []
    for rel, digest in golden["files"].items():
        if rel not in found:
            problems.append(f"{run_dir / rel}: missing (run `invoke train convert serve` first)")
        elif found[rel] != digest:
            problems.append(f"{run_dir / rel}: sha256 {found[rel][:16]}…, published {digest[:16]}…")
    problems += [f"{run_dir / rel}: not in the published hashes" for rel in found if rel not in golden["files"]]
    return problems
