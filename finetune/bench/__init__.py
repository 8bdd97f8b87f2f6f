"""`invoke bench`: the speed, memory and size of every stage, each beside the plain tool it replaces,
measured in the same run on the same machine.

    ./invoke bench [--config C] [--out DIR]      (runs on the host and drives the stage images)

What it measures, bench.repeats times each (median, min and max):
    train     tokens/s, peak memory and wall time of `invoke train` vs bench/plain_sft.py, a minimal TRL
              SFTTrainer script run in the same image on the same model, data, steps and precision; packing
              off and on, with train.deterministic off (what byte-reproducible training costs) and with
              train.pin_cpu off (what the numerical pin within it costs: finetune/train/numerics.py). On a
              GPU also QLoRA vs LoRA memory, and model FLOPs utilization.
    convert   wall time of `invoke convert` vs convert_hf_to_gguf.py + llama-quantize run by hand on the
              same merged model; and the stage's own convert + quantize phases vs the same two commands
    serve     generation tokens/s, prompt tokens/s and time to first token through Ollama vs llama-bench
              (the same llama.cpp source as the convert stage) on the same GGUF with the same threads; cold
              start of the serve container until healthy vs a plain `ollama serve` + `ollama create`;
              with bench.models, generation on random-init models at real sizes (generation.py)
    pipeline  `invoke train convert serve` from an empty run directory, and again with nothing changed, vs
              the plain tools one after another; the size of each image
Every ratio is a cost: ours over the baseline's for a time or a size, the baseline's over ours for a rate.
Above 1 the stage costs more than the plain tool; above 1.10 the table flags it, and the stage profiles
(wall time per phase, from train/summary.json and convert/report.json) show where the time goes.

The stages run as a user runs them (`invoke <stage>` in a subprocess) on a separate run, <run>-bench, with
train.max_steps=bench.train_steps and serve.port=bench.port: the user's run and server are not touched.
Writes OUT/bench.json (every sample) and OUT/bench.md (the table), and the logs of every run to OUT/logs/.
One module per stage (train.py, convert.py, serve.py, generation.py, pipeline.py), sharing a Session (common.py); the
table is report.py's.
"""


from __future__ import annotations

import json
import time
from pathlib import Path

from finetune.bench import convert, generation, pipeline, serve, train
from finetune.bench.common import FLAG_ABOVE, ROOT, BenchError, Row, Session, fmt
from finetune.bench.report import markdown
from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.host import manifest

__all__ = ["BenchError", "FLAG_ABOVE", "Row", "fmt", "markdown", "run"]


def run(config: RunConfig, config_path: str, overrides: list[str], out: Path | None, images: list[str]) -> dict:
    """Measure everything (see the module docstring); results in out (default artifacts/<run>-bench-results/)."""
    b = Session(config, config_path, overrides, out or layout.bench_results(config.run, ROOT), images)
    (b.out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"bench: {config.run} as run {b.run_name}, {b.repeats} repeats, "
          f"train.max_steps={config.bench.train_steps}; logs in {b.out / 'logs'}", flush=True)
    train.run(b)
    convert.run(b)
    serve.run(b)
    generation.run(b)
    pipeline.run(b)
    pipeline.image_sizes(b)
    results = {"config": config_path, "run": config.run, "bench_run": b.run_name,
               "repeats": b.repeats, "train_steps": config.bench.train_steps, "host": manifest.host(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
               "seconds": round(time.time() - started, 1), "flag_above": FLAG_ABOVE,
               "rows": [r.to_json() for r in b.rows], "profiles": b.profiles, "details": b.details}
    (b.out / "bench.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (b.out / "bench.md").write_text(markdown(results), encoding="utf-8")
    return results
