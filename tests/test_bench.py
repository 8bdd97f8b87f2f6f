"""`invoke bench`: the ratios point the right way, the table flags what costs over 10% more and shows the
profiles, the plain TRL baseline gets the stage's own hyperparameters; and, with the real images, one
repetition of every measurement runs end to end and reports every figure beside its baseline."""

from __future__ import annotations

import ast
import json
import os

import pytest
from support import ROOT, invoke, output

from finetune import bench
from finetune.core import layout
from finetune.core.config import load_config
from finetune.host import containers
from finetune.train.sft import lora_kwargs, sft_kwargs


def test_ratio_is_a_cost_whichever_way_the_figure_points():
    slower = bench.Row("x", "wall", "s", [2.0, 3.0, 4.0], "plain", [2.0, 2.0])
    assert slower.ratio == 1.5
    fewer_tokens_per_second = bench.Row("x", "rate", "tok/s", [50.0], "plain", [100.0], higher_is_better=True)
    assert fewer_tokens_per_second.ratio == 2.0
    assert bench.Row("x", "size", "MB", [1.0], "none", []).ratio is None


def test_table_gives_median_min_max_and_flags_ratios_above_1_10():
    rows = [bench.Row("convert", "wall", "s", [3.0, 1.0, 2.0], "by hand", [1.0, 1.0, 1.0]),
            bench.Row("train", "rate", "tok/s", [1000.0, 1020.0, 1050.0], "plain TRL", [1040.0, 1050.0, 1060.0], True)]
    results = {"run": "r", "config": "c.yaml", "repeats": 3, "train_steps": 20, "started": "now", "seconds": 60.0,
               "flag_above": bench.FLAG_ABOVE, "host": {"cpu": "cpu", "cpus": 2, "gpus": []},
               "rows": [r.to_json() for r in rows], "profiles": {"convert": {"checks": 3.0, "quantize": 1.0}},
               "details": {}}
    table = bench.markdown(results)
    assert "| convert | wall | 2.00 (1.00-3.00) s | by hand | 1.00 (1.00-1.00) s | 2.00 ⚠ |" in table
    assert "| train | rate | 1,020 (1,000-1,050) tok/s | plain TRL | 1,050 (1,040-1,060) tok/s | 1.03 |" in table
    assert "| checks | 3.00 | 75% |" in table


def test_numbers_keep_three_significant_digits():
    assert [bench.fmt(x) for x in (0.01234, 1.5, 27.49, 2146.4, 0)] == ["0.0123", "1.50", "27.5", "2,146", "0"]


def test_plain_baseline_gets_the_stage_hyperparameters_not_trl_defaults():
    """TRL's SFTConfig defaults to bf16 autocast and activation checkpointing, 10x slower on a CPU: the
    baseline must be told the stage's precision, steps and schedule, and they must survive JSON."""
    config = load_config(ROOT / "configs" / "tiny-ja.yaml", ["train.max_steps=20"], root=ROOT)
    spec = json.loads(json.dumps({"sft": sft_kwargs(config, "cpu", "fp32"), "lora": lora_kwargs(config)}))
    assert spec["sft"]["bf16"] is False and spec["sft"]["fp16"] is False
    assert spec["sft"]["activation_checkpointing"] is False and spec["sft"]["use_cpu"] is True
    assert spec["sft"]["max_steps"] == 20 and spec["sft"]["learning_rate"] == config.train.learning_rate
    assert spec["lora"]["target_modules"] == ["q_proj", "v_proj"] and spec["lora"]["r"] == config.train.rank


def test_plain_script_stands_alone():
    """The baseline is what a user writes without this project: it must not import the finetune package."""
    tree = ast.parse((ROOT / "finetune" / "bench" / "plain_sft.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "finetune" not in imported
    assert {"trl", "peft", "transformers", "datasets"} <= imported


@pytest.mark.docker
@pytest.mark.slow
def test_bench_measures_every_stage_beside_its_baseline(tmp_path):
    """One repetition of everything on 20 training steps: every figure has a positive value, every stage
    row a baseline and a ratio, the profiles name the phases, and the bench run is left stopped."""
    done = invoke("bench", "--set", "bench.repeats=1", "--set", "bench.train_steps=20", "--set", "bench.models=[100m]",
                  "--out", str(tmp_path))
    assert done.returncode == 0, output(done)
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["stage"], r["figure"]): r for r in results["rows"]}
    figures = {stage for stage, _ in rows}
    assert figures == {"train", "convert", "serve", "pipeline", "images"}, rows.keys()
    for (stage, figure), r in rows.items():
        assert r["ours_stats"]["median"] > 0, (stage, figure)
        if stage != "images":
            assert r["baseline_stats"]["median"] > 0 and r["ratio"] > 0, (stage, figure)
    for variant in ("packing on", "packing off", "packing on, train.deterministic=false",
                    "packing on, train.pin_cpu=false"):
        assert ("train", f"training tokens/s, {variant}") in rows, rows.keys()
    for cost in ("byte-reproducible training (train.deterministic)", "the numerical pin (train.pin_cpu)"):
        assert rows[("train", f"training tokens/s with {cost}, packing on")]["baseline_name"].startswith("the same stage")
    assert {"train", "eval after", "save and merge"} <= set(results["profiles"]["train, packing off"])
    for figure in ("training tokens/s, 2 processes (DDP)", "peak memory per process, 2 processes (DDP)"):
        assert rows[("train", figure)]["baseline_name"].startswith("1 process"), figure
    assert 0 < results["details"]["ddp scaling efficiency"]["efficiency"] < 2
    checks = {"checks: metadata", "checks: load in llama.cpp", "checks: the trained tokenizer", "checks: prompt ids",
              "checks: greedy answer", "checks: sha256", "perplexity"}  # each check's own cost
    assert {"convert_hf_to_gguf", "llama-quantize", *checks} <= set(results["profiles"]["convert"])
    serve = results["details"]["serve"]
    assert serve["generated_tokens"] > 0 and len(serve["llama_bench"]["tg"]) >= 3
    # Timed on the newest Ollama where that image is built (tests/test_serve.py): a row, or why not
    newest = ("serve", f"generation tokens/s, {serve['model']} on Ollama {layout.OLLAMA_NEWEST} (llama-server)")
    if containers.image_exists(layout.ollama_image(layout.OLLAMA_NEWEST)):
        assert (newest in rows) != ("untimed" in serve["ollama_newest"]), serve["ollama_newest"]
    else:
        assert newest not in rows and "ollama_newest" not in serve
    # Generation at a real size: the random-init 100m model (qwen2 vocabulary), 1 thread and one per core
    sized = results["details"]["generation at real sizes"]["100m"]
    assert sized["model"]["vocab_size"] == 151936 and 100e6 < sized["model"]["parameters"] < 130e6
    for threads in sorted({1, os.cpu_count()}):
        figure = (f"generation tokens/s, random-init 100m (118M, qwen2 vocab), Q8_0, {threads} "
                  f"thread{'s' if threads > 1 else ''}, Ollama {layout.OLLAMA_SERVE_RELEASE}")
        assert rows[("serve", figure)]["ratio"] > 0 and len(sized[f"{threads} threads"]["llama_bench_tg"]) >= 3
    assert (tmp_path / "model-100m" / "model-Q8_0.gguf").is_file() and not (tmp_path / "model-100m" / "hf").exists()
    table = (tmp_path / "bench.md").read_text()
    assert "| stage | figure | ours: median (min-max) |" in table and "## Profile: convert" in table
    names = [c.name for c in containers.client().containers.list(all=True)]
    assert not [n for n in names if "bench" in n], names
