"""Stage images and containers: build an image with BuildKit, run a stage container with its volumes.

Builds go through the docker CLI because they need BuildKit (cache mounts for pip, a secret mount for a
TLS-proxy CA bundle); running, inspecting and removing containers goes through the docker SDK.
Containers run as a non-root user: the invoking user's uid:gid, so the files a stage writes into
artifacts/ belong to whoever ran `invoke`, or IMAGE_UID when `invoke` itself runs as root.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

from finetune.core import layout
from finetune.core.config import RunConfig

IMAGE_UID = 10001  # the non-root user every stage image creates (useradd --uid 10001 app)
CA_SECRET_ID = "ca_bundle"  # Dockerfiles read it at /run/secrets/ca_bundle, for one RUN only
BUILD_LOGS = ".build-logs"  # under the build context; the full output of the last build of each image


class ContainerError(RuntimeError):
    """A Docker engine, build or container problem, worded for the person at the terminal."""


@dataclass(frozen=True)
class Mount:
    """A host directory mounted into a stage container; inputs are read-only."""

    host: Path
    container: str
    read_only: bool = True


def data_mounts(config: RunConfig) -> list[Mount]:
    """The local files a config names, read-only, at the same relative paths under the container's /work:
    the data files, and the base model's directory and the chat template file when they are local."""
    paths = [Path(p) for p in (config.data.train, config.data.eval) if p]
    paths += [Path(p) for p in (config.model.id, config.model.chat_template, config.model.go_template)
              if p and Path(p).exists()]
    return [Mount(p, str(p if p.is_absolute() else layout.CONTAINER_WORK / p)) for p in paths]


def client() -> docker.DockerClient:
    """A docker SDK client whose engine answers, or a ContainerError that says how to start one."""
    try:
        engine = docker.from_env()
        engine.ping()
    except DockerException as e:
        raise ContainerError(f"no Docker engine answers ({e}); start one (`sudo systemctl start docker`, "
                             "or `sudo dockerd &` where there is no systemd) and run again") from e
    return engine


def image_exists(tag: str) -> bool:
    return image_labels(tag) is not None


def image_labels(tag: str) -> dict[str, str] | None:
    """The labels of a local image (empty when it has none), or None when there is no such image."""
    try:
        return client().images.get(tag).labels or {}
    except ImageNotFound:
        return None


def dockerfile_default(dockerfile: str | Path, arg: str) -> str:
    """The default value of `ARG <arg>=...` in a Dockerfile: the upstream base image it pins."""
    for line in Path(dockerfile).read_text(encoding="utf-8").splitlines():
        name, _, value = line.removeprefix("ARG ").partition("=")
        if line.startswith("ARG ") and name.strip() == arg and value:
            return value.strip()
    raise ContainerError(f"{dockerfile} has no `ARG {arg}=<image>` default")


def dockerfile_label(dockerfile: str | Path, name: str) -> str:
    """The value a Dockerfile's LABEL instruction gives `name` (`name="value"` on a LABEL line or its
    continuation), or "" where it sets none."""
    found = re.search(rf'^\s*(?:LABEL\s+)?{re.escape(name)}="([^"]*)"', Path(dockerfile).read_text(encoding="utf-8"),
                      re.M)
    return found.group(1) if found else ""


_unreachable: dict[str, str] = {}  # registry -> why it did not answer, once per process


def cannot_pull(image: str, timeout_s: float = 10) -> str | None:
    """None when `image` is here or its registry answers for it within `timeout_s`; else why it cannot be
    pulled, in a few words. Asks the engine for the image's manifest only (no layers are downloaded), so the
    engine's own mirrors, proxy and credentials count; a registry that failed once is not asked again."""
    if image_exists(image):
        return None
    first = image.split("/", 1)[0]
    registry = first if "/" in image and ("." in first or ":" in first) else "docker.io"
    if registry in _unreachable:
        return _unreachable[registry]
    try:
        docker.from_env(timeout=timeout_s).api.inspect_distribution(image)
    except DockerException as e:
        why = ": ".join((getattr(e, "explanation", None) or str(e)).strip().split(": ")[-2:])  # the gist, at the end
        _unreachable[registry] = f"{registry} did not answer: {why[-160:]}"
        return _unreachable[registry]
    except OSError as e:  # a timeout or a refused connection below the SDK (requests raises OSErrors)
        _unreachable[registry] = f"{registry} did not answer within {timeout_s:.0f} s ({type(e).__name__})"
        return _unreachable[registry]
    return None


