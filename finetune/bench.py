"""`invoke bench`: the speed, memory and size of every stage, each beside the plain tool it replaces,
measured in the same run on the same machine.

    ./invoke bench [--config C] [--out DIR]      (runs on the host and drives the stage images)

What it measures, bench.repeats times each (median, min and max):
    train     tokens/s, peak memory and wall time of `invoke train` vs bench/plain_sft.py, a minimal TRL
              SFTTrainer script run in the same image on the same model, data, steps and precision; packing
              off and on, with train.deterministic off (what byte-reproducible training costs) and with
              train.pin_cpu off (what the numerical pin within it costs: finetune/numerics.py). On a
              GPU also QLoRA vs LoRA memory, and model FLOPs utilization.
    convert   wall time of `invoke convert` vs convert_hf_to_gguf.py + llama-quantize run by hand on the
              same merged model; and the stage's own convert + quantize phases vs the same two commands
    serve     generation tokens/s, prompt tokens/s and time to first token through Ollama vs llama-bench
              (the same llama.cpp source as the convert stage) on the same GGUF with the same threads; cold
              start of the serve container until healthy vs a plain `ollama serve` + `ollama create`
    pipeline  `invoke train convert serve` from an empty run directory, and again with nothing changed, vs
              the plain tools one after another; the size of each image
Every ratio is a cost: ours over the baseline's for a time or a size, the baseline's over ours for a rate.
Above 1 the stage costs more than the plain tool; above 1.10 the table flags it, and the stage profiles
(wall time per phase, from train/summary.json and convert/report.json) show where the time goes.

The stages run as a user runs them (`invoke <stage>` in a subprocess) on a separate run, <run>-bench, with
train.max_steps=bench.train_steps and serve.port=bench.port: the user's run and server are not touched.
Writes OUT/bench.json (every sample) and OUT/bench.md (the table), and the logs of every run to OUT/logs/.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

from docker.errors import NotFound

from finetune import cache, containers, manifest
from finetune import data as datasets_
from finetune import serve as serve_stage
from finetune.config import RunConfig, load_config
from finetune.train import lora_kwargs, sft_kwargs

ROOT = Path(__file__).resolve().parent.parent
PLAIN_SFT = ROOT / "bench" / "plain_sft.py"
FLAG_ABOVE = 1.10
QUESTIONS = 8  # distinct questions per repeat: consecutive requests never share more than the system prompt
MAX_NEW_TOKENS = 128
# Image sizes as the closing note of each stage's issue gave them, to see growth.
NOTED_BYTES = {"finetune-base": 117e6, "finetune-train": 6.64e9, "finetune-convert": 6.25e9,
               "finetune-ollama": 235e6, "finetune-serve": 235e6}
# Dense bf16 peak FLOP/s from the vendors' data sheets, for model FLOPs utilization (longest name first).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


class BenchError(RuntimeError):
    """A run that failed while being measured; the message has the end of its log."""


def tokens_per_second(run: dict) -> float:
    """Training throughput from a train summary.json or the plain script's result.json (the same keys)."""
    return run["tokens_seen"] / run["train_seconds"]


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class Row:
    """One figure of the table: our samples beside the baseline's."""

    stage: str
    figure: str
    unit: str
    ours: list[float]
    baseline_name: str
    baseline: list[float]
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        """The cost ratio: above 1, ours costs more than the baseline."""
        ours, theirs = statistics.median(self.ours), statistics.median(self.baseline) if self.baseline else None
        if not theirs or not ours:
            return None
        return theirs / ours if self.higher_is_better else ours / theirs

    def to_json(self) -> dict:
        return asdict(self) | {"ours_stats": summarize(self.ours), "ratio": self.ratio,
                               "baseline_stats": summarize(self.baseline) if self.baseline else None}


