"""invoke tasks: check the data, build the stage images, run the stages. Orchestration only: the stage
code lives in the `finetune` package and runs inside the images.

    ./invoke --list                  # what there is
    ./invoke data                    # validate the dataset of the default config
    ./invoke images.base             # a local Debian base image, for machines without a registry
    ./invoke test                    # the test suite, as CI runs it

Defaults live in one place (`ns.configure` below) and can be changed in invoke.yaml or with environment
variables, e.g. INVOKE_FINETUNE_CONFIG=configs/qwen2.5-3b-ja-qlora.yaml, INVOKE_FINETUNE_LOCAL_BASE=1.
"""

from __future__ import annotations

import sys

from invoke import Collection, Context, Exit, task

from finetune import baseimage, containers
from finetune import data as data_stage

CONFIG_HELP = "run config (YAML); default: finetune.config (configs/tiny-ja.yaml)"
SET_HELP = "override one key, e.g. --set train.max_steps=20 (repeatable)"


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP,
                               "tokenizer": "tokenizer.json to report lengths in tokens and check max_seq_len"})
def data(c: Context, config: str | None = None, set_: list[str] | None = None, tokenizer: str | None = None) -> None:
    """Validate the config's dataset and print its stats; every bad line is reported, nothing is written."""
    argv = ["--config", config or c.finetune.config, *(f"--set={s}" for s in set_ or [])]
    argv += ["--tokenizer", tokenizer] if tokenizer else []
    if (code := data_stage.main(argv)) != 0:
        raise Exit(code=code)


@task(help={"tag": "image tag (default: finetune.base_image)", "mirror": "Debian archive URL (default: the host's)",
            "force": "rebuild even if the image exists"})
def base(c: Context, tag: str | None = None, mirror: str | None = None, force: bool = False) -> None:
    """Build a Debian bookworm base image from distro packages (debootstrap + docker import), as root."""
    tag = tag or c.finetune.base_image
    try:
        if containers.image_exists(tag) and not force:
            print(f"images.base: {tag} exists (use --force to rebuild)")
            return
        print(f"images.base: {tag} {baseimage.build_base(tag, mirror)}")
    except containers.ContainerError as e:
        raise Exit(f"images.base: {e}") from e


@task(help={"k": "only tests matching this expression (pytest -k)", "m": "marker expression (pytest -m)"})
def test(c: Context, k: str | None = None, m: str | None = None) -> None:
    """Run the test suite (unit tests and the docker-marked tests that build and run real images)."""
    args = (f" -k {k!r}" if k else "") + (f" -m {m!r}" if m else "")
    c.run(f"{sys.executable} -m pytest{args}", pty=False)


images = Collection("images", base)
ns = Collection(data, test, images)
ns.configure({
    "finetune": {
        "config": "configs/tiny-ja.yaml",
        "base_image": baseimage.DEFAULT_TAG,
        # Build every stage image FROM base_image (made by images.base) instead of its upstream default;
        # for machines that cannot reach a container registry, such as CI here.
        "local_base": False,
    },
})
