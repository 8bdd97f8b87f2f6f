"""The serve stage: Modelfiles for the run's GGUFs, and the Ollama container that serves them.

Runs on the host (`invoke serve`); Ollama itself runs in the serve image. Writes artifacts/<run>/serve/:
    Modelfile           the fine-tuned model: FROM ../convert/model-<serve.quant>.gguf, the training chat
                        template, its stop tokens, SYSTEM and the sampling parameters
    Modelfile.baseline  when serve.baseline: the base model with the same SYSTEM plus the few-shot turns
                        (MESSAGE): the prompt engineering to try before fine-tuning
    Modelfile.<QUANT>   the fine-tuned model at each other built type; `invoke eval` creates them on demand
    models              `<model name> <Modelfile> <GGUF>` per line (paths relative to serve/): what the container
                        creates at start. The GGUF travels here, beside the Modelfile, so that nothing reads a
                        path back out of Modelfile text (a SYSTEM line may well begin with "FROM ").
The Modelfiles work outside the container too: `cd artifacts/<run>/serve && ollama create NAME -f Modelfile`.

The container (finetune-serve-<run>) mounts serve/ and convert/ read-only, keeps Ollama's model store in
the volume finetune-ollama-models, publishes the API on serve.host:serve.port (127.0.0.1 by default) and
reports healthy once every model exists. `start` returns as soon as every model answers, or raises with the
container's log.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from docker.errors import APIError, NotFound

from finetune import containers, modelfile
from finetune.config import RunConfig
from finetune.stage import publishing

CONTAINER_PORT = "11434/tcp"
MODELS_VOLUME = "finetune-ollama-models"
HEALTHY_WITHIN_S = 300


class ServeError(RuntimeError):
    """A missing input or a container that did not become healthy; the message says what to do."""


@dataclass(frozen=True)
class Served:
    url: str
    models: list[str]
    container: str
    version: str


def container_name(config: RunConfig) -> str:
    return f"finetune-serve-{config.run}"


def baseline_name(model_name: str) -> str:
    """`name-baseline`, keeping an explicit :tag at the end."""
    return suffixed(model_name, "baseline")


def quant_name(model_name: str, quant: str) -> str:
    """`name-q4_k_m`: the fine-tuned model at another quant type (for `invoke eval`)."""
    return suffixed(model_name, quant.lower())


def suffixed(model_name: str, suffix: str) -> str:
    name, sep, tag = model_name.partition(":")
    return f"{name}-{suffix}{sep}{tag}"


def other_quants(config: RunConfig) -> dict[str, str]:
    """{quant type: Modelfile name} for every built type besides the served one; written, not created."""
    built = [config.convert.outtype, *config.convert.quant_types]
    return {q: f"Modelfile.{q}" for q in dict.fromkeys(built) if q != config.serve.quant}


def url(config: RunConfig) -> str:
    host = "127.0.0.1" if config.serve.host in ("0.0.0.0", "") else config.serve.host
    return f"http://{host}:{config.serve.port}"


def planned_models(config: RunConfig) -> dict[str, tuple[str, str, list[modelfile.Turn]]]:
    """{model name: (Modelfile name, GGUF name, few-shot turns)} for the run."""
    quant = config.serve.quant
    models = {config.serve.model_name: ("Modelfile", f"model-{quant}.gguf", [])}
    if config.serve.baseline:
        models[baseline_name(config.serve.model_name)] = ("Modelfile.baseline", f"base-{quant}.gguf",
                                                          modelfile.few_shot_turns(config))
    return models


def check_inputs(config: RunConfig, run_dir: Path) -> None:
    """Raise ServeError, with the fix, when a GGUF to serve is missing."""
    convert = run_dir / "convert"
    missing = [gguf for _, gguf, _ in planned_models(config).values() if not (convert / gguf).is_file()]
    if missing:
        raise ServeError(f"no {' or '.join(missing)} in {convert}: run `invoke convert` first (serve.quant="
                         f"{config.serve.quant} must be among the types it builds; the base GGUF is built when "
                         "serve.baseline is true)")


def write_modelfiles(config: RunConfig, run_dir: Path) -> Path:
    """Write run_dir/serve/ (see the module docstring) from the convert stage's GGUFs; return the directory."""
    check_inputs(config, run_dir)
    models = planned_models(config)
    final = run_dir / "serve"
    with publishing(run_dir / ".serve.partial", final) as work:
        for name, (file, gguf, turns) in models.items():
            (work / file).write_text(modelfile.render(f"../convert/{gguf}", config, turns), encoding="utf-8")
        for quant, file in other_quants(config).items():
            (work / file).write_text(modelfile.render(f"../convert/model-{quant}.gguf", config), encoding="utf-8")
        (work / "models").write_text("".join(f"{name} {file} ../convert/{gguf}\n"
                                             for name, (file, gguf, _) in models.items()))
        for path in work.iterdir():
            path.chmod(0o644)  # readable by the container's user
    return final


@dataclass(frozen=True)
class ListedModel:
    """One line of serve/models: a model the container creates, its Modelfile and its GGUF (relative paths)."""

    name: str
    modelfile: str
    gguf: str


