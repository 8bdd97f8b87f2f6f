"""The serve rows: the serve container's cold start against plain `ollama serve` + `ollama create` by hand, and
Ollama's generation speed against llama-bench (the convert image's, same llama.cpp source) on the same GGUF."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from finetune.bench.common import BenchError, Row, Session, remove_volume
from finetune.core import data as datasets_
from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.host import containers
from finetune.serve import server
from finetune.serve.modelfiles import ListedModel, read_models

QUESTIONS = 8  # distinct questions per repeat: consecutive requests never share more than the system prompt
MAX_NEW_TOKENS = 128
MIN_TIMED_TOKENS = 8  # an answer shorter than this has no meaningful tokens/s (0.34.3 reports 1 token in 1 µs)


def run(b: Session) -> None:
    config = b.bench_config()
    cold_start(b, config)
    b.invoke(["serve"])  # the bench run served again from its usual model store
    generation(b, config)


def cold_start(b: Session, config: RunConfig) -> None:
    """Until the models answer, from an empty model store: the serve container against plain Ollama."""
    b.invoke(["serve"])  # writes the Modelfiles and builds the image when needed
    engine = containers.client()
    container = engine.containers.get(server.container_name(config))
    image, key = container.image.id, container.labels["finetune.key"]
    models = read_models(b.run_dir)
    volume = f"finetune-bench-models-{config.run}"  # an empty model store per cold start
    ours, plain = [], []
    for i in range(b.repeats):
        server.stop(config)
        remove_volume(volume)
        started = time.perf_counter()
        server.start(config, b.run_dir, image, [m.name for m in models], key, volume=volume)
        ours.append(time.perf_counter() - started)
        server.stop(config)
        remove_volume(volume)
        plain.append(plain_ollama_start(b, config, image, models, volume))
        remove_volume(volume)
        print(f"bench: serve cold start {i + 1}/{b.repeats}: serve container {ours[-1]:.1f} s; "
              f"plain ollama {plain[-1]:.1f} s", flush=True)
    b.add(Row("serve", "cold start until every model answers (empty model store)", "s", ours,
              "plain `ollama serve` + `ollama create` by hand", plain))
    b.baseline_walls["serve"] = statistics.median(plain)


def plain_ollama_start(b: Session, config: RunConfig, image: str, models: list[ListedModel],
                       volume: str) -> float:
    """`ollama serve` in the same image then `ollama create` per model, what a user does by hand: seconds from
    `docker run` until the last model exists."""
    started = time.perf_counter()
    with plain_ollama(b, config, image, models, server.volumes(b.run_dir.resolve(), volume)):
        return time.perf_counter() - started


@contextlib.contextmanager
def plain_ollama(b: Session, config: RunConfig, image: str, models: list[ListedModel],
                 volumes: dict) -> Iterator[None]:
    """`ollama serve` in `image` on the serve port, polled every 0.1 s until it answers, then `ollama create`
    per model in the mounted serve/; removed when the block ends."""
    engine = containers.client()
    started = time.perf_counter()
    container = engine.containers.run(
        image, ["serve"], entrypoint=["ollama"], detach=True, name=layout.container_name("bench-ollama", config.run),
        user=f"{containers.IMAGE_UID}:{containers.IMAGE_UID}",
        ports={server.CONTAINER_PORT: ("127.0.0.1", config.serve.port)}, volumes=volumes)
    try:
        while True:
            try:
                server.ollama_version(config)
                break
            except OSError:
                if time.perf_counter() - started > server.HEALTHY_WITHIN_S:
                    raise BenchError(f"plain ollama serve ({image}) did not answer") from None
                time.sleep(0.1)
        for m in models:
            code, output = container.exec_run(["ollama", "create", m.name, "-f", m.modelfile],
                                              workdir=f"{layout.CONTAINER_RUN_DIR}/serve")
            if code != 0:
                raise BenchError(f"ollama create {m.name} failed: {output.decode(errors='replace')[-500:]}")
        yield
    finally:
        container.remove(force=True)


def generation(b: Session, config: RunConfig) -> None:
    """Ollama's own timings of the served model on distinct questions, then llama-bench on its GGUF with
    the measured prompt and answer lengths and the same number of threads."""
    import ollama

    split = config.data.eval or config.data.train
    questions = [next(m["content"] for m in e.messages if m["role"] == "user")
                 for e in datasets_.read_split(split).examples][: QUESTIONS]
    threads = config.serve.num_thread or os.cpu_count() or 1  # Ollama's default: one per core
    options = {"num_predict": MAX_NEW_TOKENS}  # else as served: the Modelfile's sampling and threads
    client = ollama.Client(host=server.url(config))
    # The baseline when there is one: same architecture and size as the fine-tuned model, and its answers
    # run on (a toy trained for bench.train_steps ends its answers after a few tokens, too few to time).
    # Ollama cuts short an answer that repeats one token (server.REPEAT_ABORT), without timings: some of the
    # undertrained toy's, and all of the baseline's
    # on an AMD EPYC whose weights differ (README, Reproducibility); then the fine-tuned model is timed.
    candidates = [(config.serve.model_name, layout.model_gguf(config.serve.quant))]
    if config.serve.baseline:
        candidates.insert(0, (layout.baseline_name(config.serve.model_name), layout.base_gguf(config.serve.quant)))
    for model, gguf in candidates:
        samples, incomplete = timed_answers(b, client, model, questions, options)
        if samples:
            break
        print(f"bench: none of {incomplete} answers from {model} ended with Ollama's timings (its final message, "
              "which Ollama leaves out of an answer it cuts short for repeating one token)", file=sys.stderr, flush=True)
    else:
        raise BenchError(f"no answer from {' or '.join(m for m, _ in candidates)} ended with Ollama's timings")
    n_prompt = round(statistics.median(s["prompt_count"] for s in samples))
    n_gen = round(statistics.median(s["eval_count"] for s in samples))
    pp, tg = llama_bench(b, gguf, n_prompt, n_gen, threads)
    b.details["serve"] = {"model": model, "gguf": gguf, "threads": threads, "questions": len(questions),
                             "prompt_tokens": n_prompt, "generated_tokens": n_gen, "ollama": samples,
                             "streams_without_final_message": incomplete,
                             "llama_bench": {"pp": pp, "tg": tg}}
    ollama_tps = [s["eval_count"] / s["eval_s"] for s in samples]
    per_token = lambda rates: 1000 / statistics.median(rates)  # noqa: E731
    same = f"llama-bench, same GGUF and {threads} thread{'s' if threads > 1 else ''}"
    b.details["per generated token"] = (
        f"Ollama {per_token(ollama_tps):.2f} ms, llama-bench {per_token(tg):.2f} ms: Ollama spends "
        f"{per_token(ollama_tps) - per_token(tg):.2f} ms more on each token ({gguf}; {same})")
    b.add(Row("serve", f"generation tokens/s, {model} (~{n_gen} tokens)", "tok/s", ollama_tps, same, tg, True))
    newest_generation(b, config, model, questions, options, same, tg)
    b.add(Row("serve", f"prompt tokens/s (~{n_prompt} tokens)", "tok/s",
              [s["prompt_count"] / s["prompt_s"] for s in samples if s["prompt_s"] > 0], same, pp, True))
    tg_median = statistics.median(tg)
    b.add(Row("serve", "time to first token (client side)", "ms", [s["ttft_ms"] for s in samples],
              "llama-bench: prompt eval + one token", [1000 * (n_prompt / x + 1 / tg_median) for x in pp]))


def newest_generation(b: Session, config: RunConfig, model: str, questions: list[str], options: dict,
                      same: str, tg: list[float]) -> None:
    """The same model and questions on the newest Ollama (the llama-server generation, Dockerfile.ollama-0.34),
    where that image is built: a row beside the serve image's, against the same llama-bench figures. Its
    llama-server is llama.cpp b11063, llama-bench the convert image's older llama.cpp."""
    import ollama

    image = layout.ollama_image(layout.OLLAMA_NEWEST)
    if not containers.image_exists(image):
        print(f"bench: {image} not built, so no row for it (`invoke images.ollama --release "
              f"{layout.OLLAMA_NEWEST}`)", flush=True)
        return
    server.stop(config)  # its port
    listed = [m for m in read_models(b.run_dir) if m.name == model]
    inputs = {k: v for k, v in server.volumes(b.run_dir.resolve()).items() if v["mode"] == "ro"}
    with plain_ollama(b, config, image, listed, inputs):
        samples, incomplete = timed_answers(b, ollama.Client(host=server.url(config)), model, questions, options)
    b.invoke(["serve"])
    timed = [s for s in samples if s["eval_count"] >= MIN_TIMED_TOKENS]
    b.details["serve"]["ollama_newest"] = {"image": image, "samples": samples,
                                           "streams_without_final_message": incomplete}
    if not timed:  # seen: the 20-step bench toy stops after 1 token on 0.34.3 where 0.24.0 runs to num_predict
        b.details["serve"]["ollama_newest"]["untimed"] = (
            f"no answer of {model} had {MIN_TIMED_TOKENS}+ tokens with timings on Ollama {layout.OLLAMA_NEWEST} "
            f"({len(samples)} with timings, {incomplete} cut short)")
        print(f"bench: {b.details['serve']['ollama_newest']['untimed']}: no row for it", flush=True)
        return
    b.add(Row("serve", f"generation tokens/s, {model} on Ollama {layout.OLLAMA_NEWEST} (llama-server)", "tok/s",
              [s["eval_count"] / s["eval_s"] for s in timed], same, tg, True))


