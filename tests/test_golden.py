"""Published hashes: the offline default, trained, converted and served here, gives exactly the bytes in
golden/tiny-ja.json, which were made on another machine; so every machine that runs CI proves that the build
reproduces across machines. `verify --golden` names the first artifact that differs, in pipeline order, and
refuses a config whose artifacts cannot match."""

from __future__ import annotations

import json

import pytest
from support import ROOT, invoke, output, sets

from finetune.core.config import load_config
from finetune.host import manifest

GOLDEN = ROOT / "golden" / "tiny-ja.json"


def default_config(*overrides: str) -> dict:
    return load_config(ROOT / "configs" / "tiny-ja.yaml", list(overrides), root=ROOT).model_dump(mode="json")


def test_published_hashes_cover_the_merged_model_every_gguf_and_every_modelfile():
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    files = list(golden["files"])
    assert "train/merged/model.safetensors" in files and "train/merged/tokenizer.json" in files
    assert [f for f in files if f.endswith(".gguf")] == ["convert/base-Q8_0.gguf", "convert/model-Q8_0.gguf",
                                                         "convert/model-f16.gguf"]
    assert [f for f in files if f.startswith("serve/")] == ["serve/Modelfile", "serve/Modelfile.baseline",
                                                            "serve/Modelfile.f16", "serve/models"]
    assert files.index("train/merged/model.safetensors") < files.index("convert/model-f16.gguf")
    assert golden["artifact_config"] == manifest.artifact_config(default_config()), \
        "configs/tiny-ja.yaml changed: rerun the default and `./invoke verify --golden --update` in the same commit"
    assert golden["made_with"]["portable"] and golden["made_with"]["cpu_capability"] == "AVX2"


def fake_run(tmp_path, golden: dict) -> None:
    for rel in golden["files"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)


def test_the_first_artifact_that_differs_is_named_first(tmp_path):
    fake_run(tmp_path, {"files": dict.fromkeys(["train/merged/model.safetensors", "convert/model-f16.gguf",
                                                "serve/Modelfile"])})
    golden = {"config": "configs/tiny-ja.yaml", "artifact_config": manifest.artifact_config(default_config()),
              "files": manifest.golden_files(tmp_path)}
    assert list(golden["files"]) == ["train/merged/model.safetensors", "convert/model-f16.gguf", "serve/Modelfile"]
    assert manifest.config_difference(golden, default_config("run=other", "serve.port=1234")) is None
    assert manifest.compare_golden(golden, tmp_path) == []
    (tmp_path / "serve" / "Modelfile").write_text("changed")
    (tmp_path / "convert" / "model-f16.gguf").write_text("changed")
    problems = manifest.compare_golden(golden, tmp_path)
    assert len(problems) == 2 and problems[0].startswith(f"{tmp_path}/convert/model-f16.gguf: sha256 ")
    (tmp_path / "train" / "merged" / "model.safetensors").unlink()
    assert manifest.compare_golden(golden, tmp_path)[0] == (
        f"{tmp_path}/train/merged/model.safetensors: missing (run `invoke train convert serve` first)")


def test_a_config_that_reaches_the_artifacts_cannot_be_compared():
    golden = {"config": "configs/tiny-ja.yaml", "artifact_config": manifest.artifact_config(default_config()),
              "files": {}}
    assert manifest.config_difference(golden, default_config("train.max_steps=20")) == ("the run's config differs from configs/tiny-ja.yaml where it reaches the artifacts: "
                        "train.max_steps=20 (published: 4000); the published hashes are for that config as committed")


@pytest.mark.docker
@pytest.mark.slow
def test_offline_default_matches_the_published_hashes(trained_run):
    """The session's run of the offline default (only its name and port differ, which reach no artifact)."""
    overrides = ("serve.port=11531",)  # as test_serve's: the stage cache shares the work
    done = invoke("convert", *sets(trained_run, *overrides))
    assert done.returncode == 0, output(done)
    done = invoke("serve", *sets(trained_run, *overrides))
    assert done.returncode == 0, output(done)
    try:
        done = invoke("verify", "--golden", *sets(trained_run, *overrides))
    finally:
        invoke("stop", *sets(trained_run, *overrides))
    assert done.returncode == 0, output(done)
    # the reference machine's bytes, or those recorded for this CPU class (other_machines: README, Reproducibility)
    assert ("published hashes match (golden/tiny-ja.json)" in done.stdout
            or "hashes match those published for" in done.stdout), done.stdout


def test_another_cpu_classs_hashes_are_recorded_beside_the_reference_and_matched_whole(tmp_path):
    run = tmp_path / "run"
    fake_run(run, {"files": dict.fromkeys(["train/merged/model.safetensors", "serve/Modelfile"])})
    path = tmp_path / "golden.json"
    reference = {"config": "configs/tiny-ja.yaml", "made_on": {"cpu": "reference"}, "files": {
        "train/merged/model.safetensors": "0" * 64, "serve/Modelfile": "0" * 64}}
    path.write_text(json.dumps(reference))
    assert manifest.matching_machine(reference, run) is None
    record = manifest.add_other_machine(path, run, {"cpu_capability": "AVX2"})
    manifest.add_other_machine(path, run, {"cpu_capability": "AVX2"})  # the same CPU again: replaced, not added
    golden = json.loads(path.read_text())
    assert golden["other_machines"] == [record] and golden["files"] == reference["files"]
    assert manifest.compare_golden(golden, run) and manifest.matching_machine(golden, run) == record
    (run / "serve" / "Modelfile").write_text("changed")  # one file off: no class matches
    assert manifest.matching_machine(golden, run) is None
