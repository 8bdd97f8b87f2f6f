"""The convert stage in the real converter image: the tiny model trained by `invoke train` becomes an f16
GGUF and k-quants, each loaded by llama-cpp-python (same llama.cpp source), checked and reported; bad inputs
fail with a clear message and leave nothing behind; the baseline's GGUF is made once per base model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from support import ROOT, invoke, run_dir, sets

from finetune.core import layout


def left_behind(run: str) -> list[str]:
    return sorted(p.name for p in run_dir(run).glob("*convert*"))


@pytest.mark.docker
@pytest.mark.slow
def test_convert_tiny_model_to_f16_and_kquants(trained_run):
    done = invoke("convert", *sets(trained_run, "convert.quant_types=[Q4_K_M, Q8_0]", "serve.quant=Q4_K_M"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = run_dir(trained_run) / "convert"
    report = json.loads((out / "report.json").read_text())
    assert report["llama_cpp"]["commit"] == "0c1e57098"
    rows = {r["type"]: r for r in report["files"]}
    assert list(rows) == ["f16", "Q4_K_M", "Q8_0", "base Q4_K_M"]
    for kind, row in rows.items():
        assert row["sha256"] == hashlib.sha256((out / row["file"]).read_bytes()).hexdigest()
        assert row["architecture"] == "llama" and row["perplexity"] is not None and row["perplexity"] > 1
        if not kind.startswith("base"):  # the base model was never taught to end its turn
            assert row["finish_reason"] == "stop" and row["file"] == f"model-{kind}.gguf"
    assert rows["base Q4_K_M"]["file"] == "base-Q4_K_M.gguf"
    # Each quant against the f16 logits (measured: KL 0.023 for Q8_0, 0.42 for Q4_K_M; same top token 96%, 78%).
    assert "kl_divergence" not in rows["f16"]
    assert 0 < rows["Q8_0"]["kl_divergence"] < rows["Q4_K_M"]["kl_divergence"]
    assert 100 >= rows["Q8_0"]["same_top_token"] > rows["Q4_K_M"]["same_top_token"] > 50
    assert rows["Q4_K_M"]["size_bytes"] < rows["Q8_0"]["size_bytes"] < rows["f16"]["size_bytes"]
    assert 4 < rows["Q4_K_M"]["bits_per_weight"] < rows["Q8_0"]["bits_per_weight"] < rows["f16"]["bits_per_weight"]
    # Quantization moves the toy model a little, not a lot (measured: Q8_0 0.4%, Q4_K_M 3.6% from f16).
    f16 = rows["f16"]["perplexity"]
    assert abs(rows["Q8_0"]["perplexity"] - f16) < 0.02 * f16
    assert abs(rows["Q4_K_M"]["perplexity"] - f16) < 0.20 * f16
    assert "model-Q4_K_M.gguf" in done.stdout  # the table in the terminal
    assert not (run_dir(trained_run) / ".convert.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == ["base-Q4_K_M.gguf", "chat.json", "inputs.json",
                                                      "model-Q4_K_M.gguf", "model-Q8_0.gguf", "model-f16.gguf",
                                                      "report.json"]
    # The train stage's chat format travels on for serve; every GGUF states BOS as training fed it.
    assert json.loads((out / "chat.json").read_text())["family"] == "chatml"
    assert all(row["add_bos"] is True and row["end_of_turn"] == "<|im_end|>" for row in rows.values())


@pytest.mark.docker
@pytest.mark.slow
def test_the_convert_image_carries_debians_cpu_torch_and_no_cuda(trained_run):
    """Convert runs on CPU: the image takes Debian's CPU torch and its numpy (the versions its labels and the
    manifest state) instead of PyPI's CUDA build and its nvidia-* wheels, and stays within issue 18's 1.5 GB."""
    from finetune.host import containers

    done = invoke("convert", *sets(trained_run))  # builds the image; the stage cache makes the rest a no-op
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    image = containers.client().images.get(layout.image_tag("convert"))
    version = image.labels["finetune.version.torch"]
    probe = ("import importlib.metadata as m, torch; print(torch.__version__, torch.version.cuda, torch.__file__, "
             "sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith(('nvidia', "
             "'cuda', 'triton'))))")
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", image.id, "-c", probe],
                         capture_output=True, text=True, check=True).stdout.split(maxsplit=3)
    assert out[:3] == [version.split("+")[0] + "+debian", "None", "/usr/lib/python3/dist-packages/torch/__init__.py"]
    assert out[3].strip() == "[]"
    assert image.attrs["Size"] <= 1.5e9, f"convert image is {image.attrs['Size'] / 1e9:.2f} GB"
    stages = json.loads((run_dir(trained_run) / "manifest.json").read_text(encoding="utf-8"))["stages"]
    assert stages["convert"]["versions"]["torch"] == version
    assert stages["convert"]["versions"]["numpy"] == image.labels["finetune.version.numpy"]


@pytest.mark.docker
@pytest.mark.slow
def test_the_baselines_gguf_is_made_once_per_base_model_and_reused(trained_run):
    """The base model's GGUF depends on the base model, llama.cpp and the types, not on the run: a convert
    with the cache emptied makes it and stores it (artifacts/.cache/base-gguf/), the next reuses it, byte for
    byte, and says so; a cached file that no longer matches its recorded sha256 is made again."""
    cache = ROOT / layout.BASE_GGUF_CACHE
    shutil.rmtree(cache, ignore_errors=True)
    base = run_dir(trained_run) / "convert" / "base-Q8_0.gguf"
    made = invoke("convert", "--force", *sets(trained_run))
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "-> base-Q8_0.gguf (the baseline)" in made.stdout and "reused" not in made.stdout
    first = hashlib.sha256(base.read_bytes()).hexdigest()
    (entry,) = cache.glob("*.gguf")
    assert (cache / f"{entry.stem}.sha256").read_text().strip() == first
    reused = invoke("convert", "--force", *sets(trained_run))
    assert reused.returncode == 0, reused.stdout[-3000:] + reused.stderr[-3000:]
    assert f"base-Q8_0.gguf (the baseline) reused from the base GGUF cache (key {entry.stem[:12]}" in reused.stdout
    assert hashlib.sha256(base.read_bytes()).hexdigest() == first
    with entry.open("r+b") as f:  # a damaged cache entry is never served
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    again = invoke("convert", "--force", *sets(trained_run))
    assert again.returncode == 0 and "reused" not in again.stdout and "-> base-Q8_0.gguf" in again.stdout
    assert hashlib.sha256(base.read_bytes()).hexdigest() == first == hashlib.sha256(entry.read_bytes()).hexdigest()


@pytest.mark.docker
def test_missing_merged_model(tmp_path):
    run = "test-convert-missing"
    subprocess.run(["rm", "-rf", str(run_dir(run))], check=True)
    done = invoke("convert", *sets(run))
    assert done.returncode == 2
    assert "convert: no merged model at /artifacts/train/merged: run `invoke train` first" in done.stderr + done.stdout
    assert left_behind(run) == []


def fake_merged(run: str, files: dict[str, str]) -> None:
    merged = run_dir(run) / "train" / "merged"
    subprocess.run(["rm", "-rf", str(run_dir(run))], check=True)
    merged.mkdir(parents=True)
    for name, text in files.items():
        (merged / name).write_text(text)
    (run_dir(run) / "stamps").mkdir()  # as if train had completed: what convert checks comes next
    (run_dir(run) / "stamps" / "train.json").write_text('{"key": "a train that wrote bad files"}')
    os.system(f"chmod -R a+rX {run_dir(run)}")


@pytest.mark.docker
def test_incomplete_merged_model():
    run = "test-convert-incomplete"
    fake_merged(run, {"config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})})
    done = invoke("convert", *sets(run))
    assert done.returncode == 2
    assert ("incomplete merged model in /artifacts/train/merged: missing tokenizer_config.json, *.safetensors "
            "(the weights), tokenizer.json or tokenizer.model; rerun `invoke train`") in done.stderr + done.stdout
    assert left_behind(run) == []


@pytest.mark.docker
def test_unsupported_architecture():
    run = "test-convert-arch"
    fake_merged(run, {"config.json": json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}),
                      "tokenizer_config.json": "{}", "tokenizer.json": "{}", "model.safetensors": ""})
    done = invoke("convert", *sets(run))
    assert done.returncode == 2
    output = done.stderr + done.stdout
    assert "architecture 'FooForCausalLM' is not supported by the pinned llama.cpp converter (0c1e57098)" in output
    assert "LlamaForCausalLM" in output
    assert left_behind(run) == []


def test_unknown_quant_type_lists_valid_ones():
    done = invoke("convert", *sets("test-convert-quant", "convert.quant_types=[Q4_K_X]"))
    assert done.returncode == 2
    assert "convert.quant_types[0]" in done.stderr and "use one of: Q2_K, Q3_K_S" in done.stderr
    assert not run_dir("test-convert-quant").exists()


# llama-perplexity's output at the pinned commit, from its format strings (tools/perplexity/perplexity.cpp):
# the per-chunk table's header names "Same top p" too, without the colon of the summary line.
PPL_OUTPUT = """perplexity: calculating perplexity over 4 chunks, n_ctx=128, batch_size=128, n_seq=1
[1]14.2301,[2]13.0542,[3]12.9812,[4]12.7215,
Final estimate: PPL = 12.7215 +/- 0.84312
"""
KLD_OUTPUT = """chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
    1      15.7006 ±    0.1234     0.004567 ±  0.001234      0.012345 ±  0.000123    1.234 ±  0.056 %    96.078 ± 1.231 %
====== Perplexity statistics ======
Mean PPL(Q)                   :  12.803451 ±   0.850911
Mean PPL(base)                :  12.721500 ±   0.843120
====== KL divergence statistics ======
Mean    KLD:   0.006512 ±   0.000412
Maximum KLD:   0.201311
====== Token probability statistics ======
Same top p: 97.549 ± 0.686 %
"""


def test_perplexity_figures_are_read_from_llama_perplexitys_summary_lines():
    from finetune.convert.gguf import perplexity_figures

    assert perplexity_figures(PPL_OUTPUT, compare=False) == {"perplexity": 12.7215}
    assert perplexity_figures(KLD_OUTPUT, compare=True) == {"perplexity": 12.803451, "kl_divergence": 0.006512,
                                                            "same_top_token": 97.549}
    # A line llama.cpp did not print (the lost-log case the convert image patches) is None, not a wrong number.
    assert perplexity_figures("perplexity: 4 chunks\n", compare=False) == {"perplexity": None}
    assert perplexity_figures(KLD_OUTPUT.split("====== KL")[0], compare=True)["kl_divergence"] is None
