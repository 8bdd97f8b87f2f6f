"""The train rows: `invoke train` against a plain TRL SFTTrainer script (plain_sft.py) in the same image, with
the stage's own hyperparameters; packing off and on, train.deterministic and train.pin_cpu off (what they
cost); 2 processes (DDP) against 1 and the scaling efficiency; on a GPU also QLoRA against LoRA and model
FLOPs utilization."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

from finetune.bench.common import BenchError, Row, Session, summarize, tokens_per_second
from finetune.core import data as datasets_
from finetune.core import layout
from finetune.core.config import to_yaml
from finetune.host import containers

PLAIN_SFT = Path(__file__).with_name("plain_sft.py")
# Dense bf16 peak FLOP/s from the vendors' data sheets, for model FLOPs utilization (longest name first).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def run(b: Session) -> None:
    chats = b.out / "plain-data.jsonl"  # what a user feeds TRL: the run's examples as chats
    limit = b.config.data.limit
    examples = datasets_.read_split(b.config.data.train).examples[:limit]
    chats.write_text("".join(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n" for e in examples),
                     encoding="utf-8")
    if containers.has_gpu():
        methods(b, chats)
    # What byte-reproducible training costs (most with packing), and the numerical pin within it; first, so
    # that the run ends as configured.
    t = b.config.train
    if t.deterministic:
        setting(b, chats, True, "train.deterministic=false")
    if t.deterministic and t.pin_cpu:
        setting(b, chats, True, "train.pin_cpu=false")
    processes(b)
    for packed in (not t.packing, t.packing):  # the config's own setting last: the run stays as configured
        setting(b, chats, packed)
    for variant, what in (("train.deterministic=false", "byte-reproducible training (train.deterministic)"),
                          ("train.pin_cpu=false", "the numerical pin (train.pin_cpu)")):
        if (off := b.train_rates.get(f"packing on, {variant}")) is not None:
            b.add(Row("train", f"training tokens/s with {what}, packing on", "tok/s",
                      b.train_rates["packing on"], f"the same stage with {variant}", off, True))


def train_stage(b: Session, extra: tuple[str, ...]) -> tuple[float, dict]:
    wall = b.invoke(["train"], extra, force=True)
    return wall, json.loads((layout.stage_dir(b.run_dir, "train") / layout.SUMMARY).read_text())


def setting(b: Session, chats: Path, packed: bool, variant: str | None = None) -> None:
    """One training setting, `variant` (an override) on top of the config's, beside the plain script."""
    label = f"packing {'on' if packed else 'off'}" + (f", {variant}" if variant else "")
    extra = (f"train.packing={str(packed).lower()}", *((variant,) if variant else ()))
    ours: dict[str, list] = {"tps": [], "memory": [], "wall": [], "summary": [], "phases": []}
    plain: dict[str, list] = {"tps": [], "memory": [], "wall": []}
    for i in range(b.repeats):
        wall, summary = train_stage(b, extra)
        result, plain_wall = plain_train(b, chats, summary, extra)
        for into, run, seconds in ((ours, summary, wall), (plain, result, plain_wall)):
            into["tps"].append(tokens_per_second(run))
            into["memory"].append(run["peak_memory_mb"])
            into["wall"].append(seconds)
        ours["summary"].append(summary)
        ours["phases"].append(b.with_overheads("train", wall, summary["seconds"]))
        print(f"bench: train {label} {i + 1}/{b.repeats}: invoke train {wall:.1f} s, {ours['tps'][-1]:.0f} "
              f"tok/s; plain TRL {plain_wall:.1f} s, {plain['tps'][-1]:.0f} tok/s", flush=True)
    name = "plain TRL SFTTrainer script"
    b.add(Row("train", f"training tokens/s, {label}", "tok/s", ours["tps"], name, plain["tps"], True))
    b.add(Row("train", f"peak memory, {label}", "MiB", ours["memory"], name, plain["memory"]))
    b.add(Row("train", f"wall time of `invoke train`, {label}", "s", ours["wall"],
              f"{name} (docker run)", plain["wall"]))
    b.profile(f"train, {label}", ours["phases"])
    b.train_rates[label] = ours["tps"]
    b.baseline_walls[f"train, {label}"] = statistics.median(plain["wall"])
    summary = ours["summary"][-1]
    if summary["device"] == "cuda" and not packed and variant is None:
        mfu_row(b, ours, plain, summary)


