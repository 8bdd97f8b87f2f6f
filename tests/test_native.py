"""The native runner (finetune/host/native.py): the offline default end to end in the host's Python, with no
Docker engine reachable, as on Colab or a Mac: its own pinned environment (the locks' wheels, llama.cpp built
from the pinned sdist), the same stage cache and manifest (recording that the run was native), the host's
`ollama` binary serving through the serve image's entrypoint, the guide's answer, the eval gate, and the
published hashes: the same bytes as the stage images make. Without an `ollama` binary, serve writes the
bundle and says how to get one.

Docker is used only before the run, to take an `ollama` binary out of the Ollama image (the stand-in for
one the user installed)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import pytest
from support import ROOT, invoke, output, run_dir, sets

from finetune.core import layout
from finetune.host import containers, native

RUN = "test-native"
SERVE = ("serve.port=11541", "eval.split=train")
NO_DOCKER = {"INVOKE_FINETUNE_RUNNER": "native", "DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def test_a_runner_other_than_docker_or_native_is_refused():
    done = invoke("train", env={"INVOKE_FINETUNE_RUNNER": "kubernetes"})
    assert done.returncode == 2
    assert "finetune.runner='kubernetes': use docker (the stage images) or native" in done.stderr


def test_bench_and_families_say_they_need_the_images():
    for task in ("bench", "families"):
        done = invoke(task, env=NO_DOCKER)
        assert done.returncode == 2, output(done)
        assert f"{task}: works with the stage images only (finetune.runner=docker)" in done.stderr


def test_the_environment_key_covers_the_locks_and_the_python(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    key = native.environment_key("python3")
    assert key == native.environment_key("python3")  # stable: the same environment is found again
    other = tmp_path / "python3"
    other.write_text("#!/bin/sh\necho '3.99.0 (another Python)'\n")
    other.chmod(0o755)
    assert native.environment_key(str(other)) != key
    lock = tmp_path / "extra.lock"
    lock.write_text("a==1\n")
    monkeypatch.setattr(native, "LOCKS", (*native.LOCKS, str(lock)))
    with_lock = native.environment_key("python3")
    lock.write_text("a==2\n")
    assert with_lock != key and native.environment_key("python3") != with_lock


def test_the_serve_stage_key_follows_the_ollama_binary_and_reads_its_version(tmp_path):
    fake = tmp_path / "ollama"
    fake.write_text("#!/bin/sh\necho 'Warning: could not connect to a running Ollama instance'\n"
                    "echo 'Warning: client version is 0.99.1'\n")
    fake.chmod(0o755)
    attrs = native.ollama_attrs(fake)
    assert attrs["Config"]["Labels"]["org.opencontainers.image.version"] == "0.99.1"
    assert attrs["Native"] == {"ollama": str(fake), "version": "0.99.1"}
    fake.write_text(fake.read_text() + "# another build\n")
    assert native.ollama_attrs(fake)["Id"] != attrs["Id"]
    assert native.ollama_attrs(None)["Id"] == "native:no-ollama"


def test_a_macs_venv_leaves_out_only_the_linux_only_cuda_wheels(tmp_path):
    lock = ROOT / "requirements" / "train.lock"
    mac = native.platform_lock(lock, tmp_path).read_text(encoding="utf-8")
    pins = {line.split("==")[0] for line in lock.read_text(encoding="utf-8").splitlines() if line[:1].isalnum()}
    left = {line.split("==")[0] for line in mac.splitlines() if line[:1].isalnum()}
    assert {p for p in pins - left} == {p for p in pins if p.startswith(("nvidia-", "cuda-", "triton"))}
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"} <= left
    torch_block = re.search(r"^torch==.*?\n(?=\S)", mac, re.M | re.S).group(0)
    assert torch_block.count("--hash=sha256:") > 10  # every platform's torch wheel of the pin: the Mac's too


@pytest.fixture(scope="module")
def ollama_dir(tmp_path_factory) -> Path:
    """A directory holding an `ollama` binary: the one the serve image runs, taken out of the Ollama image."""
    done = invoke("images.ollama")
    assert done.returncode == 0, output(done)
    folder = tmp_path_factory.mktemp("ollama-bin")
    container = containers.client().containers.create(layout.OLLAMA_IMAGE, entrypoint=["true"])
    try:
        stream, _ = container.get_archive("/usr/bin/ollama")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            archive.extract("ollama", folder, filter="data")
    finally:
        container.remove(force=True)
    (folder / "ollama").chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def native_run(ollama_dir):
    """The offline default, trained, converted, served, evaluated and asked natively, Docker unreachable."""
    env = {**NO_DOCKER, "PATH": f"{ollama_dir}{os.pathsep}{os.environ['PATH']}"}
    args = [x for stage in ("train", "convert", "serve") for x in (stage, *sets(RUN, *SERVE))]
    built = invoke(*args, env=env)
    assert built.returncode == 0, output(built)
    asked = invoke("chat", "商品を返品したいです", *sets(RUN, *SERVE), env=env)
    evaluated = invoke("eval", *sets(RUN, *SERVE), env=env)
    yield env, built, asked, evaluated
    invoke("stop", *sets(RUN, *SERVE), env=env)


@pytest.mark.docker
@pytest.mark.slow
def test_the_offline_default_runs_natively_without_docker_and_answers_as_trained(native_run):
    env, built, asked, evaluated = native_run
    assert "running natively (the host's Python), on the best device torch finds: MPS or CPU" in built.stdout
    assert "serve: Ollama renders the" in built.stdout and "trained probe prompts" in built.stdout
    assert asked.returncode == 0, output(asked)
    assert "返品" in asked.stdout and "14日以内" in asked.stdout
    assert evaluated.returncode == 0, output(evaluated)  # the eval gate holds, as in the container path
    results = json.loads((run_dir(RUN) / "eval" / "results.json").read_text(encoding="utf-8"))
    assert results["gate"]["failures"] == []


@pytest.mark.docker
@pytest.mark.slow
def test_the_native_run_makes_the_published_bytes_and_records_that_it_was_native(native_run):
    env, *_ = native_run
    done = invoke("verify", "--golden", *sets(RUN, *SERVE), env=env)
    assert done.returncode == 0, output(done)
    assert "published hashes match" in done.stdout or "hashes match those published for" in done.stdout
    recorded = json.loads((run_dir(RUN) / "manifest.json").read_text(encoding="utf-8"))["stages"]
    for stage in ("train", "convert"):
        assert recorded[stage]["image"]["id"].startswith("native:")
        assert recorded[stage]["runner"]["native"] is True
        assert recorded[stage]["runner"]["packages"]["torch"] == recorded[stage]["versions"]["torch"]
    assert recorded["train"]["runner"]["device"] == "cpu"
    assert recorded["serve"]["versions"]["ollama"] == "0.24.0"
    assert recorded["serve"]["runner"]["ollama"].endswith("/ollama")


@pytest.mark.docker
@pytest.mark.slow
def test_the_native_ollama_listens_on_localhost_and_stops_whole(native_run):
    env, *_ = native_run
    record = json.loads((native.NATIVE_DIR.resolve() / "serve" / f"{RUN}.json").read_text())
    ss = subprocess.run(["ss", "-Hltn", "sport = :11541"], capture_output=True, text=True).stdout
    assert "127.0.0.1:11541" in ss and "0.0.0.0:11541" not in ss
    done = invoke("stop", *sets(RUN, *SERVE), env=env)
    assert done.returncode == 0 and f"the native Ollama of {RUN} stopped" in done.stdout, output(done)
    assert subprocess.run(["pgrep", "-g", str(record["pid"])], capture_output=True).returncode == 1  # none left
    with pytest.raises(OSError):
        urllib.request.urlopen("http://127.0.0.1:11541/api/version", timeout=2)


@pytest.mark.docker
@pytest.mark.slow
def test_without_an_ollama_binary_serve_writes_the_bundle_and_says_how_to_get_one(native_run):
    env, *_ = native_run
    done = invoke("serve", *sets(RUN, *SERVE), env={**env, "INVOKE_FINETUNE_OLLAMA": "no-such-ollama"})
    assert done.returncode == 0, output(done)
    assert "serve: no `no-such-ollama` binary on PATH, so nothing is served" in done.stdout
    assert "https://ollama.com/download" in done.stdout
    bundle = run_dir(RUN) / "export" / "sakura-support-tiny"
    assert (bundle / "Modelfile").is_file() and (bundle / "README.md").is_file()


MPS_PROBE = """
import json
from unittest import mock
import torch
from finetune.core.config import load_config
from finetune.train import sft