def timed_answers(b: Session, client, model: str, questions: list[str], options: dict) -> tuple[list[dict], int]:
    """Ollama's timings of `model`'s streamed answers, bench.repeats times each question (after one answer
    that loads it), and how many answers ended without the final message that carries them."""
    server.stream_chat(client, model, [{"role": "user", "content": questions[0]}], options)  # loads it
    samples, incomplete = [], 0
    for _ in range(b.repeats):
        for question in questions:
            started, first = time.perf_counter(), []

            def mark_first(piece: str) -> None:
                if piece and not first:
                    first.append(time.perf_counter())
            _, last = server.stream_chat(client, model, [{"role": "user", "content": question}], options, mark_first)
            if last is None:  # cut short by Ollama (server.REPEAT_ABORT): no timings
                incomplete += 1
                continue
            if not last.eval_duration:  # seen: an answer that ended at once (Ollama leaves a zero duration out)
                continue
            samples.append({"ttft_ms": 1000 * ((first or [time.perf_counter()])[0] - started),
                            "eval_count": last.eval_count, "eval_s": last.eval_duration / 1e9,
                            "prompt_count": last.prompt_eval_count or 0,
                            "prompt_s": (last.prompt_eval_duration or 0) / 1e9})
    return samples, incomplete


def llama_bench(b: Session, gguf: str, n_prompt: int, n_gen: int, threads: int,
                folder: Path | None = None) -> tuple[list[float], list[float]]:
    """llama-bench's per-repetition tokens/s for prompt processing and for generation, on `gguf` in `folder`
    (default: the bench run's convert/)."""
    work = b.out / "llama-bench"
    work.mkdir(parents=True, exist_ok=True)
    script = (f"llama-bench -m /gguf/{gguf} -p {n_prompt} -n {n_gen} -r {max(b.repeats, 3)} -t {threads} "
              "-o json > /out/llama-bench.json")
    b.container("llama-bench", layout.image_tag("convert"), [script],
                [containers.Mount(work, "/out", read_only=False),
                 containers.Mount(folder or layout.stage_dir(b.run_dir, "convert"), "/gguf")], entrypoint=["sh", "-c"])
    results = json.loads((work / "llama-bench.json").read_text())
    pp = next(r["samples_ts"] for r in results if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["samples_ts"] for r in results if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp, tg
