"""tasks.py: the task list users see, each task documented, and a failing precondition worded as a fix."""

from __future__ import annotations

import pytest
import yaml
from support import ROOT, invoke


@pytest.mark.cli
def test_list_shows_every_task_with_its_docstring():
    import tasks

    names = sorted(tasks.ns.task_names)
    assert len(names) == 14 and {"train", "convert", "serve", "eval", "bench", "verify", "families", "export",
                                 "images.base"} <= set(names)
    listing = invoke("--list").stdout
    for name in names:
        line = next((x for x in listing.splitlines() if x.strip().startswith(name + " ")), "")
        assert len(line.split()) > 2, f"{name} is missing or has no docstring:\n{listing}"
    documented = tasks.__doc__
    assert [name for name in names if f"./invoke {name}" not in documented] == []  # the module's own list


@pytest.mark.cli
def test_data_task_validates_the_default_config():
    done = invoke("data")
    assert done.returncode == 0, done.stderr
    assert '"examples": 60' in done.stdout
    assert "training on the first 60 of 264 examples (data.limit)" in done.stderr


@pytest.mark.cli
def test_data_task_fails_on_bad_config_with_the_fix():
    done = invoke("data", "--set", "train.rank=0")
    assert done.returncode == 2
    assert "--set train.rank=0: train.rank: input should be greater than 0 (got 0). Fix: use a value > 0" in done.stderr


def test_ci_workflow_runs_only_commands_the_readme_documents():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "pipeline.yml").read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    assert commands, "the workflow runs nothing"
    for command in commands:
        for part in command.split(" && "):
            assert part in readme, f"{part!r} is run by CI but not documented in README.md"


def context(local_base) -> "invoke.Context":  # noqa: F821
    from invoke import Config, Context

    import tasks

    config = Config(defaults=tasks.ns.configuration())
    config.finetune.local_base = local_base
    return Context(config)


def test_without_a_registry_the_local_base_is_chosen_and_said_in_one_line(monkeypatch, capsys):
    import tasks

    asked = []
    monkeypatch.setattr(tasks, "_cannot_pull", {})
    monkeypatch.setattr(tasks.containers, "cannot_pull", lambda image: asked.append(image) or "docker.io did not answer")
    assert tasks.local_base_reason(context("auto"), "train") == "cannot pull nvidia/cuda:13.0.2-base-ubuntu24.04"
    assert capsys.readouterr().err == ("train: cannot pull nvidia/cuda:13.0.2-base-ubuntu24.04 (docker.io did not "
                                       "answer); building FROM the local base instead (INVOKE_FINETUNE_LOCAL_BASE=1 "
                                       "or 0 forces either way)\n")
    assert tasks.local_base_reason(context("auto"), "serve") == "cannot pull ollama/ollama:0.24.0"
    assert "building Ollama from source instead" in capsys.readouterr().err
    assert tasks.local_base_reason(context("1"), "train") == "finetune.local_base is set"
    assert tasks.local_base_reason(context(True), "convert") == "finetune.local_base is set"
    assert tasks.local_base_reason(context("0"), "train") is None
    assert tasks.local_base_reason(context("auto"), "train") == "cannot pull nvidia/cuda:13.0.2-base-ubuntu24.04"
    assert capsys.readouterr().err == "", "said once"
    assert asked == ["nvidia/cuda:13.0.2-base-ubuntu24.04", "ollama/ollama:0.24.0"], "asked once; forced: not at all"


def test_neither_a_registry_nor_a_local_base_names_both_and_the_fixes(monkeypatch):
    """The neighbours (the registry probe, debootstrap) stand in; the wording is the task's own."""
    import pytest
    from invoke import Exit

    import tasks
    from finetune.host.containers import ContainerError

    def no_debootstrap(tag, mirror, suite):
        raise ContainerError("debootstrap is not installed: `sudo apt-get install -y debootstrap`")

    monkeypatch.setattr(tasks, "_cannot_pull", {})
    monkeypatch.setattr(tasks.containers, "cannot_pull", lambda image: "docker.io did not answer")
    monkeypatch.setattr(tasks.containers, "image_exists", lambda tag: False)
    monkeypatch.setattr(tasks.baseimage, "build_base", no_debootstrap)
    with pytest.raises(Exit) as failed:
        tasks.stage_image(context("auto"), "train")
    assert failed.value.message.startswith(
        "train: cannot pull nvidia/cuda:13.0.2-base-ubuntu24.04, and the local base cannot be built either: "
        "images.base: debootstrap is not installed: `sudo apt-get install -y debootstrap`\nFix one of them: make the "
        "registry reachable for the Docker engine, or build the local base as root (`sudo ./invoke images.base`")


