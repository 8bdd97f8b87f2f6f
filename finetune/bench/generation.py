"""Generation at real sizes (bench.models): Ollama against llama-bench on a random-init model of Qwen2.5's shape
with the real qwen2 vocabulary, where a toy's per-token work is too small to say anything about a real model.

The model is built in the train image (finetune/train/vocab_models.py --shape), converted to Q8_0 by hand in
the convert image (convert_hf_to_gguf.py + llama-quantize), then timed in the serve image's Ollama and, where
built, the newest Ollama (Dockerfile.ollama-0.34), against llama-bench on the same GGUF: with 1 thread and
with one per core. Untrained, the model is sampled (temperature 1, a seed per answer) from raw prompts and runs
to num_predict; only its speed is compared, never what it says. The GGUF is kept in OUT/model-<shape>/ and
reused by the next bench with the same OUT."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from finetune.bench.common import BenchError, Row, Session, remove_volume
from finetune.bench.serve import MIN_TIMED_TOKENS, llama_bench, plain_ollama
from finetune.core import families, layout
from finetune.host import containers
from finetune.serve import server
from finetune.serve.modelfiles import ListedModel

CASE = next(c for c in families.CASES if c.name == "qwen2.5")
MODELS_DIR = layout.LLAMA_CPP_MODELS_DIR
GGUF = "model-Q8_0.gguf"
N_GEN = 64
PROMPTS = ("Hello, how are you today?", "Tell me a story about a cat.", "商品を返品したいです",
           "What is the capital of Japan?", "Write a haiku about autumn.")


def run(b: Session) -> None:
    if not b.config.bench.models:
        return
    config = b.bench_config()
    server.stop(config)  # its port; the pipeline rows start their own
    b.details["generation at real sizes"] = {}
    ollamas = {layout.OLLAMA_SERVE_RELEASE: layout.image_tag("serve")}
    if containers.image_exists(newest := layout.ollama_image(layout.OLLAMA_NEWEST)):
        ollamas[layout.OLLAMA_NEWEST] = newest
    for shape in b.config.bench.models:
        work = b.out / f"model-{shape}"
        built = build(b, shape, work)
        size = f"random-init {shape} ({built['parameters'] / 1e6:.0f}M, qwen2 vocab), Q8_0"
        found = b.details["generation at real sizes"][shape] = {"model": built, "gguf": str(work / GGUF)}
        for threads in sorted({1, os.cpu_count() or 1}):
            timed = {release: ollama_rates(b, config, image, work, threads) for release, image in ollamas.items()}
            prompt = round(statistics.median(n for samples in timed.values() for n, _ in samples) or 1)
            _, tg = llama_bench(b, GGUF, prompt, N_GEN, threads, folder=work)
            same = f"llama-bench, same GGUF and {threads} thread{'s' if threads > 1 else ''}"
            found[f"{threads} threads"] = {"llama_bench_tg": tg, **{f"ollama {r}": s for r, s in timed.items()}}
            found[f"{threads} threads"]["per generated token"] = {
                "llama-bench ms": per_token(tg),
                **{f"ollama {r} ms": per_token([x for _, x in s]) for r, s in timed.items()}}
            for release, samples in timed.items():
                b.add(Row("serve", f"generation tokens/s, {size}, {threads} thread{'s' if threads > 1 else ''}, "
                                   f"Ollama {release}", "tok/s", [rate for _, rate in samples], same, tg, True))


def per_token(rates: list[float]) -> float:
    """Milliseconds per generated token at the median rate."""
    return 1000 / statistics.median(rates)


def build(b: Session, shape: str, work: Path) -> dict:
    """The Q8_0 GGUF of the random-init model in `work` (kept: a later bench with the same OUT reuses it)."""
    made = work / "vocab_model.json"
    if (work / GGUF).is_file() and made.is_file():
        print(f"bench: {shape}: reusing {work / GGUF}", flush=True)
        return json.loads(made.read_text(encoding="utf-8"))
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    names = [f"{MODELS_DIR}/ggml-vocab-{CASE.vocab}.gguf{x}" for x in ("", ".inp", ".out")]
    b.container(f"{shape} sources", layout.image_tag("convert"),
                [f"cp {' '.join(names)} {MODELS_DIR}/templates/{CASE.template} /out/"],
                [containers.Mount(work / "src", "/out", read_only=False)], entrypoint=["sh", "-c"])
    b.container(f"{shape} random-init model", layout.image_tag("train"),
                ["-m", "finetune.train.vocab_models", "--case", CASE.name, "--shape", shape, "--source", "/work/src",
                 "--out", "/work/hf"], [containers.Mount(work, "/work", read_only=False)], entrypoint=["python"])
    by_hand = ("python /opt/llama.cpp/convert_hf_to_gguf.py /work/hf --outtype f16 --outfile /work/f16.gguf && "
               f"llama-quantize /work/f16.gguf /work/{GGUF}.partial Q8_0 && mv /work/{GGUF}.partial /work/{GGUF}")
    b.container(f"{shape} to Q8_0", layout.image_tag("convert"), [by_hand],
                [containers.Mount(work, "/work", read_only=False)], entrypoint=["sh", "-c"])
    shutil.copy(work / "hf" / "vocab_model.json", made)
    for bulky in (work / "hf", work / "f16.gguf", work / "src"):  # 2 GB of float32 for 0.5b
        shutil.rmtree(bulky) if bulky.is_dir() else bulky.unlink()
    return json.loads(made.read_text(encoding="utf-8"))


def ollama_rates(b: Session, config, image: str, work: Path, threads: int) -> list[tuple[int, float]]:
    """(prompt tokens, generation tokens/s) of each timed answer, Ollama's own eval timings: bench.repeats
    times each prompt after one answer that loads the model; answers under MIN_TIMED_TOKENS are left out."""
    import ollama

    (work / "Modelfile").write_text(f"FROM ./{GGUF}\n", encoding="utf-8")
    volume = f"finetune-bench-models-{config.run}"
    volumes = {str(work.resolve()): {"bind": f"{layout.CONTAINER_RUN_DIR}/serve", "mode": "ro"},
               volume: {"bind": layout.MODELS_MOUNT, "mode": "rw"}}
    options = {"num_predict": N_GEN, "num_thread": threads, "temperature": 1.0, "top_k": 40, "top_p": 0.9}
    samples, short = [], 0
    try:
        with plain_ollama(b, config, image, [ListedModel("bench-size", "Modelfile", GGUF)], volumes):
            client = ollama.Client(host=server.url(config))
            client.generate("bench-size", PROMPTS[0], raw=True, options=options | {"seed": 0})  # loads it
            for repeat in range(b.repeats):
                for prompt in PROMPTS:
                    done = client.generate("bench-size", prompt, raw=True, options=options | {"seed": repeat + 1})
                    if (done.eval_count or 0) < MIN_TIMED_TOKENS or not done.eval_duration:
                        short += 1
                        continue
                    samples.append((done.prompt_eval_count or 0, done.eval_count / (done.eval_duration / 1e9)))
    finally:
        remove_volume(volume)
    if not samples:
        raise BenchError(f"no answer from the random-init model in {image} had {MIN_TIMED_TOKENS}+ tokens")
    if short:
        print(f"bench: {short} answers in {image} were under {MIN_TIMED_TOKENS} tokens, left out", file=sys.stderr)
    return samples
