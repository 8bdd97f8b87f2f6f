"""The serve container: Ollama serving the run's models, started, checked, asked and stopped from the host.

The container (finetune-serve-<run>, from Dockerfile.serve) mounts serve/ and convert/ read-only, keeps
Ollama's model store in the volume finetune-ollama-models and publishes the API on serve.host:serve.port
(127.0.0.1 by default). Its entrypoint (docker/serve-entrypoint.sh) is the one place that creates models
(`ollama create`): every model of serve/models at start, and another built type on demand (`create`). It is
also the one readiness rule: `finetune-serve health` (the image's HEALTHCHECK), which `ready` runs at once
instead of waiting for the check's next interval. `start` returns when the container is ready, or raises
with the container's log; `ensure_running` then has Ollama render the trained prompts (`check_prompts`).
The native runner serves with the host's `ollama` through the same entrypoint (`ensure_running_native`,
finetune/host/native.py), and the same checks.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.errors import APIError, NotFound

from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.host import containers, native
from finetune.serve.modelfiles import ListedModel, ServeError, other_quants, read_models, trained_format

CONTAINER_PORT = "11434/tcp"
ENTRYPOINT = "/usr/local/bin/finetune-serve"
HEALTHY_WITHIN_S = 300


@dataclass(frozen=True)
class Served:
    url: str
    models: list[str]
    container: str
    version: str


def container_name(config: RunConfig) -> str:
    return layout.container_name("serve", config.run)


def url(config: RunConfig) -> str:
    host = "127.0.0.1" if config.serve.host in ("0.0.0.0", "") else config.serve.host
    return f"http://{host}:{config.serve.port}"


def ensure_running(config: RunConfig, run_dir: Path, image: str, key: str) -> Served:
    """The run's serve container, healthy and serving the Modelfiles of stage key `key`: the running one when
    it already is (same key, same image), else a new one in its place, once Ollama has rendered the trained
    probe prompts identically (check_prompts; stopped otherwise)."""
    models = [m.name for m in read_models(run_dir)]
    try:
        running = containers.client().containers.get(container_name(config))
    except NotFound:
        running = None
    if (running is not None and running.labels.get("finetune.key") == key
            and running.image.id == containers.client().images.get(image).id and ready(running)):
        print(f"serve: {running.name} is up to date and healthy")
        return Served(url(config), models, running.name, ollama_version(config))
    served = start(config, run_dir, image, models, key)
    try:  # after start, not in it: `invoke bench` times start alone against a plain `ollama serve`
        compared = check_prompts(config, run_dir)
    except ServeError:
        stop(config)
        raise
    print(f"serve: Ollama renders the {compared} trained probe prompts of {config.serve.model_name} "
          "identically (convert/chat.json)", flush=True)
    return served


def ensure_running_native(config: RunConfig, run_dir: Path, ollama: Path, key: str) -> Served:
    """`ensure_running` for the native runner: the host's `ollama` serving the run's models (the running one
    when it serves stage key `key` and is ready), once it renders the trained probe prompts identically."""
    models = [m.name for m in read_models(run_dir)]
    record = native.serving(config)
    if record is not None and record["key"] == key and native.ready(config, run_dir, ollama):
        print(f"serve: the native Ollama (pid {record['pid']}) is up to date and ready")
        return Served(url(config), models, f"native, pid {record['pid']}", ollama_version(config))
    record = native.start(config, run_dir, ollama, key)
    try:
        compared = check_prompts(config, run_dir)
    except ServeError:
        native.stop(config)
        raise
    print(f"serve: Ollama renders the {compared} trained probe prompts of {config.serve.model_name} "
          "identically (convert/chat.json)", flush=True)
    return Served(url(config), models, f"native, pid {record['pid']}, log {record['log']}", ollama_version(config))


def ollama_version(config: RunConfig) -> str:
    with urllib.request.urlopen(f"{url(config)}/api/version", timeout=10) as response:
        return json.loads(response.read())["version"]


def start(config: RunConfig, run_dir: Path, image: str, models: list[str], key: str,
          volume: str = layout.MODELS_VOLUME) -> Served:
    """(Re)start the run's serve container and wait until it is ready; an old one is replaced. `volume` holds
    Ollama's model store (`invoke bench` gives it an empty one to time a cold start)."""
    stop(config)
    engine = containers.client()
    name = container_name(config)
    try:
        container = engine.containers.run(
            image, name=name, detach=True, user=f"{containers.IMAGE_UID}:{containers.IMAGE_UID}",
            ports={CONTAINER_PORT: (config.serve.host, config.serve.port)},
            volumes=volumes(run_dir, volume),
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
        if state["Status"] == "running" and health != "unhealthy" and ready(container):
            return Served(url(config), models, name, ollama_version(config))
        if state["Status"] != "running" or health == "unhealthy" or time.monotonic() > deadline:
            log = container.logs(tail=30).decode(errors="replace").rstrip()
            why = (f"exited with {state['ExitCode']}" if state["Status"] != "running"
                   else f"is {health or 'not healthy'} after {HEALTHY_WITHIN_S} s")
            stop(config)
            raise ServeError(f"{name} {why}; its log ends:\n{log}")
        time.sleep(0.2)


def check_prompts(config: RunConfig, run_dir: Path) -> int:
    """Ollama must render the probe conversations the train stage recorded (convert/chat.json) for the
    fine-tuned model exactly as its Jinja template did: asked with `_debug_render_only`, which renders the
    Modelfile's TEMPLATE without generating. A ServeError names the first difference. Returns the number
    compared. This is what holds a Go template of the user's own (model.go_template) to the trained one."""
    probes = trained_format(run_dir).get("probes", [])
    for probe in probes:
        rendered = render_only(url(config), config.serve.model_name, probe["messages"])
        if rendered != probe["go"]:
            at = next((i for i, (a, b) in enumerate(zip(rendered, probe["go"])) if a != b),
                      min(len(rendered), len(probe["go"])))
            raise ServeError(f"Ollama renders {config.serve.model_name}'s prompt differently from training: at "
                             f"character {at} Ollama has {rendered[at:at + 40]!r}, the trained template "
                             f"{probe['go'][at:at + 40]!r}. The Modelfile's TEMPLATE (model.go_template, or the "
                             "family's in finetune/core/families.py) must render what the Jinja template renders")
    return len(probes)


def render_only(base_url: str, model: str, messages: list[dict]) -> str:
    """The prompt Ollama renders for `messages` with the model's TEMPLATE (or renderer), generating nothing
    (`_debug_render_only`)."""
    body = {"model": model, "messages": messages, "stream": False, "_debug_render_only": True}
    request = urllib.request.Request(f"{base_url}/api/chat", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["_debug_info"]["rendered_template"]


def volumes(run_dir: Path, store: str = layout.MODELS_VOLUME) -> dict:
    """What a serve container mounts: the run's serve/ and convert/ read-only, where the models list's relative
    paths find them, and Ollama's model store."""
    inputs = {str(layout.stage_dir(run_dir, stage).resolve()): {"bind": f"{layout.CONTAINER_RUN_DIR}/{stage}",
                                                                "mode": "ro"} for stage in ("serve", "convert")}
    return inputs | {store: {"bind": layout.MODELS_MOUNT, "mode": "rw"}}


def ready(container) -> bool:
    """The readiness rule, the image's HEALTHCHECK asked now: `finetune-serve health` in the container, true
    once the entrypoint has created every listed model (the store is a volume shared by runs, so a model of
    the same name may exist before that) and each of them answers `ollama show`."""
    try:
        return container.exec_run([ENTRYPOINT, "health"]).exit_code == 0
    except APIError:  # not running (any more)
        return False


def create_other_quant(config: RunConfig, quant: str) -> ListedModel:
    """Create the fine-tuned model at another built type in the running serve container, through the
    entrypoint that creates the served ones; return it."""
    model = other_quants(config)[quant]
    if native.serving(config) is not None:
        try:
            native.create(config, layout.run_dir(config.run), model.name, model.modelfile, model.gguf)
        except native.NativeError as e:
            raise ServeError(str(e)) from e
        return model
    try:
        container = containers.client().containers.get(container_name(config))
    except NotFound:
        raise ServeError(f"no serve container for run {config.run}: run `invoke serve` first") from None
    done = container.exec_run([ENTRYPOINT, "create", model.name, model.modelfile, model.gguf])
    if done.exit_code != 0:
        raise ServeError(f"creating {model.name} in {container.name} failed: "
                         f"{done.output.decode(errors='replace')[-500:]}")
    return model


def stop(config: RunConfig) -> bool:
    """Stop and remove the run's serve container; False if there was none."""
    try:
        container = containers.client().containers.get(container_name(config))
    except NotFound:
        return False
    container.remove(force=True)
    return True


# Ollama cuts an answer short when the model repeats one token (spaces aside) over and over: 0.24.0 after 30
# repeats, closing the stream without its final message (no done, no timings: its llm/server.go returns
# ctx.Err(), nil); the llama-server releases (0.30+) after 100, ending the stream with this error.
REPEAT_ABORT = "token repeat limit"


def stream_chat(client, model: str, messages: list[dict], options: dict | None = None,
                on_piece: Callable[[str], object] | None = None) -> tuple[str, Any]:
    """`model`'s answer, streamed, and its final message (with done_reason and timings), or None where Ollama cut
    the answer short (REPEAT_ABORT); the text streamed until then is the answer either way."""
    import ollama

    pieces, last = [], None
    try:
        for last in client.chat(model=model, messages=messages, options=options, stream=True):
            pieces.append(last.message.content or "")
            if on_piece is not None:
                on_piece(pieces[-1])
    except ollama.ResponseError as e:
        if REPEAT_ABORT not in str(e.error):
            raise
        last = None
    return "".join(pieces), last if last is not None and last.done else None


def chat(config: RunConfig, question: str, baseline: bool = False, out=sys.stdout) -> str:
    """Ask the served model one question through the ollama client, streaming the answer to `out`."""
    import ollama

    model = layout.baseline_name(config.serve.model_name) if baseline else config.serve.model_name

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()
    try:
        answer, final = stream_chat(ollama.Client(host=url(config)), model,
                                    [{"role": "user", "content": question}], on_piece=show)
    except ollama.ResponseError as e:
        raise ServeError(f"{model} at {url(config)}: {e.error}; is it served? (`invoke serve`)") from e
    except ConnectionError as e:
        raise ServeError(f"no Ollama answers at {url(config)}: start it with `invoke serve`") from e
    out.write("\n" if final is not None else "\n(Ollama cut this answer short)\n")
    return answer
