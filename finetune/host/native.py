"""The native runner: the same stages, config, stage cache and manifest, run in the host's Python instead of
the stage images, for machines where the images cannot run (Colab, Kaggle, a Mac, HPC clusters without
Docker). `INVOKE_FINETUNE_RUNNER=native ./invoke data train convert serve`.

What the images pin, this builds once per machine from the same pinned, hash-checked inputs, under
.native/<key>/ (NATIVE_DIR; the key hashes the locks, the Python version, the platform and the build flags):

    venv/        the stages' Python: requirements/train.lock + convert.lock (+ llama-cpp-build.lock), pip
                 --require-hashes, then llama-cpp-python from its sdist without compiling (it loads the
                 libraries below through LLAMA_CPP_LIB_PATH)
    src/         the llama-cpp-python 0.3.36 sdist (sha256-checked by pip), whose vendor/llama.cpp is the
                 source the convert image builds: converter, gguf-py, templates, vocabularies
    build/bin/   llama-quantize, llama-perplexity, llama-imatrix and the shared llama/ggml libraries, built
                 with the convert image's flags (GGML_NATIVE=OFF: the same kernels on every machine)
    ready.json   written last: what was built; without it the directory is an interrupted setup, redone

Serve runs the host's `ollama` binary through the serve image's own entrypoint (docker/serve-entrypoint.sh:
the one place that creates models and decides readiness), detached, with its pid and log under
.native/serve/. Without an `ollama` binary, serve writes the bundle (`invoke export`) and says how to get one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.core.stage import file_sha256

NATIVE_DIR = Path(os.environ.get("FINETUNE_NATIVE_DIR", ".native"))
LOCKS = ("requirements/train.lock", "requirements/convert.lock", "requirements/llama-cpp-build.lock")
SDIST_LOCK = "requirements/llama-cpp-python.lock"
SDIST = "llama_cpp_python-0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
# The convert image's cmake flags (Dockerfile.convert), but shared libraries: llama-cpp-python loads them too.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF")
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
# The convert image's one source patch: llama-perplexity flushes llama.cpp's asynchronous log before exit.
PERPLEXITY_PATCH = ("    llama_backend_free();\n",
                    "    common_log_flush(common_log_main());\n    llama_backend_free();\n")
# Wheels of the locks that exist for Linux only (torch's CUDA runtime): left out of a Mac's venv, where torch's
# macOS wheel of the same pin (its hash is in the lock) uses MPS instead.
LINUX_ONLY = ("nvidia-", "cuda-", "triton==")
ENTRYPOINT = Path("docker/serve-entrypoint.sh")
SERVE_WITHIN_S = 300


class NativeError(RuntimeError):
    """The native environment cannot be built or a native server cannot run; the message says what to do."""


@dataclass(frozen=True)
class Environment:
    """A built native environment: where its Python, llama.cpp source and tools are, and what it is."""

    root: Path
    key: str

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def llama_cpp(self) -> Path:
        return self.root / "src" / SDIST / "vendor" / "llama.cpp"

    @property
    def bin(self) -> Path:
        return self.root / "build" / "bin"

    def record(self) -> dict:
        return json.loads((self.root / "ready.json").read_text(encoding="utf-8"))


def environment_key(python: str) -> str:
    """What a native environment is built from: the locks, the Python, the platform and the build flags."""
    version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True).stdout.strip()
    what = {"locks": {lock: file_sha256(Path(lock)) for lock in (*LOCKS, SDIST_LOCK)}, "python": version,
            "platform": [platform.system(), platform.machine()], "cmake": CMAKE_FLAGS, "tools": TOOLS,
            "patch": PERPLEXITY_PATCH}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def environment(python: str = "python3") -> Environment:
    """The native environment for `python` (the interpreter whose venv the stages run in), built on first use
    (minutes: torch and the other pinned wheels download, llama.cpp compiles) and reused after."""
    found = shutil.which(python)
    if found is None:
        raise NativeError(f"no {python} on PATH: the native runner needs Python 3.10+ with venv "
                          "(finetune.native_python, INVOKE_FINETUNE_NATIVE_PYTHON, names another)")
    key = environment_key(found)
    env = Environment(NATIVE_DIR.resolve() / key[:16], key)
    if (env.root / "ready.json").is_file():
        return env
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise NativeError(f"the native runner builds llama.cpp's tools and needs {' and '.join(missing)} on PATH: "
                          "install them (Debian/Ubuntu: `apt-get install cmake g++`; a Mac: `xcode-select --install` "
                          "and `brew install cmake`) and run again")
    shutil.rmtree(env.root, ignore_errors=True)  # an interrupted setup: no ready.json
    env.root.mkdir(parents=True)
    log = env.root / "setup.log"
    print(f"native: building the native environment in {env.root} (once per machine; the pinned wheels "
          f"download and llama.cpp compiles for minutes; log: {log})", file=sys.stderr, flush=True)
    started = time.time()
    pip = [str(env.python), "-m", "pip", "--disable-pip-version-check"]
    try:
        _step(log, "venv", [found, "-m", "venv", str(env.root / "venv")])
    except NativeError:  # no ensurepip (Debian's and Colab's Python without python3-venv): the host's pip fills it
        _step(log, "venv without pip, filled by the host's pip", [found, "-m", "venv", "--clear", "--without-pip",
                                                                  str(env.root / "venv")])
        pip = [found, "-m", "pip", "--disable-pip-version-check", "--python", str(env.python)]
    locks = LOCKS if platform.system() == "Linux" else [platform_lock(Path(lock), env.root) for lock in LOCKS]
    _step(log, "the pinned packages", [*pip, "install", "--require-hashes", "--no-deps",
                                       *(x for lock in locks for x in ("-r", str(lock)))])
    _step(log, "the llama.cpp source", [*pip, "download", "--require-hashes", "--no-deps", "--no-binary", ":all:",
                                        "-d", str(env.root / "src"), "-r", SDIST_LOCK])
    with tarfile.open(env.root / "src" / f"{SDIST}.tar.gz") as sdist:
        sdist.extractall(env.root / "src", filter="data")
    if f"llama.cpp@{LLAMA_CPP_COMMIT}" not in (env.root / "src" / SDIST / "CHANGELOG.md").read_text(encoding="utf-8"):
        raise NativeError(f"{SDIST}'s CHANGELOG does not name llama.cpp {LLAMA_CPP_COMMIT}")
    perplexity = env.llama_cpp / "tools" / "perplexity" / "perplexity.cpp"
    text = perplexity.read_text(encoding="utf-8")
    if PERPLEXITY_PATCH[0] not in text:  # as Dockerfile.convert's grep: the pinned source must take the patch
        raise NativeError(f"{perplexity} has no `{PERPLEXITY_PATCH[0].strip()}` line to flush the log before; "
                          f"is the {SDIST} sdist the pinned one?")
    perplexity.write_text(text.replace(*PERPLEXITY_PATCH, 1), encoding="utf-8")
    jobs = str(os.cpu_count() or 1)
    _step(log, "llama.cpp (configure)", ["cmake", "-S", str(env.llama_cpp), "-B", str(env.root / "build"),
                                         *CMAKE_FLAGS])
    _step(log, f"llama.cpp ({', '.join(TOOLS)})", ["cmake", "--build", str(env.root / "build"), "-j", jobs,
                                                   "--target", "llama", *TOOLS])
    _step(log, "llama-cpp-python (its Python code; the libraries above)",
          [*pip, "install", "--no-deps", "--no-build-isolation", "--no-index",
           str(env.root / "src" / f"{SDIST}.tar.gz")],
          extra_env={"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"})
    supported = subprocess.run([str(env.python), str(env.llama_cpp / "convert_hf_to_gguf.py"),
                                "--print-supported-models"], capture_output=True, text=True, env=stage_env(env, None))
    (env.llama_cpp / "supported-models.txt").write_text(supported.stdout + supported.stderr, encoding="utf-8")
    _step(log, "a check of the environment", [str(env.python), "-c", "import accelerate, llama_cpp, peft, torch, "
                                               "transformers, trl; print('torch', torch.__version__)"],
          extra_env=stage_env(env, None))
    versions = subprocess.run([*pip, "list", "--format=json"], capture_output=True, text=True, check=True).stdout
    version = subprocess.run([str(env.python), "--version"], capture_output=True, text=True).stdout.split()[-1]
    record = {"key": key, "python": f"{version} ({found})", "platform": platform.platform(), "cmake": CMAKE_FLAGS,
              "llama_cpp": LLAMA_CPP_COMMIT,
              "packages": {p["name"].lower(): p["version"] for p in json.loads(versions)},
              "seconds": round(time.time() - started, 1)}
    (env.root / "ready.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"native: environment ready in {record['seconds']:.0f} s", file=sys.stderr, flush=True)
    return env


def platform_lock(lock: Path, folder: Path) -> Path:
    """A copy of `lock` without its Linux-only wheels (LINUX_ONLY), every other pin and hash kept: for a Mac."""
    kept, keep = [], True
    for line in lock.read_text(encoding="utf-8").splitlines(keepends=True):
        if line[:1].isalnum():  # a pin starts a block; its hashes and "# via" lines follow, indented
            keep = not line.startswith(LINUX_ONLY)
        if keep:
            kept.append(line)
    path = folder / lock.name
    path.write_text("".join(kept), encoding="utf-8")
    return path


def _step(log: Path, what: str, command: list[str], extra_env: dict[str, str] | None = None) -> None:
    print(f"native: {what}", file=sys.stderr, flush=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})})
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise NativeError(f"building the native environment failed at {what} (exit {done.returncode}); the end of "
                          f"{log}:\n{tail}\nFix that and run again (the setup starts over)")


def stage_env(env: Environment, config: RunConfig | None) -> dict[str, str]:
    """The environment a stage process gets: what the images set in theirs (Dockerfile.train/.convert ENV),
    pointed at the native environment's files and at the host's caches."""
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    values = {
        "PATH": os.pathsep.join((str(env.bin), str(env.python.parent), base.get("PATH", ""))),
        "PYTHONPATH": os.pathsep.join((str(Path.cwd()), str(env.llama_cpp / "gguf-py"))),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LLAMA_CPP_DIR": str(env.llama_cpp),
        "LLAMA_CPP_COMMIT": LLAMA_CPP_COMMIT,
        "LLAMA_CPP_LIB_PATH": str(env.bin),
        "HF_HOME": base.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface"),
        "FINETUNE_BASE_GGUF_CACHE": str(layout.BASE_GGUF_CACHE.resolve()),
    }
    if config is not None and layout.is_builtin(config.model.id):
        values["HF_HUB_OFFLINE"] = "1"
    return base | values


def image_attrs(env: Environment, stage: str, root: Path = Path(".")) -> dict:
    """What the stage cache and the manifest read of an image (docker's attrs), for a native run: an ID that
    covers the environment and the stage's code (an image covers both), and the llama.cpp commit."""
    code = {str(p.relative_to(root)): file_sha256(p) for folder in ("finetune/core", f"finetune/{stage}")
            for p in sorted((root / folder).rglob("*.py"))}
    digest = hashlib.sha256(json.dumps({"environment": env.key, "code": code}, sort_keys=True).encode()).hexdigest()
    record = env.record()
    return {"Id": f"native:{digest}", "RepoTags": [], "RepoDigests": [],
            "Config": {"Env": [f"LLAMA_CPP_COMMIT={LLAMA_CPP_COMMIT}"], "Labels": {}},
            "Native": {"environment": str(env.root), "python": record["python"], "platform": record["platform"],
                       "packages": record["packages"]}}


def run_stage(env: Environment, stage: str, config_file: Path, run_dir: Path, config: RunConfig,
              extra_env: dict[str, str] | None = None) -> int:
    """`python -m finetune.<stage> --config FILE --out RUN_DIR` in the native environment; its exit code."""
    command = [str(env.python), "-m", f"finetune.{stage}", "--config", str(config_file),
               "--out", str(run_dir.resolve())]
    return subprocess.run(command, env=stage_env(env, config) | (extra_env or {})).returncode


# ---- serve: the host's ollama, through the serve image's entrypoint ----

def ollama_binary(name: str = "ollama") -> Path | None:
    found = shutil.which(name)
    return Path(found).resolve() if found else None


def ollama_attrs(ollama: Path | None) -> dict:
    """The serve stage's "image" attrs for a native run: the host's Ollama binary (by content) and the
    entrypoint that creates the models; its version where the manifest reads an image's."""
    if ollama is None:
        return {"Id": "native:no-ollama", "Config": {"Labels": {"org.opencontainers.image.title": "ollama",
                                                                 "org.opencontainers.image.version": "none"}},
                "Native": {"ollama": None}}
    done = subprocess.run([str(ollama), "--version"], capture_output=True, text=True)
    found = re.search(r"version is (\S+)", done.stdout + done.stderr)  # "ollama version is 0.24.0"
    version = found.group(1) if found else "unknown"
    digest = hashlib.sha256(f"{file_sha256(ollama)} {file_sha256(ENTRYPOINT)}".encode()).hexdigest()
    return {"Id": f"native:{digest}", "RepoTags": [str(ollama)],
            "Config": {"Labels": {"org.opencontainers.image.title": "ollama",
                                  "org.opencontainers.image.version": version}},
            "Native": {"ollama": str(ollama), "version": version}}


def _serve_files(config: RunConfig) -> tuple[Path, Path, Path]:
    """The native server's record (pid, key, url), its log and its ready file."""
    folder = NATIVE_DIR.resolve() / "serve"
    return folder / f"{config.run}.json", folder / f"{config.run}.log", folder / f"{config.run}.ready"


def _server_env(config: RunConfig, run_dir: Path, ollama: Path) -> dict[str, str]:
    _, _, ready_file = _serve_files(config)
    models = (layout.ARTIFACTS / ".cache" / "ollama-models").resolve()
    models.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PATH": os.pathsep.join((str(ollama.parent), os.environ.get("PATH", ""))),
            "OLLAMA_HOST": f"{config.serve.host}:{config.serve.port}", "OLLAMA_MODELS": str(models),
            "OLLAMA_NO_CLOUD": "1",
            "MODELS_FILE": str((layout.stage_dir(run_dir, "serve") / layout.MODELS_LIST).resolve()),
            "READY_FILE": str(ready_file)}