def config(*overrides):
    return load_config('configs/tiny-ja.yaml', list(overrides))

def outcome(call):
    try:
        return call()
    except sft.TrainError as e:
        return 'TrainError: ' + str(e)

found = {}
with mock.patch.object(torch.cuda, 'is_available', return_value=False), \\
        mock.patch.object(torch.backends.mps, 'is_available', return_value=True):
    found['lora'] = sft.pick_device(config('train.method=lora'))
    found['qlora'] = outcome(lambda: sft.pick_device(config('train.method=qlora')))
    found['qlora_fallback'] = sft.pick_device(config('train.method=qlora', 'train.cpu_fallback=true'))
    found['two_processes'] = sft.pick_device(config('train.method=lora'), processes=2)
    found['auto'] = sft.precision(config('train.precision=auto'), 'mps')
    found['fp16'] = sft.precision(config('train.precision=fp16'), 'mps')
    for macos14 in (False, True):
        with mock.patch.object(torch.backends.mps, 'is_macos_or_newer', return_value=macos14):
            found[f'bf16_macos14_{macos14}'] = outcome(lambda: sft.precision(config('train.precision=bf16'), 'mps'))
print(json.dumps(found))
"""


@pytest.mark.docker
def test_a_mac_trains_lora_on_mps_with_qlora_falling_back_only_when_allowed(trained_run):
    """The native runner's device choice on a Mac, with MPS simulated at torch's boundary (no Mac here): MPS
    after CUDA, QLoRA refused there unless train.cpu_fallback allows LoRA, fp32 unless asked otherwise."""
    from support import in_train_image

    found = json.loads(in_train_image(MPS_PROBE, trained_run,
                                      {str(ROOT / "configs"): {"bind": "/work/configs", "mode": "ro"}}))
    assert found["lora"] == ["mps", "lora"]
    assert found["qlora"].startswith("TrainError: train.method is qlora, which needs a CUDA GPU (bitsandbytes 4-bit), "
                                     "and this Mac has MPS only")
    assert found["qlora_fallback"] == ["mps", "lora"]
    assert found["two_processes"] == ["cpu", "lora"]  # MPS has no process groups
    assert found["auto"] == "fp32" and found["fp16"] == "fp16"
    assert found["bf16_macos14_False"].startswith("TrainError: train.precision=bf16 on Apple's MPS needs macOS 14")
    assert found["bf16_macos14_True"] == "bf16"


@pytest.mark.docker
@pytest.mark.slow
def test_the_colab_notebook_runs_the_native_path_and_ends_with_the_bundle(native_run, monkeypatch):
    """notebooks/colab.ipynb executed as Colab would (a kernel, its cells in order) with the offline default on
    CPU and no `ollama` binary: its parameters cell replaced (papermill's way) by the test run's config, so the
    stage cache finds train and convert up to date, and serve writes the bundle the notebook hands over."""
    import nbclient
    import nbformat

    env, *_ = native_run
    notebook = nbformat.read(ROOT / "notebooks" / "colab.ipynb", as_version=4)
    at = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    sets_ = ["run=" + RUN, *SERVE]
    notebook.cells[at].source = f"CONFIG = 'configs/tiny-ja.yaml'\nSETS = {sets_!r}\nPROJECT = ''"
    for key, value in {**NO_DOCKER, "INVOKE_FINETUNE_OLLAMA": "no-such-ollama"}.items():
        monkeypatch.setenv(key, value)
    nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "train: up to date" in text and "convert: up to date" in text, text[-3000:]
    assert "serve: no `no-such-ollama` binary on PATH, so nothing is served" in text
    assert f"the bundle: artifacts/{RUN}/export/sakura-support-tiny.tar" in text