def read_models(run_dir: Path) -> list[ListedModel]:
    """The models that run_dir/serve/models lists (written by write_modelfiles)."""
    text = (run_dir / "serve" / "models").read_text(encoding="utf-8")
    return [ListedModel(*line.split(" ")) for line in text.splitlines() if line.strip()]


def ensure_running(config: RunConfig, run_dir: Path, image: str, key: str) -> Served:
    """The run's serve container, healthy and serving the Modelfiles of stage key `key`: the running one when
    it already is (same key, same image), else a new one in its place."""
    models = [m.name for m in read_models(run_dir)]
    try:
        running = containers.client().containers.get(container_name(config))
    except NotFound:
        running = None
    if (running is not None and running.labels.get("finetune.key") == key
            and running.image.id == containers.client().images.get(image).id and ready(running, config, models)):
        print(f"serve: {running.name} is up to date and healthy")
        return Served(url(config), models, running.name, ollama_version(config))
    return start(config, run_dir, image, models, key)


def ollama_version(config: RunConfig) -> str:
    with urllib.request.urlopen(f"{url(config)}/api/version", timeout=10) as response:
        return json.loads(response.read())["version"]


def start(config: RunConfig, run_dir: Path, image: str, models: list[str], key: str,
          volume: str = MODELS_VOLUME) -> Served:
    """(Re)start the run's serve container and wait until its models exist; an old one is replaced.
    `volume` holds Ollama's model store (`invoke bench` gives it an empty one to time a cold start)."""
    stop(config)
    engine = containers.client()
    name = container_name(config)
    try:
        container = engine.containers.run(
            image, name=name, detach=True, user=f"{containers.IMAGE_UID}:{containers.IMAGE_UID}",
            ports={CONTAINER_PORT: (config.serve.host, config.serve.port)},
            volumes={str((run_dir / "serve").resolve()): {"bind": "/artifacts/serve", "mode": "ro"},
                     str((run_dir / "convert").resolve()): {"bind": "/artifacts/convert", "mode": "ro"},
                     volume: {"bind": "/models", "mode": "rw"}},
            labels={"finetune.run": config.run, "finetune.key": key})
    except APIError as e:
        stop(config)
        hint = (f"; another server holds port {config.serve.port}: `invoke stop` for its run, or set serve.port"
                if "port is already allocated" in str(e) or "address already in use" in str(e) else "")
        raise ServeError(f"cannot start {name} from {image}: {e.explanation or e}{hint}") from e
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    while True:
        container.reload()
        state = container.attrs["State"]
        health = (state.get("Health") or {}).get("Status")
        if ready(container, config, models):
            return Served(url(config), models, name, ollama_version(config))
        if state["Status"] != "running" or health == "unhealthy" or time.monotonic() > deadline:
            log = container.logs(tail=30).decode(errors="replace").rstrip()
            why = (f"exited with {state['ExitCode']}" if state["Status"] != "running"
                   else f"is {health or 'not healthy'} after {HEALTHY_WITHIN_S} s")
            stop(config)
            raise ServeError(f"{name} {why}; its log ends:\n{log}")
        time.sleep(0.1)


def ready(container, config: RunConfig, models: list[str]) -> bool:
    """Whether the serve container has created its models and they answer: what its HEALTHCHECK checks, asked
    now rather than at the check's next interval (2 s; Docker 20.10 has no faster start interval). The
    entrypoint logs `serve: ready:` after its last create; until then a model of the same name may answer
    from the store, which is a volume shared by runs."""
    state = container.attrs["State"]
    return (state["Status"] == "running" and (state.get("Health") or {}).get("Status") != "unhealthy"
            and b"serve: ready:" in container.logs() and models_answer(config, models))


def models_answer(config: RunConfig, models: list[str]) -> bool:
    """Whether the server answers and has every model."""
    for model in models:
        request = urllib.request.Request(f"{url(config)}/api/show", data=json.dumps({"model": model}).encode(),
                                         method="POST")
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except OSError:  # refused while Ollama starts; 404 until the model is created
            return False
    return True


def stop(config: RunConfig) -> bool:
    """Stop and remove the run's serve container; False if there was none."""
    try:
        container = containers.client().containers.get(container_name(config))
    except NotFound:
        return False
    container.remove(force=True)
    return True


def chat(config: RunConfig, question: str, baseline: bool = False, out=sys.stdout) -> str:
    """Ask the served model one question through the ollama client, streaming the answer to `out`."""
    import ollama

    model = baseline_name(config.serve.model_name) if baseline else config.serve.model_name
    answer = []
    try:
        for part in ollama.Client(host=url(config)).chat(model=model, stream=True,
                                                         messages=[{"role": "user", "content": question}]):
            piece = part["message"]["content"]
            answer.append(piece)
            out.write(piece)
            out.flush()
    except ollama.ResponseError as e:
        raise ServeError(f"{model} at {url(config)}: {e.error}; is it served? (`invoke serve`)") from e
    except ConnectionError as e:
        raise ServeError(f"no Ollama answers at {url(config)}: start it with `invoke serve`") from e
    out.write("\n")
    return "".join(answer)