def serving(config: RunConfig) -> dict | None:
    """The record of the run's native server while its process lives, else None."""
    record_file, _, _ = _serve_files(config)
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        os.kill(record["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return record


def ready(config: RunConfig, run_dir: Path, ollama: Path) -> bool:
    """The serve image's readiness rule (`finetune-serve health`), asked of the native server."""
    done = subprocess.run(["sh", str(ENTRYPOINT.resolve()), "health"], env=_server_env(config, run_dir, ollama),
                          capture_output=True)
    return done.returncode == 0


def start(config: RunConfig, run_dir: Path, ollama: Path, key: str) -> dict:
    """Start the run's native Ollama (an old one is stopped) and wait until every listed model is created."""
    stop(config)
    record_file, log_file, ready_file = _serve_files(config)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    ready_file.unlink(missing_ok=True)
    with log_file.open("w") as log:
        process = subprocess.Popen(["sh", str(ENTRYPOINT.resolve())], env=_server_env(config, run_dir, ollama),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # its own process group: `invoke stop` ends it whole
    record = {"pid": process.pid, "key": key, "ollama": str(ollama), "log": str(log_file)}
    record_file.write_text(json.dumps(record) + "\n", encoding="utf-8")
    deadline = time.monotonic() + SERVE_WITHIN_S
    while not ready(config, run_dir, ollama):
        if process.poll() is not None or time.monotonic() > deadline:
            why = (f"exited with {process.returncode}" if process.poll() is not None
                   else f"was not ready in {SERVE_WITHIN_S} s")
            stop(config)
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
            raise NativeError(f"the native Ollama ({ollama}) {why}; its log ({log_file}) ends:\n{tail}")
        time.sleep(0.2)
    return record


def create(config: RunConfig, run_dir: Path, name: str, modelfile: str, gguf: str) -> None:
    """Create one more model in the run's native Ollama, through the entrypoint's `create`."""
    record = serving(config)
    if record is None:
        raise NativeError(f"no native Ollama serves run {config.run}: run `invoke serve` first")
    done = subprocess.run(["sh", str(ENTRYPOINT.resolve()), "create", name, modelfile, gguf], capture_output=True,
                          text=True, env=_server_env(config, run_dir, Path(record["ollama"])))
    if done.returncode != 0:
        raise NativeError(f"creating {name} in the native Ollama failed: {(done.stdout + done.stderr)[-500:]}")


def stop(config: RunConfig) -> bool:
    """Stop the run's native Ollama (its whole process group); False if none was running."""
    record_file, _, ready_file = _serve_files(config)
    record = serving(config)
    record_file.unlink(missing_ok=True)
    ready_file.unlink(missing_ok=True)
    if record is None:
        return False
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(record["pid"], sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(record["pid"], 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
    return True