def plain_train(b: Session, chats: Path, summary: dict, extra: tuple[str, ...]) -> tuple[dict, float]:
    """plain_sft.py in the train image with the stage's hyperparameters, precision and device: the stage's own
    SFTConfig and LoraConfig arguments, computed in the train image (finetune/train/plain_spec.py)."""
    config = b.bench_config(*extra)
    work = b.out / "plain-train"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "run.yaml").write_text(to_yaml(config), encoding="utf-8")
    config_mounts = [containers.Mount(work / "run.yaml", layout.CONTAINER_CONFIG), *containers.data_mounts(config)]
    b.container("plain TRL spec", layout.image_tag("train"),
                ["-m", "finetune.train.plain_spec", "--config", layout.CONTAINER_CONFIG, "--device", summary["device"],
                 "--precision", summary["precision"], "--method", summary["method"], "--out", "/out/spec.json"],
                [containers.Mount(work, "/out", read_only=False), *config_mounts], entrypoint=["python"])
    mounts = [containers.Mount(work, "/out", read_only=False), containers.Mount(chats, "/data/chats.jsonl"),
              containers.Mount(PLAIN_SFT, "/bench/plain_sft.py")]
    env = {"HF_HUB_OFFLINE": "1"}  # the stage has just put a hub model into the cache volume
    if layout.is_builtin(config.model.id):
        base = layout.stage_dir(b.run_dir, "train") / layout.BASE
        if not (base / "config.json").is_file():
            raise BenchError(f"no {base}: the plain baseline trains the tiny model that the train stage built; "
                             "set serve.baseline=true so that the stage keeps it")
        mounts.append(containers.Mount(base, "/model"))
        model = "/model"
    else:
        model = config.model.id
        if os.environ.get("HF_TOKEN"):
            env["HF_TOKEN"] = os.environ["HF_TOKEN"]
    wall = b.container("plain TRL", layout.image_tag("train"),
                       ["/bench/plain_sft.py", "--model", model, "--data", "/data/chats.jsonl",
                        "--spec", "/out/spec.json", "--out", "/out"], mounts,
                       entrypoint=["python"], env=env, gpus=summary["device"] == "cuda",
                       named_volumes={layout.HF_CACHE_VOLUME: layout.HF_CACHE_MOUNT})
    return json.loads((work / "result.json").read_text()), wall


def processes(b: Session) -> None:
    """Tokens/s and peak memory of 2 DDP processes against 1, and the scaling efficiency: 2 processes' tokens/s
    over twice that of 1 process with the same share of the machine (one GPU each; on CPU, half of
    train.cpu_threads each, so that the two runs use the same cores)."""
    gpus = containers.has_gpu()
    threads = b.config.train.cpu_threads
    half = max(threads // 2, 1)
    runs = {"1": ("train.distributed.processes=1",), "2": ("train.distributed.processes=2",)}
    if not gpus:  # on a GPU one process on one GPU is already the share of one
        runs["1, half"] = ("train.distributed.processes=1", f"train.cpu_threads={half}")
    samples: dict[str, dict[str, list]] = {k: {"tps": [], "memory": []} for k in runs}
    for i in range(b.repeats):
        for key, extra in runs.items():
            _, summary = train_stage(b, extra)
            samples[key]["tps"].append(tokens_per_second(summary))
            samples[key]["memory"].append(summary["peak_memory_mb"])
        print(f"bench: train processes {i + 1}/{b.repeats}: "
              + ", ".join(f"{k}: {v['tps'][-1]:.0f} tok/s" for k, v in samples.items()), flush=True)
    one = f"1 process ({'one GPU' if gpus else f'{threads} threads'}, same run)"
    b.add(Row("train", "training tokens/s, 2 processes (DDP)", "tok/s", samples["2"]["tps"], one,
              samples["1"]["tps"], True))
    b.add(Row("train", "peak memory per process, 2 processes (DDP)", "MiB", samples["2"]["memory"], one,
              samples["1"]["memory"]))
    share = samples["1" if gpus else "1, half"]["tps"]
    b.details["ddp scaling efficiency"] = {
        "efficiency": statistics.median(samples["2"]["tps"]) / (2 * statistics.median(share)),
        "tokens_per_s": {k: summarize(v["tps"]) for k, v in samples.items()},
        "what": "tokens/s of 2 processes / (2 x tokens/s of 1 process with one process's share: "
                + ("one GPU)" if gpus else f"{half} of {threads} threads)"),
    }


def methods(b: Session, chats: Path) -> None:
    """On a GPU: peak memory and tokens/s of QLoRA against LoRA, both through `invoke train`."""
    samples: dict[str, dict[str, list]] = {m: {"memory": [], "tps": []} for m in ("lora", "qlora")}
    for i in range(b.repeats):
        for method in samples:
            _, summary = train_stage(b, (f"train.method={method}",))
            samples[method]["memory"].append(summary["peak_memory_mb"])
            samples[method]["tps"].append(tokens_per_second(summary))
    b.add(Row("train", "peak GPU memory, QLoRA", "MiB", samples["qlora"]["memory"], "LoRA (same run)",
              samples["lora"]["memory"]))
    b.add(Row("train", "training tokens/s, QLoRA", "tok/s", samples["qlora"]["tps"], "LoRA (same run)",
              samples["lora"]["tps"], True))


def mfu_row(b: Session, ours: dict, plain: dict, summary: dict) -> None:
    """Model FLOPs utilization: tokens/s x 6 x parameters over the GPU's dense bf16 peak."""
    gpu = summary.get("device_name", "")
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in gpu), None)
    if peak is None:
        b.details["mfu"] = f"not computed: no peak bf16 FLOP/s known for {gpu!r} (PEAK_BF16_FLOPS)"
        return
    mfu = lambda tps: 100 * tps * 6 * summary["parameters"] / peak  # noqa: E731
    b.add(Row("train", f"MFU on {gpu} ({peak / 1e12:.0f} TFLOP/s bf16)", "%", [mfu(x) for x in ours["tps"]],
              "plain TRL SFTTrainer script", [mfu(x) for x in plain["tps"]], True))
