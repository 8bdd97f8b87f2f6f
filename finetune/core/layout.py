"""The names of everything a run makes, spelled once: directories, artifact file names, image tags, container,
volume and model names, the eval labels and the built-in model prefix. Nothing else spells them.

    artifacts/<run>/                      run_dir(run)
        train/  convert/  serve/  eval/   stage outputs, published whole (core/stage.py: publishing)
        .<stage>.partial/                 a stage at work; never read as output
        stamps/<stage>.json               a completed stage's cache key (host/cache.py)
        manifest.json                     the run's lineage (host/manifest.py)
    artifacts/.locks/<run>                the run lock
"""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
STAGES = ("train", "convert", "serve")

# Inside a stage container: the resolved config, the working directory (data files mount below it at their
# relative paths) and the run directory.
CONTAINER_CONFIG = "/work/run.yaml"
CONTAINER_WORK = Path("/work")
CONTAINER_RUN_DIR = "/artifacts"
HF_CACHE_VOLUME, HF_CACHE_MOUNT = "finetune-hf-cache", "/cache/hf"  # the train image's hub and tiny-model cache
MODELS_VOLUME, MODELS_MOUNT = "finetune-ollama-models", "/models"  # Ollama's model store, shared by runs
# The baseline's GGUFs by content, shared by runs: the base model converts once (finetune/convert/gguf.py).
BASE_GGUF_CACHE, BASE_GGUF_CACHE_MOUNT = ARTIFACTS / ".cache" / "base-gguf", "/cache/base-gguf"

# A base model built offline in the train image instead of downloaded.
BUILTIN_PREFIX = "builtin:"
TINY_MODEL = "builtin:tiny-llama"
BUILTIN_MODELS = (TINY_MODEL,)


def run_dir(run: str, root: Path = Path(".")) -> Path:
    return root / ARTIFACTS / run


def stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / stage


def partial_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage works until its output is complete."""
    return run_dir / f".{stage}.partial"


def lock_path(run_dir: Path) -> Path:
    """Beside the run directory, not in it: a stage that fails early leaves its run directory untouched."""
    return run_dir.parent / ".locks" / run_dir.name


def stamp_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stamps" / f"{stage}.json"


# Images for machines without a registry: the Debian base (invoke images.base) and Ollama from source.
BASE_IMAGE = "finetune-base:bookworm"
LLAMA_CPP_MODELS_DIR = "/opt/llama.cpp/models"  # in the convert image: ggml-vocab-*.gguf and templates/


def base_image(suite: str) -> str:
    """The local base of Debian `suite` (a Dockerfile whose upstream default is debian:<suite>-slim builds FROM it)."""
    return f"finetune-base:{suite}"

# Ollama releases `invoke images.ollama --release` builds from source, each with its Dockerfile: the serve
# image's (cgo, llama.cpp compiled into the Go binary) and the newest the Go module proxy serves (llama-server
# generation; its llama.cpp is not the release's, see the Dockerfile), which tests/test_serve.py runs a bundle on.
OLLAMA_RELEASES = {"0.24.0": "Dockerfile.ollama", "0.34.3": "Dockerfile.ollama-0.34"}
OLLAMA_SERVE_RELEASE = "0.24.0"
OLLAMA_NEWEST = "0.34.3"


def ollama_image(release: str) -> str:
    return f"finetune-ollama:{release}"


OLLAMA_IMAGE = ollama_image(OLLAMA_SERVE_RELEASE)
OLLAMA_PATCHES_LABEL = "finetune.ollama.patches"  # the patches of ours an Ollama image is built with (docker/ollama/)


def image_tag(stage: str) -> str:
    """The image that Dockerfile.<stage> is built as."""
    return f"finetune-{stage}:latest"


# A training node's rank and node 0's rendezvous HOST:PORT, from `invoke train` to the train container
NODE_RANK_ENV = "FINETUNE_NODE_RANK"
RENDEZVOUS_ENV = "FINETUNE_RENDEZVOUS"


def container_name(stage: str, run: str) -> str:
    """The container of a stage of a run (the serve container, finetune-serve-<run>, outlives `invoke`)."""
    return f"finetune-{stage}-{run}"


def is_builtin(model_id: str) -> bool:
    return model_id.startswith(BUILTIN_PREFIX)


# ---- train/ ----
MERGED, BASE, ADAPTER = "merged", "base", "adapter"  # the fine-tuned model, its base (for the baseline), LoRA
SUMMARY, METRICS, LOSS_PLOT = "summary.json", "metrics.jsonl", "loss.png"
INPUTS = "inputs.json"  # what a stage read: its declared config values and file digests (resume check)
CHAT_FORMAT = "chat.json"  # the chat template trained with and its family (train/, copied to convert/)


# ---- convert/ ----
def model_gguf(quant: str) -> str:
    """The fine-tuned model at one type: model-Q4_K_M.gguf, model-f16.gguf."""
    return f"model-{quant}.gguf"


def base_gguf(quant: str) -> str:
    """The base model for the baseline, at the served type."""
    return f"base-{quant}.gguf"


CONVERT_REPORT = "report.json"


# ---- serve/ ----
MODELS_LIST = "models"  # `<model name> <Modelfile> <GGUF>` per line, paths relative to serve/
MODELFILE = "Modelfile"
BASELINE_MODELFILE = "Modelfile.baseline"


def quant_modelfile(quant: str) -> str:
    return f"Modelfile.{quant}"


def gguf_from_serve(gguf: str) -> str:
    """A GGUF's path as the serve directory's Modelfiles and models list give it."""
    return f"../convert/{gguf}"


def baseline_name(model_name: str) -> str:
    """`name-baseline`, keeping an explicit :tag at the end."""
    return _suffixed(model_name, "baseline")


def quant_name(model_name: str, quant: str) -> str:
    """`name-q4_k_m`: the fine-tuned model at another type (for `invoke eval`)."""
    return _suffixed(model_name, quant.lower())


def _suffixed(model_name: str, suffix: str) -> str:
    name, sep, tag = model_name.partition(":")
    return f"{name}-{suffix}{sep}{tag}"


# ---- eval/ and bench ----
BASELINE_LABEL = "baseline"


def tuned_label(quant: str) -> str:
    """The eval's label of the fine-tuned model at one type."""
    return f"fine-tuned {quant}"


def bench_run(run: str) -> str:
    """The separate run that `invoke bench` measures, so the user's run is not touched."""
    return f"{run}-bench"


def bench_results(run: str, root: Path = Path(".")) -> Path:
    return root / ARTIFACTS / f"{run}-bench-results"
