"""Build-system semantics with the real images: a second `invoke train convert serve` with nothing changed
runs no stage; changing a quant type reruns convert and serve only; `invoke verify` catches a flipped
byte; two builds from an empty run directory give byte-identical weights, GGUFs and Modelfiles; an
interrupted convert leaves no stamp, and nothing a later stage takes as complete; a second invoke on a
locked run fails clearly. Unit tests cover the reasons the cache gives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from support import ROOT, invoke, output, run_dir, sets

from finetune.core.config import load_config
from finetune.host import cache, containers, manifest

PIPELINE = ("train", "convert", "serve")


def tiny(*overrides: str):
    return load_config(ROOT / "configs" / "tiny-ja.yaml", list(overrides), root=ROOT)


def test_reasons_name_the_changed_config_key_the_upstream_stage_and_the_image(tmp_path):
    before = cache.stage_inputs("convert", tiny(), tmp_path, "sha256:aaa", ROOT)
    cache.write_stamp(tmp_path, before, {})
    assert cache.why_rerun(tmp_path, before) is None
    changed = cache.stage_inputs("convert", tiny("convert.quant_types=[Q8_0, Q4_K_M]"), tmp_path, "sha256:bbb", ROOT)
    assert cache.why_rerun(tmp_path, changed) == "convert.quant_types changed, its image changed (bbb)"
    cache.write_stamp(tmp_path, cache.stage_inputs("train", tiny(), tmp_path, "sha256:t", ROOT), {})
    after_train = cache.stage_inputs("convert", tiny(), tmp_path, "sha256:aaa", ROOT)
    assert cache.why_rerun(tmp_path, after_train) == "train was redone"
    cache.clear_stamp(tmp_path, "convert")
    assert cache.why_rerun(tmp_path, before) == "it has not completed (no stamp)"


def test_train_ignores_serve_settings_and_serve_ignores_train_data(tmp_path):
    key = lambda stage, *o: cache.stage_inputs(stage, tiny(*o), tmp_path, "sha256:x", ROOT).key  # noqa: E731
    assert key("train") == key("train", "serve.temperature=0.5", "convert.quant_types=[Q4_K_M]",
                               "serve.quant=Q4_K_M")
    assert key("train") != key("train", "train.learning_rate=0.002")
    assert key("serve") == key("serve", "train.learning_rate=0.002")
    assert key("serve") != key("serve", "serve.temperature=0.5")


@pytest.mark.docker
def test_a_second_invoke_on_a_locked_run_fails_clearly():
    run = "test-cache-locked"
    with cache.run_lock(run_dir(run)):
        done = invoke("convert", *sets(run))
    assert done.returncode == 2, output(done)
    assert f"convert: artifacts/{run} is in use by invoke (pid {os.getpid()}); wait for it to finish" in done.stderr
    assert not run_dir(run).exists()


def chain(run: str, *overrides: str) -> subprocess.CompletedProcess:
    """`invoke train --set ... convert --set ... serve --set ...`: the main job, on one run."""
    args = [x for stage in PIPELINE for x in (stage, *sets(run, *overrides))]
    return invoke(*args)


@pytest.mark.docker
@pytest.mark.slow
def test_nothing_changed_runs_nothing_and_a_quant_type_reruns_convert_and_serve(trained_run):
    port = ("serve.port=11535",)
    done = chain(trained_run, *port)
    assert done.returncode == 0, output(done)
    stamps = {stage: cache.read_stamp(run_dir(trained_run), stage) for stage in PIPELINE}
    again = chain(trained_run, *port)
    assert again.returncode == 0, output(again)
    for stage in PIPELINE:
        assert f"{stage}: up to date (key " in again.stdout, again.stdout
    assert "rerun" not in again.stdout
    # Nothing ran: every stamp is the one the first chain wrote (a rerun writes a new one, with its times).
    assert {stage: cache.read_stamp(run_dir(trained_run), stage) for stage in PIPELINE} == stamps
    more = chain(trained_run, *port, "convert.quant_types=[Q8_0, Q4_K_M]")
    assert more.returncode == 0, output(more)
    assert "train: up to date" in more.stdout
    assert "convert: rerun, because convert.quant_types changed" in more.stdout
    # serve writes a Modelfile per built type, so it declares convert.quant_types too
    assert "serve: rerun, because convert.quant_types changed, convert was redone" in more.stdout
    invoke("stop", *sets(trained_run, *port))


@pytest.mark.docker
@pytest.mark.slow
def test_verify_names_a_file_with_a_flipped_byte(trained_run):
    done = chain(trained_run, "serve.port=11535")
    assert done.returncode == 0, output(done)
    invoke("stop", *sets(trained_run, "serve.port=11535"))
    assert invoke("verify", *sets(trained_run)).returncode == 0
    gguf = run_dir(trained_run) / "convert" / "model-Q8_0.gguf"
    original = gguf.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    gguf.write_bytes(bytes(flipped))
    try:
        done = invoke("verify", *sets(trained_run))
    finally:
        gguf.write_bytes(original)
    assert done.returncode == 1
    assert f"verify: artifacts/{trained_run}/convert/model-Q8_0.gguf: sha256 " in done.stderr
    assert "1 of " in done.stderr and "files do not match the manifest" in done.stderr


REPRODUCED = ("train/merged/", "convert/", "serve/Modelfile")


def build_from_scratch(run: str, *overrides: str) -> dict[str, str]:
    shutil.rmtree(run_dir(run), ignore_errors=True)
    done = chain(run, *overrides)
    assert done.returncode == 0, output(done)
    files = json.loads((run_dir(run) / "manifest.json").read_text())["artifacts"]
    return {f["path"]: f["sha256"] for f in files if f["path"].startswith(REPRODUCED) and f["path"].endswith(
        (".safetensors", ".gguf", "Modelfile", "Modelfile.baseline"))}


@pytest.mark.docker
@pytest.mark.slow
def test_two_builds_from_scratch_are_byte_identical_and_a_killed_convert_leaves_no_stamp():
    # 300 steps is an undertrained model: convert records its greedy answer without requiring that it stops.
    run, overrides = "test-repro", ("train.max_steps=300", "serve.port=11536", "convert.require_stop=false")
    first = build_from_scratch(run, *overrides)
    second = build_from_scratch(run, *overrides)
    invoke("stop", *sets(run, *overrides))
    assert sorted(first) == ["convert/base-Q8_0.gguf", "convert/model-Q8_0.gguf", "convert/model-f16.gguf",
                             "serve/Modelfile", "serve/Modelfile.baseline", "train/merged/model.safetensors"]
    assert first == second

    # Kill a forced convert once it is working: its stamp is gone and nothing looks complete. (SIGTERM:
    # a background process started by a non-interactive shell ignores SIGINT.)
    worker = subprocess.Popen([str(ROOT / "invoke"), "convert", "--force", *sets(run, *overrides)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run_dir(run) / ".convert.partial").exists():
        assert worker.poll() is None and time.monotonic() < deadline, "convert did not start"
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=60) == 128 + signal.SIGTERM
    assert cache.read_stamp(run_dir(run), "convert") is None
    names = [c.name for c in containers.client().containers.list(all=True)]
    assert f"finetune-convert-{run}" not in names, "the stage container must not outlive invoke"
    refused = invoke("serve", *sets(run, *overrides))
    assert refused.returncode == 2
    assert f"serve: artifacts/{run}/convert/ is not complete (no stamp): run `invoke convert` first" in refused.stderr
    redone = invoke("convert", *sets(run, *overrides))
    assert redone.returncode == 0, output(redone)
    assert "convert: rerun, because it has not completed (no stamp)" in redone.stdout
    shutil.rmtree(run_dir(run))


def test_verify_checks_every_manifest_entry_and_names_what_differs(tmp_path):
    """manifest.verify without Docker: a missing file, a changed size and a changed byte of the same size are
    each named with what the manifest says; a run without a manifest says which command makes one."""
    assert manifest.verify(tmp_path) == (0, [f"{tmp_path / 'manifest.json'}: no manifest; run the stages first "
                                             "(`invoke train convert serve`)"])
    files = {"train/a.bin": b"abc", "convert/b.gguf": b"0123456789", "serve/Modelfile": b"FROM x\n"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    entries = [e for stage in PIPELINE for e in manifest.artifacts(tmp_path, stage)]
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": entries}))
    assert manifest.verify(tmp_path) == (3, [])
    (tmp_path / "train/a.bin").unlink()
    (tmp_path / "convert/b.gguf").write_bytes(b"0123456789+")
    (tmp_path / "serve/Modelfile").write_bytes(b"FROM y\n")
    checked, problems = manifest.verify(tmp_path)
    assert checked == 3 and len(problems) == 3
    assert problems[0] == f"{tmp_path / 'train/a.bin'}: missing"
    assert problems[1] == f"{tmp_path / 'convert/b.gguf'}: 11 bytes, the manifest says 10"
    assert problems[2].startswith(f"{tmp_path / 'serve/Modelfile'}: sha256 ") and "the manifest says" in problems[2]


def test_manifest_versions_come_from_the_lock_the_image_labels_or_the_native_venv():
    """Convert's torch and numpy are Debian's (the image's labels), the rest its lock's; a native run's are the
    venv's own; serve records Ollama's version and the flags its ggml was compiled with."""
    labels = {"finetune.version.torch": "2.6.0+dfsg-7", "finetune.version.numpy": "1:2.2.4+ds-1"}
    found = manifest.versions("convert", {"Id": "x", "Config": {"Labels": labels, "Env": ["LLAMA_CPP_COMMIT=abc"]}})
    assert found["torch"] == "2.6.0+dfsg-7" and found["numpy"] == "1:2.2.4+ds-1" and found["llama.cpp"] == "abc"
    assert found["transformers"] == "5.23.0"
    native = manifest.versions("convert", {"Id": "native:x", "Native": {"packages": {"torch": "2.15.0", "numpy": "2.4.6"}}})
    assert native["torch"] == "2.15.0" and native["numpy"] == "2.4.6"
    serve = manifest.versions("serve", {"Id": "y", "Config": {"Labels": {
        "org.opencontainers.image.title": "ollama (built from source)", "org.opencontainers.image.version": "0.24.0",
        "finetune.ollama.cpu_flags": "-mavx -mavx2 -mfma -mf16c", "finetune.ollama.patches": "threadpool.patch"}}})
    assert serve == {"ollama": "0.24.0", "ollama_cpu_flags": "-mavx -mavx2 -mfma -mf16c",
                     "ollama_patches": "threadpool.patch"}