@functools.cache
def buildkit_cli() -> list[str]:
    """The command prefix of a docker CLI that builds with BuildKit (asked once per process).

    `docker buildx build --load` where the buildx plugin is installed; otherwise a pre-23 client (such as
    Debian's docker.io) whose classic `docker build` uses BuildKit when DOCKER_BUILDKIT=1 is set.
    """
    candidates = dict.fromkeys(p for p in (shutil.which("docker"), "/usr/bin/docker") if p and os.path.exists(p))
    for cli in candidates:
        if subprocess.run([cli, "buildx", "version"], capture_output=True).returncode == 0:
            return [cli, "buildx", "build", "--load"]
    for cli in candidates:  # "Docker version 20.10.24+dfsg1, build 297e128": the client's, no engine asked
        probe = subprocess.run([cli, "--version"], capture_output=True, text=True)
        major = re.search(r"version (\d+)\.", probe.stdout)
        if major and int(major.group(1)) < 23:
            return [cli, "build"]
    raise ContainerError("no docker CLI here can build with BuildKit: install the buildx plugin "
                         "(docker-buildx-plugin) or Debian's docker.io client, then run again")


def ca_bundle() -> Path | None:
    """The CA bundle of a TLS-intercepting proxy, if the host names one (PIP_CERT, then SSL_CERT_FILE)."""
    for var in ("PIP_CERT", "SSL_CERT_FILE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    return None


def build(dockerfile: str, tag: str, build_args: Mapping[str, str] | None = None, context: str = ".") -> str:
    """Build `dockerfile` as `tag` and return the image id.

    A host CA bundle is passed as the BuildKit secret CA_SECRET_ID: it is mounted for the RUN steps that
    download, and never stored in a layer. The layer cache makes an unchanged rebuild take seconds.
    """
    command = [*buildkit_cli(), "--file", dockerfile, "--tag", tag]
    for key, value in (build_args or {}).items():
        command += ["--build-arg", f"{key}={value}"]
    if (bundle := ca_bundle()) is not None:
        command += ["--secret", f"id={CA_SECRET_ID},src={bundle}"]
    command.append(context)
    log = Path(context, BUILD_LOGS, f"{tag.replace(':', '_').replace('/', '_')}.log")
    log.parent.mkdir(exist_ok=True)
    print(f"building {tag} from {dockerfile} (log: {log}; a first build downloads and compiles for minutes)",
          file=sys.stderr, flush=True)
    with log.open("w") as out:
        done = subprocess.run(command, env={**os.environ, "DOCKER_BUILDKIT": "1"}, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise ContainerError(f"building {tag} from {dockerfile} failed (exit {done.returncode}); "
                             f"the end of {log}:\n{tail}")
    return client().images.get(tag).id


def container_user() -> str:
    """uid:gid a stage runs as: the invoking user's, or the images' non-root user when that is root."""
    uid = os.getuid()
    return f"{uid}:{os.getgid()}" if uid != 0 else f"{IMAGE_UID}:{IMAGE_UID}"


def has_gpu() -> bool:
    """Whether the engine can give containers NVIDIA GPUs (the nvidia runtime is registered)."""
    return "nvidia" in (client().info().get("Runtimes") or {})


def run(image: str, command: Sequence[str], mounts: Sequence[Mount] = (), env: Mapping[str, str] | None = None,
        user: str | None = None, gpus: bool = False, workdir: str | None = None, name: str | None = None,
        named_volumes: Mapping[str, str] | None = None, entrypoint: Sequence[str] | None = None,
        network: str | None = None) -> int:
    """Run a stage container to completion, streaming its output; return its exit code.

    Writable mounts are created on the host first and, when `invoke` runs as root, handed to the
    container's user so that it can write there. `named_volumes` maps docker volume names to container
    paths (caches that outlive runs). A `name` makes a second run of the same stage fail instead of
    racing the first. `entrypoint` replaces the image's. `network` (a Docker network, or "host") is for a
    training node that other machines reach. The container is removed afterwards, also on Ctrl-C.
    """
    user = user or container_user()
    uid, gid = (int(x) for x in user.split(":"))
    for m in mounts:
        if not m.read_only:
            m.host.mkdir(parents=True, exist_ok=True)
            if os.getuid() == 0:
                os.chown(m.host, uid, gid)
    volumes = {str(m.host.resolve()): {"bind": m.container, "mode": "ro" if m.read_only else "rw"} for m in mounts}
    volumes |= {volume: {"bind": path, "mode": "rw"} for volume, path in (named_volumes or {}).items()}
    requests = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpus else None
    try:
        container = client().containers.run(
            image, list(command), user=user, volumes=volumes, environment=dict(env or {}), device_requests=requests,
            working_dir=workdir, name=name, detach=True, entrypoint=list(entrypoint) if entrypoint else None,
            security_opt=["no-new-privileges"], cap_drop=["ALL"], network=network,
        )
    except docker.errors.APIError as e:
        if e.status_code == 409:
            raise ContainerError(f"container {name} is already running: another invoke works on this run; "
                                 f"wait for it or stop it (`docker rm -f {name}`)") from e
        raise ContainerError(f"cannot start {image}: {e.explanation or e}") from e
    # `kill` (SIGTERM) of invoke must not leave the stage running on its own: exit through the finally.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if on_main_thread else None
    try:
        for chunk in container.logs(stream=True, follow=True):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)
