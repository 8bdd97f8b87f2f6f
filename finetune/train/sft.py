"""The train stage: supervised LoRA/QLoRA fine-tuning with transformers, peft and TRL's SFTTrainer.

    python -m finetune.train --config run.yaml --out /artifacts     (inside the train image: ./invoke train)

Reads the resolved run config and the data files it names; writes OUT/train/:
    adapter/        the LoRA adapter (peft)
    merged/         the adapter merged into a 16-bit copy of the base, tokenizer and chat template included
    chat.json       the chat template trained with, its family, end-of-turn token and BOS (finetune/train/chat.py)
    base/           the base model itself (16-bit), for the baseline that `invoke serve` offers beside the
                    fine-tuned model: the tiny model built offline, or a hub model when serve.baseline is on
    metrics.jsonl   one line per logging step: loss, eval loss, lr, tokens/s, peak memory
    loss.png        the loss curve
    summary.json    eval loss of the base and of the fine-tuned model, steps, tokens, time, device, peak memory,
                    parameters, and `seconds`: wall time per phase (the stage's profile)
    inputs.json     what the stage read: its declared config values and data file digests
Work happens in OUT/.train.partial/, which holds the checkpoints; OUT/train/ appears only when everything
is written, so a killed run never looks finished, and a rerun resumes from the last checkpoint when what the
stage reads (its declared config keys and data files: finetune/train/__init__.py, recorded in inputs.json) is
unchanged; a change to any other key (serve.temperature) does not throw the interrupted training away.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from finetune.core import data as datasets_
from finetune.core import families, layout
from finetune.core.config import RunConfig
from finetune.core.stage import Stopwatch, publish, stage_main
from finetune.core.templates import encode, render, save_tokenizer
from finetune.train import STAGE, chat, launch, numerics


class TrainError(RuntimeError):
    """A precondition of training that failed; the message says what to do."""


def tokenize(examples, tokenizer, fmt: chat.ChatFormat, assistant_only: bool) -> dict[str, list]:
    """input_ids (the chat template's rendering) and assistant_masks (1 where the loss applies) per training
    text: one per example, or one per answer where the template needs that (train/chat.py)."""
    ids, masks = [], []
    for example in examples:
        for text, spans in chat.training_texts(fmt, tokenizer, example.messages):
            tokens, mask = encode(tokenizer, text, spans, assistant_only)
            ids.append(tokens)
            masks.append(mask)
    return {"input_ids": ids, "assistant_masks": masks}


def pick_device(config: RunConfig, processes: int = 1) -> tuple[str, str]:
    """(device, method) for this host: CUDA, then Apple's MPS (a Mac, with the native runner), then CPU. QLoRA
    needs CUDA (bitsandbytes 4-bit): elsewhere it fails here unless the config allows LoRA instead."""
    import torch

    if torch.cuda.is_available():
        device = "cuda"
    elif torch.backends.mps.is_available() and processes == 1:  # one GPU per Mac: MPS has no process groups
        device = "mps"
    else:
        device = "cpu"
    method = config.train.method
    if method == "qlora" and device != "cuda":
        if not config.train.cpu_fallback:
            raise TrainError("train.method is qlora, which needs a CUDA GPU (bitsandbytes 4-bit), and "
                             f"{'this Mac has MPS only' if device == 'mps' else 'none is visible'}; run on a GPU host, "
                             "or set train.method=lora (or train.cpu_fallback=true)")
        method = "lora"
    return device, method


def precision(config: RunConfig, device: str) -> str:
    """The training precision: auto is bf16 on a CUDA GPU that has it, else fp32; on MPS too, where half
    precision is the user's explicit choice (not run here: no Mac; bf16 there needs macOS 14)."""
    import torch

    wanted = config.train.precision
    if wanted == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if wanted in ("bf16", "fp16") and device == "cpu":
        raise TrainError(f"train.precision={wanted} needs a GPU here; use fp32 or auto on CPU")
    if wanted == "bf16" and device == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise TrainError("train.precision=bf16 on Apple's MPS needs macOS 14 or newer; use fp16, fp32 or auto")
    return wanted


def base_model_dir(config: RunConfig, work: Path) -> str:
    """Where the base model comes from: built offline into work/base (or copied from the cache volume's
    identical earlier build), a local directory, or a hub id."""
    if config.model.id == layout.TINY_MODEL:
        from finetune.train import tiny

        base = work / layout.BASE
        if not (base / "config.json").is_file():
            domain = [Path(p) for p in (config.data.train, config.data.eval) if p]
            if "HF_HOME" not in os.environ:  # outside the train image: no cache volume
                tiny.build(base, domain)
            else:  # the train image's cache volume keeps it between runs
                cache = Path(os.environ["HF_HOME"]) / "finetune-tiny"
                built = tiny.cached_build(base, domain, cache)
                print(f"train: {'built' if built else 'reused'} the tiny offline base model (no download; "
                      f"{cache})", flush=True)
        return str(base)
    return config.model.id


def pinned(config: RunConfig) -> dict:
    """from_pretrained kwargs that fix the hub revision, when the config names one."""
    return {"revision": config.model.revision} if config.model.revision else {}


def load_model(source: str, config: RunConfig, method: str, dtype_name: str, world: launch.World | None = None):
    """The base model, in 4 bits for QLoRA. Under ZeRO-3 (the SFTConfig made first) it loads already sharded."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    kwargs = pinned(config)
    if method == "qlora":
        shards_weights = world is not None and world.strategy in SHARDED_WEIGHTS  # "none" for one process
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            # ZeRO-3 and FSDP shard only floating-point tensors: the 4-bit weights are stored in the compute dtype
            # (peft's and bitsandbytes' recipe for QLoRA with them), and they place the shards themselves
            **({"bnb_4bit_quant_storage": dtype} if shards_weights else {}))
        if not shards_weights:
            kwargs["device_map"] = {"": world.local_rank if world else 0}  # each process its own GPU
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)


def load_tokenizer(source: str, config: RunConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **pinned(config))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sft_kwargs(config: RunConfig, device: str, dtype_name: str) -> dict:
    """The SFTConfig arguments that decide what training computes: optimizer, schedule, steps, batch,
    precision, sequence length, packing. `invoke bench` gives its plain TRL baseline the same ones (TRL's
    own defaults differ: bf16 autocast and activation checkpointing, 10x slower on a CPU)."""
    t = config.train
    return dict(
        seed=t.seed, data_seed=t.seed, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio
        weight_decay=t.weight_decay, num_train_epochs=t.epochs or 1.0, max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        activation_checkpointing=t.gradient_checkpointing, bf16=dtype_name == "bf16", fp16=dtype_name == "fp16",
        use_cpu=device == "cpu", logging_steps=t.logging_steps, max_length=config.data.max_seq_len,
        packing=t.packing, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
    )


SHARDED_WEIGHTS = ("zero3", "fsdp2")  # the strategies that split the model's weights among the processes
DEEPSPEED_CONFIGS = Path(__file__).parent / "deepspeed"  # zero2.json, zero3.json: "auto" = from the SFTConfig


def strategy_kwargs(world: launch.World, device: str) -> dict:
    """The SFTConfig arguments of the strategy the processes share the work by (train.distributed.strategy):
    DDP (gloo between CPU processes, NCCL between GPUs), DeepSpeed ZeRO-2/3 with the Trainer's own optimizer,
    batch, accumulation and clipping (deepspeed/*.json), or FSDP2."""
    if world.size == 1:
        return {}
    backend = {"ddp_backend": "nccl" if device == "cuda" else "gloo"}
    if world.strategy in ("zero2", "zero3"):
        join_deepspeed(backend["ddp_backend"])
        return backend | {"deepspeed": json.loads((DEEPSPEED_CONFIGS / f"{world.strategy}.json").read_text())}
    if world.strategy == "fsdp2":  # train() refused it on CPU processes already (check_strategy)
        return backend | {"fsdp": True, "fsdp_config": {
            "version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False}}
    return backend | {"ddp_find_unused_parameters": False}  # every LoRA weight gets a gradient each step


def check_strategy(world: launch.World, device: str) -> None:
    """Refuse a strategy this device cannot run, before anything is prepared."""
    if world.strategy == "fsdp2" and device == "cpu":
        raise TrainError("train.distributed.strategy=fsdp2 needs CUDA GPUs: accelerate (1.15) shards with FSDP "
                         "only on GPU-like devices and on CPU processes would silently train DDP instead; on "
                         "CPU use zero3 (weights sharded too) or zero2 (DeepSpeed), or ddp")


def join_deepspeed(backend: str) -> None:
    """Give DeepSpeed the process group this worker already belongs to (launch.Group), before ZeRO-3 loads
    the model sharded: accelerate leaves DeepSpeed's communication uninitialised when torch's is, and
    zero.Init then sees a world of one.

    On CPU its collectives stay on gloo, the same allreduce as DDP's: DeepSpeed's faster shared-memory
    allreduce is a C++ op that it would compile at run time with the machine's compiler (the train image has
    none) for the machine's vector instructions, whose sums then differ from CPU to CPU. DeepSpeed consults
    the dict edited here before building it (deepspeed/comm/torch.py, build_shm_op)."""
    import deepspeed
    import deepspeed.ops

    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def parameter_count(model) -> int:
    """All parameters of the model, also when ZeRO-3 holds only a shard of each in this process."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def held_share(model) -> float:
    """The share of the model's weights (base, adapter and the modules trained in full) that this process
    holds: 1, or its shards under ZeRO-3 (ds_tensor) and FSDP2 (DTensor): what sharding saves in memory."""
    def held(p) -> int:
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()

    return round(sum(held(p) for p in model.parameters()) / parameter_count(model), 4)


def lora_kwargs(config: RunConfig) -> dict:
    """peft LoraConfig arguments of the run."""
    t = config.train
    return dict(r=t.rank, lora_alpha=t.alpha, lora_dropout=t.dropout, target_modules=list(t.target_modules),
                modules_to_save=list(t.modules_to_save) or None, task_type="CAUSAL_LM")


def train(config: RunConfig, out: Path) -> Path | None:
    """Fine-tune per `config` into out/train/ (see the module docstring); return that directory. With more
    than one process (train.distributed) this runs in every worker; only rank 0 writes train/ (launch.py)."""
    clock = Stopwatch()
    t = config.train
    world = launch.world(t.distributed)
    # Before torch loads: the kernels, BLAS path and threads that decide the bytes (finetune/train/numerics.py);
    # the processes of one machine share its cpu_threads.
    threads = max(1, t.cpu_threads // world.processes)
    pinned = numerics.pin(threads) if t.deterministic and t.pin_cpu else None
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    from finetune.train.metrics import MetricsCallback, peak_memory_mb, plot_loss

    clock.lap("imports")
    device, method = pick_device(config, world.size)
    check_strategy(world, device)
    dtype_name = precision(config, device)
    group = launch.Group(world, device)
    work, final = layout.partial_dir(out, "train"), layout.stage_dir(out, "train")
    shared = group.shares_storage(out)

    def prepare() -> str:  # the work directory and the base model, once per machine's storage
        if work.exists() and (changed := changed_since(work, STAGE.read(config))):
            print(f"train: {changed} changed since the interrupted run; starting over", flush=True)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        STAGE.write_inputs(config, work)
        return base_model_dir(config, work)

    numeric = numerics.record(pinned)
    if group.is_main:
        print(f"train: {method} on {device.upper()} "
              f"({torch.cuda.get_device_name(0) if device == 'cuda' else f'{torch.get_num_threads()} threads'}"
              f"{' per process' if world.size > 1 else ''}), {dtype_name}; CPU kernels {numeric['cpu_capability']}"
              f"{' (pinned: train.deterministic)' if pinned else ''}", flush=True)
    if pinned and not numeric["portable"] and group.is_main:
        print("train: warning: this CPU has no AVX2 (or is not x86-64): the pinned kernels are reproducible on "
              "machines like it, but its bytes will differ from the published hashes (invoke verify --golden)",
              flush=True)
    torch.manual_seed(config.train.seed)
    clock.lap("start")
    source = group.prepare_once_per_storage(shared, prepare)
    clock.lap("base model")  # the tiny model is built here; a hub model loads below
    tokenizer = load_tokenizer(source, config)
    own = (families.custom(Path(config.model.go_template).read_text(encoding="utf-8"), config.model.end_of_turn)
           if config.model.go_template else None)
    fmt = chat.resolve(config.model.chat_template, tokenizer, config.model.id, own)  # installs the template
    if group.is_main:
        fmt.write(work)
        print(f"train: chat template {fmt.family} ({fmt.source}, sha256 {fmt.sha256[:12]}), turns end with "
              f"{fmt.end_of_turn}, BOS {'added' if fmt.bos else 'none'}", flush=True)

    count = lambda messages: len(encode(tokenizer, render(tokenizer, fmt.jinja, messages, False,  # noqa: E731
                                                          fmt.template_vars))[0])
    splits, problems, _ = datasets_.check(config.data.train, config.data.eval, config.data.format,
                                          config.data.max_seq_len, count, config.data.limit)
    if problems:
        raise TrainError("the dataset has problems (run ./invoke data for all of them):\n  " + "\n  ".join(problems))
    columns = [tokenize(s.examples, tokenizer, fmt, config.train.assistant_only_loss) for s in splits]
    train_set = Dataset.from_dict(columns[0])
    eval_set = Dataset.from_dict(columns[1]) if len(columns) > 1 else None

    batch = {"per_device": t.batch_size, "processes": world.size, "grad_accum": t.grad_accum,
             "effective": t.batch_size * world.size * t.grad_accum}
    if group.is_main:
        print(f"train: {world.describe()}; effective batch {batch['effective']} = {t.batch_size} per device x "
              f"{world.size} process{'es' if world.size > 1 else ''} x {t.grad_accum} accumulated", flush=True)
    checkpoints = work / "checkpoints"
    last = group.from_main(get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None)
    if last and not all(group.gather(Path(last).is_dir())):
        raise TrainError(f"rank 0 resumes from {Path(last).name}, which another machine does not have: give every "
                         "node its checkpoints (a shared artifacts/ or a copy of .train.partial/), or start over "
                         "with --force")
    args = SFTConfig(
        output_dir=str(checkpoints), **sft_kwargs(config, device, dtype_name),
        full_determinism=t.deterministic and device == "cpu", per_device_eval_batch_size=t.batch_size,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=2, save_on_each_node=not shared,
        eval_strategy="steps" if (t.eval_steps and eval_set is not None) else "no", eval_steps=t.eval_steps,
        # The base model's eval loss (LoRA B starts at zero), inside the training loop: evaluated before it
        # (trainer.evaluate()), 2 DDP processes trained other weights than 1 process from the first step on
        # (measured; inside it, the same bytes; 1 process gives the same bytes either way)
        eval_on_start=eval_set is not None and last is None,
        assistant_only_loss=False, report_to=[], disable_tqdm=False,  # the masks come with the tokens
        **strategy_kwargs(world, device),
    )
    lora = LoraConfig(**lora_kwargs(config))
    model = load_model(source, config, method, dtype_name, world)
    parameters = parameter_count(model)
    metrics = MetricsCallback(work / layout.METRICS)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                         processing_class=tokenizer, peft_config=lora, callbacks=[metrics])
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(metrics.progress)
    clock.lap("load and tokenize")
    if last and group.is_main:
        print(f"train: resuming from {Path(last).name}", flush=True)
        keep_metrics_until(work / layout.METRICS, int(Path(last).name.split("-")[-1]))
    started = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    clock.lap("train")  # with the base model's eval loss (eval_on_start)
    base_loss = [h["eval_loss"] for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h]
    summary = {
        **({"eval_loss_base": base_loss[0]} if base_loss else {}),  # without an eval split: none
        "method": method, "device": device, "precision": dtype_name,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss, "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "train_seconds": round(time.time() - started, 3), "resumed_from": Path(last).name if last else None,
        "peak_memory_mb": peak_memory_mb(), "parameters": parameters, "numerics": numeric,
        "distributed": {"strategy": world.strategy, "nodes": world.nodes, "processes_per_node": world.processes,
                        "world_size": world.size, "batch": batch,
                        "weights_held_by_rank_0": held_share(trainer.model)},
    }
    if eval_set is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    clock.lap("eval after")
    # ZeRO-3 and FSDP2 hold shards of the weights: every process takes part in gathering them for rank 0
    gathered = (trainer.accelerator.get_state_dict(trainer.model_wrapped)
                if world.strategy in SHARDED_WEIGHTS else None)  # "none" for one process
    if world.strategy == "zero3":
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # the merge loads the base whole, in rank 0 alone, not sharded by ZeRO-3
    if group.is_main:
        trainer.model.save_pretrained(work / layout.ADAPTER, state_dict=gathered)
        merge(source, config, work / layout.ADAPTER, work / layout.MERGED, tokenizer, fmt, dtype_name)
        clock.lap("save and merge")
        plot_loss(work / layout.METRICS, work / layout.LOSS_PLOT, summary)
        clock.lap("plot")
        summary["seconds"] = clock.seconds  # the stage's profile, phase by phase (this process only on a resume)
        (work / layout.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(work / "checkpoints")
        publish(work, final)
    group.barrier()
    if not group.is_main and not shared and world.local_rank == 0:
        shutil.rmtree(work, ignore_errors=True)  # this machine's base model and checkpoints: nobody reads them
    group.close()
    return final if group.is_main else None


def merge(source: str, config: RunConfig, adapter: Path, out: Path, tokenizer, fmt: chat.ChatFormat,
          dtype_name: str) -> None:
    """Reload the base in 16 bits (never 4-bit), apply the adapter, merge it in and save with the tokenizer;
    keep that base beside it for the serve stage's baseline when it is not there yet."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float16
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **pinned(config))
    if config.serve.baseline and not (out.parent / layout.BASE / "config.json").is_file():
        save_model(base, tokenizer, source, out.parent / layout.BASE, fmt.bos)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.generation_config.eos_token_id = fmt.end_of_turn_id  # generation ends with the turn
    save_model(merged, tokenizer, source, out, fmt.bos)


def save_model(model, tokenizer, source: str, out: Path, add_bos: bool) -> None:
    """Weights, tokenizer (special tokens and BOS stated for llama.cpp) and the SentencePiece model if the
    base has one."""
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out, add_bos)
    if (Path(source) / "tokenizer.model").is_file():  # llama.cpp's converter reads the SentencePiece model
        shutil.copy2(Path(source) / "tokenizer.model", out / "tokenizer.model")


def changed_since(work: Path, now: dict) -> str | None:
    """What differs between the inputs an interrupted run recorded in `work` and `now` (Stage.read), or None."""
    try:
        before = json.loads((work / layout.INPUTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "everything (no inputs.json)"
    keys = sorted(k for part in ("config", "files") for k in set(before.get(part, {})) | set(now[part])
                  if before.get(part, {}).get(k) != now[part].get(k))
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") if keys else None


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metrics an interrupted run logged after its last checkpoint; the resumed run logs them again."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(x for x in lines if json.loads(x)["step"] <= step), encoding="utf-8")


def eval_loss(model_dir: str | Path, jsonl: str | Path) -> float:
    """Mean loss per assistant token of a saved model on a JSONL split: how a test checks that tuning helped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fmt = chat.resolve("auto", tokenizer, str(model_dir))
    columns = tokenize(datasets_.read_split(jsonl).examples, tokenizer, fmt, assistant_only=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in zip(columns["input_ids"], columns["assistant_masks"]):
            labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([ids]), labels=labels).loss.item() * n
            count += n
    return total / count


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not launch.is_worker() and (world := launch.plan(argv)) is not None:
        return launch.launch(world, argv)
    return stage_main(STAGE, "Fine-tune the base model of a run config (LoRA/QLoRA).", train,
                      (TrainError, chat.TemplateError, launch.LaunchError), argv)


if __name__ == "__main__":
    sys.exit(main())