def test_each_dockerfile_gets_the_local_base_of_its_debian_suite():
    import tasks

    assert tasks.base_suite("Dockerfile.convert") == "trixie"  # Debian's CPU torch
    assert tasks.base_suite("Dockerfile.train") == "bookworm"  # upstream is a CUDA image
    assert tasks.base_suite("Dockerfile.ollama") == "bookworm"
    assert tasks.base_tag(context("auto"), "trixie") == "finetune-base:trixie"
    assert tasks.base_tag(context("auto"), "bookworm") == tasks.baseimage.DEFAULT_TAG


def test_an_ollama_image_built_without_the_patches_its_dockerfile_names_is_rebuilt(monkeypatch, capsys):
    import tasks

    label = tasks.layout.OLLAMA_PATCHES_LABEL
    assert tasks.containers.dockerfile_label("Dockerfile.ollama", label) == "threadpool.patch"
    assert (ROOT / "docker" / "ollama" / "threadpool.patch").is_file()

    labels = {"finetune.ollama.cpu_flags": "-mavx2"}  # an image built before the patch
    built = []
    monkeypatch.setattr(tasks.containers, "image_labels", lambda tag: labels)
    monkeypatch.setattr(tasks, "base", lambda c: None)
    monkeypatch.setattr(tasks.containers, "build", lambda dockerfile, tag, args: built.append((dockerfile, tag)))
    tasks.ollama(context("auto"))
    assert built == [("Dockerfile.ollama", "finetune-ollama:0.24.0")]
    assert "rebuilding finetune-ollama:0.24.0: it has the patches (none), Dockerfile.ollama threadpool.patch" \
        in capsys.readouterr().out
    labels = {"finetune.ollama.patches": "threadpool.patch"}
    tasks.ollama(context("auto"))
    assert len(built) == 1 and "exists (use --force to rebuild)" in capsys.readouterr().out


def test_an_unknown_local_base_setting_is_refused_with_the_choices():
    import pytest
    from invoke import Exit

    import tasks

    with pytest.raises(Exit, match="finetune.local_base='maybe': use auto, 1"):
        tasks.local_base_reason(context("maybe"), "train")


def test_the_run_each_task_of_a_command_line_gets_is_read_as_invoke_hands_it_out():
    import tasks

    asked = tasks.runs_asked(["train", "-c", "configs/a.yaml", "convert", "--set", "train.rank=8", "serve",
                              "--set=run=x", "--set", "serve.port=1", "chat", "train? no"])
    assert asked == {"train": ("configs/a.yaml", None), "convert": (None, None), "serve": (None, "x"),
                     "chat": (None, None)}
    tasks.check_one_run(["train", "--set", "run=x", "convert", "--set", "run=x", "--set", "convert.imatrix=true"])
    tasks.check_one_run(["convert", "serve", "--set", "serve.port=11535"])  # other keys may differ per task


@pytest.mark.cli
def test_set_after_the_last_task_only_is_refused_before_any_work():
    """`./invoke train convert --set run=x` would train the default run and convert run x."""
    done = invoke("train", "convert", "--set", "run=test-one-run")
    assert done.returncode == 2
    assert ("these tasks would work on different runs (train: --config (default), run (the config's); convert: "
            "--config (default), run test-one-run)") in done.stderr
    assert "`./invoke train --set run=x convert --set run=x serve --set run=x`" in done.stderr
    assert not (ROOT / "artifacts" / "test-one-run").exists() and "building" not in done.stderr