class Bench:
    """The measurements of one config; `run()` does them all and writes the results."""

    def __init__(self, config: RunConfig, config_path: str, overrides: list[str], out: Path, images: list[str]):
        self.config = config
        self.config_path = config_path
        self.repeats = config.bench.repeats
        self.run_name = f"{config.run}-bench"
        self.run_dir = ROOT / "artifacts" / self.run_name
        # A bench training is a time sample, not a model to serve: after a few steps its greedy answers may run
        # on, which convert's quality check would refuse (convert.require_stop); here it only records them.
        self.sets = [*overrides, f"run={self.run_name}", f"train.max_steps={config.bench.train_steps}",
                     f"serve.port={config.bench.port}", "convert.require_stop=false"]
        self.out = out.resolve()
        self.images = images
        self.rows: list[Row] = []
        self.profiles: dict[str, dict[str, float]] = {}
        self.details: dict = {}
        self.baseline_walls: dict[str, float] = {}  # median wall time of each plain tool, for the pipeline
        self.train_rates: dict[str, list[float]] = {}  # tokens/s samples of each training variant
        self._logs = 0

    # ---- helpers ----
    def bench_config(self, *extra: str) -> RunConfig:
        """The config that `invoke` gets in the bench's subprocesses."""
        return load_config(self.config_path, [*self.sets, *extra], root=ROOT)

    def log_path(self, label: str) -> Path:
        self._logs += 1
        return self.out / "logs" / f"{self._logs:03d}-{label.replace(' ', '-').replace('/', '-')}.log"

    def invoke(self, tasks: list[str], extra: tuple[str, ...] = (), force: bool = False) -> float:
        """Run `invoke <task>...` on the bench run as a user would; return its wall time in seconds."""
        argv = [sys.executable, "-m", "invoke"]
        for task in tasks:
            argv += [task, "--config", self.config_path]
            for value in [*self.sets, *extra]:
                argv += ["--set", value]
            argv += ["--force"] if force else []
        log = self.log_path("invoke " + " ".join(tasks))
        started = time.perf_counter()
        with log.open("w") as f:
            done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise BenchError(f"`invoke {' '.join(tasks)}` exited with {done.returncode}; {log} ends:\n{tail(log)}")
        return seconds

    def container(self, label: str, image: str, command: list[str], mounts: list[containers.Mount],
                  **kwargs) -> float:
        """Run a baseline in a stage image, its output to a log; return its wall time in seconds."""
        log = self.log_path(label)
        started = time.perf_counter()
        with log.open("w") as f, redirect_stdout(f):
            code = containers.run(image, command, mounts, name=f"finetune-bench-{self.config.run}", **kwargs)
        seconds = time.perf_counter() - started
        if code != 0:
            raise BenchError(f"{label} exited with {code}; {log} ends:\n{tail(log)}")
        return seconds

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        print(f"bench: {row.stage}: {row.figure}: {fmt(statistics.median(row.ours))} {row.unit} "
              f"vs {fmt(statistics.median(row.baseline)) if row.baseline else '-'} ({row.baseline_name}); "
              f"ratio {ratio}", flush=True)

    def with_overheads(self, stage: str, wall: float, phases: dict[str, float]) -> dict[str, float]:
        """A stage's own phases (from inside its container) and what surrounds them: invoke on the host
        (image build check, cache key, lock, manifest) and the container's life around the stage code."""
        container = cache.read_stamp(self.run_dir, stage)["seconds"]
        return {"host: invoke, image check, cache, manifest": wall - container,
                "container create, start, removal; Python start": container - sum(phases.values()), **phases}

    def profile(self, name: str, samples: list[dict[str, float]]) -> None:
        phases = dict.fromkeys(p for s in samples for p in s)
        self.profiles[name] = {p: statistics.median(s.get(p, 0.0) for s in samples) for p in phases}

    # ---- train ----
    def train(self) -> None:
        chats = self.out / "plain-data.jsonl"  # what a user feeds TRL: the run's examples as chats
        limit = self.config.data.limit
        examples = datasets_.read_split(self.config.data.train).examples[:limit]
        chats.write_text("".join(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n" for e in examples),
                         encoding="utf-8")
        if containers.has_gpu():
            self.train_methods(chats)
        # What byte-reproducible training costs (most with packing), and the numerical pin within it; first, so
        # that the run ends as configured.
        t = self.config.train
        if t.deterministic:
            self.train_variant(chats, True, "train.deterministic=false")
        if t.deterministic and t.pin_cpu:
            self.train_variant(chats, True, "train.pin_cpu=false")
        for packed in (not t.packing, t.packing):  # the config's own setting last: the run stays as configured
            self.train_variant(chats, packed)
        for variant, what in (("train.deterministic=false", "byte-reproducible training (train.deterministic)"),
                              ("train.pin_cpu=false", "the numerical pin (train.pin_cpu)")):
            if (off := self.train_rates.get(f"packing on, {variant}")) is not None:
                self.add(Row("train", f"training tokens/s with {what}, packing on", "tok/s",
                             self.train_rates["packing on"], f"the same stage with {variant}", off, True))

    def train_stage(self, extra: tuple[str, ...]) -> tuple[float, dict]:
        wall = self.invoke(["train"], extra, force=True)
        return wall, json.loads((self.run_dir / "train" / "summary.json").read_text())

    def train_variant(self, chats: Path, packed: bool, variant: str | None = None) -> None:
        """One training setting, `variant` (an override) on top of the config's, beside the plain script."""
        label = f"packing {'on' if packed else 'off'}" + (f", {variant}" if variant else "")
        extra = (f"train.packing={str(packed).lower()}", *((variant,) if variant else ()))
        ours: dict[str, list] = {"tps": [], "memory": [], "wall": [], "summary": [], "phases": []}
        plain: dict[str, list] = {"tps": [], "memory": [], "wall": []}
        for i in range(self.repeats):
            wall, summary = self.train_stage(extra)
            result, plain_wall = self.plain_train(chats, summary, extra)
            for into, run, seconds in ((ours, summary, wall), (plain, result, plain_wall)):
                into["tps"].append(tokens_per_second(run))
                into["memory"].append(run["peak_memory_mb"])
                into["wall"].append(seconds)
            ours["summary"].append(summary)
            ours["phases"].append(self.with_overheads("train", wall, summary["seconds"]))
            print(f"bench: train {label} {i + 1}/{self.repeats}: invoke train {wall:.1f} s, {ours['tps'][-1]:.0f} "
                  f"tok/s; plain TRL {plain_wall:.1f} s, {plain['tps'][-1]:.0f} tok/s", flush=True)
        name = "plain TRL SFTTrainer script"
        self.add(Row("train", f"training tokens/s, {label}", "tok/s", ours["tps"], name, plain["tps"], True))
        self.add(Row("train", f"peak memory, {label}", "MiB", ours["memory"], name, plain["memory"]))
        self.add(Row("train", f"wall time of `invoke train`, {label}", "s", ours["wall"],
                     f"{name} (docker run)", plain["wall"]))
        self.profile(f"train, {label}", ours["phases"])
        self.train_rates[label] = ours["tps"]
        self.baseline_walls[f"train, {label}"] = statistics.median(plain["wall"])
        summary = ours["summary"][-1]
        if summary["device"] == "cuda" and not packed and variant is None:
            self.mfu_row(ours, plain, summary)

    def plain_train(self, chats: Path, summary: dict, extra: tuple[str, ...]) -> tuple[dict, float]:
        """bench/plain_sft.py in the train image with the stage's hyperparameters, precision and device."""
        config = self.bench_config(*extra)
        spec = {"sft": sft_kwargs(config, summary["device"], summary["precision"]) | {"save_strategy": "no"},
                "lora": lora_kwargs(config), "qlora": summary["method"] == "qlora", "revision": config.model.revision}
        work = self.out / "plain-train"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "spec.json").write_text(json.dumps(spec, indent=2))
        mounts = [containers.Mount(work, "/out", read_only=False), containers.Mount(chats, "/data/chats.jsonl"),
                  containers.Mount(PLAIN_SFT, "/bench/plain_sft.py")]
        env = {"HF_HUB_OFFLINE": "1"}  # the stage has just put a hub model into the cache volume
        if config.model.id.startswith("builtin:"):
            base = self.run_dir / "train" / "base"
            if not (base / "config.json").is_file():
                raise BenchError(f"no {base}: the plain baseline trains the tiny model that the train stage built; "
                                 "set serve.baseline=true so that the stage keeps it")
            mounts.append(containers.Mount(base, "/model"))
            model = "/model"
        else:
            model = config.model.id
            if os.environ.get("HF_TOKEN"):
                env["HF_TOKEN"] = os.environ["HF_TOKEN"]
        wall = self.container("plain TRL", "finetune-train:latest",
                              ["/bench/plain_sft.py", "--model", model, "--data", "/data/chats.jsonl",
                               "--spec", "/out/spec.json", "--out", "/out"], mounts,
                              entrypoint=["python"], env=env, gpus=summary["device"] == "cuda",
                              named_volumes={"finetune-hf-cache": "/cache/hf"})
        return json.loads((work / "result.json").read_text()), wall

    def train_methods(self, chats: Path) -> None:
        """On a GPU: peak memory and tokens/s of QLoRA against LoRA, both through `invoke train`."""
        samples: dict[str, dict[str, list]] = {m: {"memory": [], "tps": []} for m in ("lora", "qlora")}
        for i in range(self.repeats):
            for method in samples:
                _, summary = self.train_stage((f"train.method={method}",))
                samples[method]["memory"].append(summary["peak_memory_mb"])
                samples[method]["tps"].append(tokens_per_second(summary))
        self.add(Row("train", "peak GPU memory, QLoRA", "MiB", samples["qlora"]["memory"], "LoRA (same run)",
                     samples["lora"]["memory"]))
        self.add(Row("train", "training tokens/s, QLoRA", "tok/s", samples["qlora"]["tps"], "LoRA (same run)",
                     samples["lora"]["tps"], True))

    def mfu_row(self, ours: dict, plain: dict, summary: dict) -> None:
        """Model FLOPs utilization: tokens/s x 6 x parameters over the GPU's dense bf16 peak."""
        gpu = summary.get("device_name", "")
        peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in gpu), None)
        if peak is None:
            self.details["mfu"] = f"not computed: no peak bf16 FLOP/s known for {gpu!r} (PEAK_BF16_FLOPS)"
            return
        mfu = lambda tps: 100 * tps * 6 * summary["parameters"] / peak  # noqa: E731
        self.add(Row("train", f"MFU on {gpu} ({peak / 1e12:.0f} TFLOP/s bf16)", "%", [mfu(x) for x in ours["tps"]],
                     "plain TRL SFTTrainer script", [mfu(x) for x in plain["tps"]], True))

    # ---- convert ----
    def convert(self) -> None:
        config = self.bench_config()
        walls, cores, hand_walls, hand_cores, reports = [], [], [], [], []
        for i in range(self.repeats):
            walls.append(self.invoke(["convert"], force=True))
            report = json.loads((self.run_dir / "convert" / "report.json").read_text())
            reports.append(self.with_overheads("convert", walls[-1], report["seconds"]))
            cores.append(report["seconds"]["convert_hf_to_gguf"] + report["seconds"]["llama-quantize"])
            wall, inside = self.convert_by_hand(config)
            hand_walls.append(wall)
            hand_cores.append(inside)
            print(f"bench: convert {i + 1}/{self.repeats}: invoke convert {walls[-1]:.1f} s; by hand {wall:.1f} s",
                  flush=True)
        by_hand = "convert_hf_to_gguf.py + llama-quantize by hand"
        self.add(Row("convert", "wall time of `invoke convert`", "s", walls, f"{by_hand} (docker run)", hand_walls))
        self.add(Row("convert", "the stage's convert + quantize phases", "s", cores,
                     f"{by_hand}, timed inside the container", hand_cores))
        self.profile("convert", reports)
        self.baseline_walls["convert"] = statistics.median(hand_walls)

    def convert_by_hand(self, config: RunConfig) -> tuple[float, float]:
        """The two llama.cpp commands on the run's merged model, in the convert image; (wall, inside) seconds."""
        work = self.out / "hand-convert"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        full = f"/out/model-{config.convert.outtype}.gguf"
        commands = [f"python /opt/llama.cpp/convert_hf_to_gguf.py /in/merged --outfile {full} "
                    f"--outtype {config.convert.outtype}"]
        commands += [f"llama-quantize {full} /out/model-{q}.gguf {q}" for q in config.convert.quant_types]
        script = ("set -e; s=$(date +%s%N); " + "; ".join(commands) +
                  '; echo "by-hand-ms $(( ($(date +%s%N) - s) / 1000000 ))" > /out/seconds')
        wall = self.container("by-hand convert", "finetune-convert:latest", [script],
                              [containers.Mount(work, "/out", read_only=False),
                               containers.Mount(self.run_dir / "train" / "merged", "/in/merged")],
                              entrypoint=["sh", "-c"])
        inside = int((work / "seconds").read_text().split()[1]) / 1000
        shutil.rmtree(work)
        return wall, inside

    # ---- serve ----
    def serve(self) -> None:
        config = self.bench_config()
        self.serve_cold_start(config)
        self.invoke(["serve"])  # the bench run served again from its usual model store
        self.serve_generation(config)

    def serve_cold_start(self, config: RunConfig) -> None:
        """Until the models answer, from an empty model store: the serve container against plain Ollama."""
        self.invoke(["serve"])  # writes the Modelfiles and builds the image when needed
        engine = containers.client()
        container = engine.containers.get(serve_stage.container_name(config))
        image, key = container.image.id, container.labels["finetune.key"]
        models = serve_stage.read_models(self.run_dir)
        volume = f"finetune-bench-models-{config.run}"
        ours, plain = [], []
        for i in range(self.repeats):
            serve_stage.stop(config)
            remove_volume(volume)
            started = time.perf_counter()
            serve_stage.start(config, self.run_dir, image, [m.name for m in models], key, volume=volume)
            ours.append(time.perf_counter() - started)
            serve_stage.stop(config)
            remove_volume(volume)
            plain.append(self.plain_ollama_start(config, image, models, volume))
            remove_volume(volume)
            print(f"bench: serve cold start {i + 1}/{self.repeats}: serve container {ours[-1]:.1f} s; "
                  f"plain ollama {plain[-1]:.1f} s", flush=True)
        self.add(Row("serve", "cold start until every model answers (empty model store)", "s", ours,
                     "plain `ollama serve` + `ollama create` by hand", plain))
        self.baseline_walls["serve"] = statistics.median(plain)

    def plain_ollama_start(self, config: RunConfig, image: str, models: list[serve_stage.ListedModel],
                           volume: str) -> float:
        """`ollama serve` in the same image, polled every 0.1 s until it answers, then `ollama create` per
        model: what a user does by hand. Seconds from `docker run` until the last model exists."""
        engine = containers.client()
        run_dir = self.run_dir.resolve()
        started = time.perf_counter()
        container = engine.containers.run(
            image, ["serve"], entrypoint=["ollama"], detach=True, name=f"finetune-bench-ollama-{config.run}",
            user=f"{containers.IMAGE_UID}:{containers.IMAGE_UID}",
            ports={serve_stage.CONTAINER_PORT: ("127.0.0.1", config.serve.port)},
            volumes={str(run_dir / "serve"): {"bind": "/artifacts/serve", "mode": "ro"},
                     str(run_dir / "convert"): {"bind": "/artifacts/convert", "mode": "ro"},
                     volume: {"bind": "/models", "mode": "rw"}})
        try:
            while True:
                try:
                    serve_stage.ollama_version(config)
                    break
                except OSError:
                    if time.perf_counter() - started > serve_stage.HEALTHY_WITHIN_S:
                        raise BenchError("plain ollama serve did not answer") from None
                    time.sleep(0.1)
            for m in models:
                code, output = container.exec_run(["ollama", "create", m.name, "-f", m.modelfile],
                                                  workdir="/artifacts/serve")
                if code != 0:
                    raise BenchError(f"ollama create {m.name} failed: {output.decode(errors='replace')[-500:]}")
            return time.perf_counter() - started
        finally:
            container.remove(force=True)

    def serve_generation(self, config: RunConfig) -> None:
        """Ollama's own timings of the served model on distinct questions, then llama-bench on its GGUF with
        the measured prompt and answer lengths and the same number of threads."""
        import ollama

        split = config.data.eval or config.data.train
        questions = [next(m["content"] for m in e.messages if m["role"] == "user")
                     for e in datasets_.read_split(split).examples][: QUESTIONS]
        threads = config.serve.num_thread or os.cpu_count() or 1  # Ollama's default: one per core
        options = {"num_predict": MAX_NEW_TOKENS}  # else as served: the Modelfile's sampling and threads
        client = ollama.Client(host=serve_stage.url(config))
        # The baseline when there is one: same architecture and size as the fine-tuned model, and its answers
        # run on (a toy trained for bench.train_steps ends its answers after a few tokens, too few to time).
        model, gguf = config.serve.model_name, f"model-{config.serve.quant}.gguf"
        if config.serve.baseline:
            model, gguf = serve_stage.baseline_name(model), f"base-{config.serve.quant}.gguf"
        client.chat(model=model, messages=[{"role": "user", "content": questions[0]}], options=options)  # load it
        samples, incomplete = [], 0
        for _ in range(self.repeats):
            for question in questions:
                started, first, last = time.perf_counter(), None, None
                for part in client.chat(model=model, messages=[{"role": "user", "content": question}],
                                        options=options, stream=True):
                    if first is None and part.message.content:
                        first = time.perf_counter()
                    last = part
                if last is None or not last.done:  # Ollama 0.24.0 sometimes closes a stream without its
                    incomplete += 1                # final message (and timings); seen on runaway answers
                    continue
                samples.append({"ttft_ms": 1000 * ((first or time.perf_counter()) - started),
                                "eval_count": last.eval_count, "eval_s": last.eval_duration / 1e9,
                                "prompt_count": last.prompt_eval_count, "prompt_s": last.prompt_eval_duration / 1e9})
        if not samples:
            raise BenchError(f"none of {incomplete} answers from {model} ended with Ollama's timings")
        n_prompt = round(statistics.median(s["prompt_count"] for s in samples))
        n_gen = round(statistics.median(s["eval_count"] for s in samples))
        pp, tg = self.llama_bench(gguf, n_prompt, n_gen, threads)
        self.details["serve"] = {"model": model, "gguf": gguf, "threads": threads, "questions": len(questions),
                                 "prompt_tokens": n_prompt, "generated_tokens": n_gen, "ollama": samples,
                                 "streams_without_final_message": incomplete,
                                 "llama_bench": {"pp": pp, "tg": tg}}
        ollama_tps = [s["eval_count"] / s["eval_s"] for s in samples]
        per_token = lambda rates: 1000 / statistics.median(rates)  # noqa: E731
        same = f"llama-bench, same GGUF and {threads} thread{'s' if threads > 1 else ''}"
        self.details["per generated token"] = (
            f"Ollama {per_token(ollama_tps):.2f} ms, llama-bench {per_token(tg):.2f} ms: Ollama spends "
            f"{per_token(ollama_tps) - per_token(tg):.2f} ms more on each token ({gguf}; {same})")
        self.add(Row("serve", f"generation tokens/s, {model} (~{n_gen} tokens)", "tok/s", ollama_tps, same, tg, True))
        self.add(Row("serve", f"prompt tokens/s (~{n_prompt} tokens)", "tok/s",
                     [s["prompt_count"] / s["prompt_s"] for s in samples if s["prompt_s"] > 0], same, pp, True))
        tg_median = statistics.median(tg)
        self.add(Row("serve", "time to first token (client side)", "ms", [s["ttft_ms"] for s in samples],
                     "llama-bench: prompt eval + one token", [1000 * (n_prompt / x + 1 / tg_median) for x in pp]))

    def llama_bench(self, gguf: str, n_prompt: int, n_gen: int, threads: int) -> tuple[list[float], list[float]]:
        """llama-bench's per-repetition tokens/s for prompt processing and for generation."""
        work = self.out / "llama-bench"
        work.mkdir(parents=True, exist_ok=True)
        script = (f"llama-bench -m /gguf/{gguf} -p {n_prompt} -n {n_gen} -r {max(self.repeats, 3)} -t {threads} "
                  "-o json > /out/llama-bench.json")
        self.container("llama-bench", "finetune-convert:latest", [script],
                       [containers.Mount(work, "/out", read_only=False),
                        containers.Mount(self.run_dir / "convert", "/gguf")], entrypoint=["sh", "-c"])
        results = json.loads((work / "llama-bench.json").read_text())
        pp = next(r["samples_ts"] for r in results if r["n_prompt"] > 0 and r["n_gen"] == 0)
        tg = next(r["samples_ts"] for r in results if r["n_gen"] > 0 and r["n_prompt"] == 0)
        return pp, tg

    # ---- pipeline and images ----
    def pipeline(self) -> None:
        config = self.bench_config()
        cold, warm = [], []
        for i in range(self.repeats):
            serve_stage.stop(config)
            shutil.rmtree(self.run_dir)
            cold.append(self.invoke(["train", "convert", "serve"]))
            warm.append(self.invoke(["train", "convert", "serve"]))
            print(f"bench: pipeline {i + 1}/{self.repeats}: cold {cold[-1]:.1f} s, nothing changed {warm[-1]:.1f} s",
                  flush=True)
        serve_stage.stop(config)
        packing = "on" if self.config.train.packing else "off"
        by_hand = [self.baseline_walls[f"train, packing {packing}"] + self.baseline_walls["convert"]
                   + self.baseline_walls["serve"]]
        name = "plain TRL + llama.cpp + ollama by hand (sum of their medians above)"
        self.add(Row("pipeline", "`invoke train convert serve` from an empty run directory", "s", cold, name, by_hand))
        self.add(Row("pipeline", "`invoke train convert serve` again, nothing changed", "s", warm,
                     "the same by hand, which has no cache", by_hand))

    def image_sizes(self) -> None:
        engine = containers.client()
        for tag in self.images:
            size = engine.images.get(tag).attrs["Size"]
            noted = NOTED_BYTES.get(tag.split(":")[0])
            self.add(Row("images", f"`{tag}`", "MB", [size / 1e6], "size in the note of its issue",
                         [noted / 1e6] if noted else []))

    # ---- all ----
    def run(self) -> dict:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        started = time.time()
        print(f"bench: {self.config.run} as run {self.run_name}, {self.repeats} repeats, "
              f"train.max_steps={self.config.bench.train_steps}; logs in {self.out / 'logs'}", flush=True)
        self.train()
        self.convert()
        self.serve()
        self.pipeline()
        self.image_sizes()
        results = {"config": self.config_path, "run": self.config.run, "bench_run": self.run_name,
                   "repeats": self.repeats, "train_steps": self.config.bench.train_steps, "host": manifest.host(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                   "seconds": round(time.time() - started, 1), "flag_above": FLAG_ABOVE,
                   "rows": [r.to_json() for r in self.rows], "profiles": self.profiles, "details": self.details}
        (self.out / "bench.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (self.out / "bench.md").write_text(markdown(results), encoding="utf-8")
        return results


def run(config: RunConfig, config_path: str, overrides: list[str], out: Path | None, images: list[str]) -> dict:
    """Measure everything (see the module docstring); results in out (default artifacts/<run>-bench-results/)."""
    out = out or ROOT / "artifacts" / f"{config.run}-bench-results"
    return Bench(config, config_path, overrides, out, images).run()


def markdown(results: dict) -> str:
    host = results["host"]
    lines = [f"# Bench of {results['run']} ({results['config']})", "",
             f"{host['cpu']}, {host['cpus']} CPUs, GPUs: {', '.join(host['gpus']) or 'none'}; "
             f"{results['repeats']} repeats of each figure (median, min-max); "
             f"train.max_steps={results['train_steps']}; "
             f"{results['started']}, {results['seconds'] / 60:.0f} min.", "",
             "| stage | figure | ours: median (min-max) | baseline | baseline: median (min-max) | ratio |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ratio = r["ratio"]
        flag = " ⚠" if ratio is not None and ratio > results["flag_above"] else ""
        lines.append(f"| {r['stage']} | {r['figure']} | {spread(r['ours_stats'], r['unit'])} | {r['baseline_name']} | "
                     f"{spread(r['baseline_stats'], r['unit']) if r['baseline_stats'] else '-'} | "
                     f"{f'{ratio:.2f}' if ratio is not None else '-'}{flag} |")
    lines += ["", f"Ratio: the cost of ours over the baseline's (time, memory, size; for a rate, the baseline's rate "
              f"over ours). Above 1 ours costs more; ⚠ marks above {results['flag_above']:.2f}: see the profiles.",
              ""]
    for name, phases in results["profiles"].items():
        total = sum(phases.values())
        lines += [f"## Profile: {name} (median seconds per phase)", "",
                  "| phase | s | share |", "|---|---|---|"]
        lines += [f"| {p} | {fmt(s)} | {100 * s / total:.0f}% |" for p, s in phases.items()]
        lines += [f"| total | {fmt(total)} | |", ""]
    for key, value in results["details"].items():
        if isinstance(value, str):
            lines += [f"{key}: {value}", ""]
    return "\n".join(lines)


def spread(stats: dict, unit: str) -> str:
    if stats["n"] == 1:
        return f"{fmt(stats['median'])} {unit}"
    return f"{fmt(stats['median'])} ({fmt(stats['min'])}-{fmt(stats['max'])}) {unit}"


def fmt(x: float) -> str:
    """Three significant digits, without an exponent."""
    if x == 0:
        return "0"
    digits = max(0, 2 - int(f"{abs(x):e}".split("e")[1]))
    return f"{x:,.{digits}f}"


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def remove_volume(name: str) -> None:
    try:
        containers.client().volumes.get(name).remove(force=True)
    except NotFound:
        pass
