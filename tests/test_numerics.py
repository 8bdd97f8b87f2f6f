"""One result on every machine: the train stage pins the CPU numerics (finetune/train/numerics.py), and the pin wins
over the environment the container starts with, so the bytes do not depend on the CPU's vector instructions;
a CPU without AVX2 is not forced onto AVX2 kernels."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
from support import ROOT, run_dir

from finetune.core.config import load_config, to_yaml
from finetune.host import containers
from finetune.train import numerics


def test_x86_64_with_avx2_is_pinned_to_avx2_kernels_and_mkls_vendor_neutral_path():
    """MKL's AVX2 branch exists on Intel CPUs only (AMD ones silently run AUTO): COMPATIBLE is the branch both run."""
    pinned = numerics.settings(3, machine="x86_64", avx2=True)
    assert pinned == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "ATEN_CPU_CAPABILITY": "avx2",
                      "MKL_CBWR": "COMPATIBLE", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_a_cpu_without_avx2_gets_the_baseline_kernels_not_illegal_instructions():
    """ATen trusts ATEN_CPU_CAPABILITY without checking the CPU: avx2 there would crash at the first kernel."""
    pinned = numerics.settings(2, machine="x86_64", avx2=False)
    assert pinned["ATEN_CPU_CAPABILITY"] == "default" and pinned["MKL_CBWR"] == "COMPATIBLE"


def test_arm64_gets_the_neon_baseline_and_no_mkl_settings():
    assert numerics.settings(2, machine="aarch64") == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                                       "ATEN_CPU_CAPABILITY": "default"}


def test_pin_refuses_to_run_after_torch(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", object())
    with pytest.raises(RuntimeError, match="before torch is imported"):
        numerics.pin(2)


STEPS = 40  # enough optimizer steps for a different kernel to show in the weights; the tiny base is built too


def train_in_image(name: str, environment: dict[str, str], *overrides: str) -> str:
    """`python -m finetune.train` in the train image, the container started with `environment`; the merged
    model's sha256. The tiny base is built in a cache volume of this test's own, keyed by the kernels in use."""
    out = run_dir(name)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if containers.container_user().startswith("10001:"):
        shutil.chown(out, 10001, 10001)
    config = load_config(ROOT / "configs" / "tiny-ja.yaml",
                         [f"run={name}", f"train.max_steps={STEPS}", "train.eval_steps=1000", *overrides], root=ROOT)
    resolved = out.parent / f".{name}.yaml"
    resolved.write_text(to_yaml(config), encoding="utf-8")
    resolved.chmod(0o644)
    logs = containers.client().containers.run(
        "finetune-train:latest", ["--config", "/work/run.yaml", "--out", "/artifacts"], remove=True,
        user=containers.container_user(), environment={"HF_HUB_OFFLINE": "1", **environment},
        volumes={str(out.resolve()): {"bind": "/artifacts", "mode": "rw"},
                 str(resolved.resolve()): {"bind": "/work/run.yaml", "mode": "ro"},
                 str(ROOT / "data"): {"bind": "/work/data", "mode": "ro"},
                 "finetune-test-numerics-cache": {"bind": "/cache/hf", "mode": "rw"}})
    resolved.unlink()
    assert b"train: done" in logs, logs.decode()[-2000:]
    digest = hashlib.sha256((out / "train" / "merged" / "model.safetensors").read_bytes()).hexdigest()
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return digest


@pytest.mark.docker
@pytest.mark.slow
def test_the_pin_wins_over_the_cpu_capability_in_the_environment(trained_run):
    """The same training with ATEN_CPU_CAPABILITY set to default, avx2 or avx512 in the container gives one
    merged model, byte for byte. Without the pin (train.pin_cpu=false) the baseline kernels give another one:
    proof that the kernels matter and that this test would see a pin that does not hold. (On a CPU without
    AVX-512, avx512 unpinned would crash; pinned, it never reaches ATen.)"""
    assert trained_run  # the train image is built
    hashes = {cap: train_in_image(f"test-numerics-{cap or 'unset'}", {"ATEN_CPU_CAPABILITY": cap} if cap else {})
              for cap in (None, "default", "avx2", "avx512")}
    print(hashes)
    assert len(set(hashes.values())) == 1, hashes
    unpinned = train_in_image("test-numerics-unpinned", {"ATEN_CPU_CAPABILITY": "default"}, "train.pin_cpu=false")
    assert unpinned != hashes[None]


@pytest.mark.docker
@pytest.mark.slow
def test_mkl_really_runs_the_vendor_neutral_branch(trained_run):
    """What MKL itself reports for the offline default's training (MKL_VERBOSE's CNR field, in summary.json):
    the COMPATIBLE branch, on an Intel or an AMD CPU alike. MKL ignores a branch the CPU's vendor lacks without
    a word, which is how an AVX2 pin once trained other bytes on Intel than on AMD."""
    summary = json.loads((run_dir(trained_run) / "train" / "summary.json").read_text())
    assert summary["numerics"]["mkl_branch"] == "COMPATIBLE", summary["numerics"]
