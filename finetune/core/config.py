"""The run configuration: a YAML file in configs/ loaded into typed, frozen objects.

    python -m finetune.core.config configs/tiny-ja.yaml --set train.max_steps=20   # print the resolved config

Precedence is defaults (below) < the YAML file < `--set key.path=value` overrides. Unknown keys, wrong
types and impossible values are all reported together, each naming the file and line (or the `--set`
that caused it), the key path, what is wrong and what to do. Checks that relate two sections (the served
quant must be one the convert stage builds) run once every field is valid on its own.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune.core import families, layout, modelfile_text

# llama-quantize types this project builds and checks. IQ* types need an importance matrix for every
# tensor and are left out until the convert stage computes one by default.
QUANT_TYPES = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
    "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
)  # fmt: skip
QuantType = Literal[QUANT_TYPES]  # type: ignore[valid-type]
OutType = Literal["f16", "bf16", "f32"]

BUILTIN_MODELS = layout.BUILTIN_MODELS  # built offline in the train image (finetune/train/tiny.py)

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    id: str = Field(
        min_length=1,
        description="a Hugging Face hub id (e.g. Qwen/Qwen2.5-3B-Instruct), a local model directory, "
        "or builtin:tiny-llama (built offline in the train image)",
    )
    revision: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{40}$",
        description="the 40-hex commit of the hub repository, so every run trains the same weights",
    )
    chat_template: str = Field(
        "auto",
        min_length=1,
        description="the chat template trained with and rendered identically by the Ollama Modelfile: auto (the "
        "base model's own), a family (" + families.supported() + ") for its reference template, or a path "
        "to a .jinja file relative to the project root",
    )
    go_template: str | None = Field(
        None,
        description="a file with an Ollama Go TEMPLATE of your own, for a chat template that no family renders "
        "(with end_of_turn): the Modelfile then uses it, and `invoke serve` checks that Ollama renders the "
        "trained template's probe conversations with it byte for byte",
    )
    end_of_turn: str | None = Field(
        None, min_length=1, description="with go_template: the token that ends an assistant turn (in the loss, and "
        "a stop)",
    )


class DataSection(_Section):
    train: str = Field(min_length=1, description="path of the training JSONL file, relative to the project root")
    eval: str | None = Field(None, description="path of the held-out JSONL file (eval loss, invoke eval)")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="line format; auto detects it per line from the keys"
    )
    max_seq_len: int = Field(512, gt=0, le=131072, description="tokens per training example, prompt included")
    limit: int | None = Field(None, gt=0, description="train on the first N examples of the training file only")


class DistributedSection(_Section):
    """How many processes train, on how many machines, and how they share the model (finetune/train/launch.py).
    The node's rank and the rendezvous address are not here: they differ per machine and change nothing in
    the result, so they are `invoke train` flags (--node-rank, --rendezvous)."""

    strategy: Literal["auto", "ddp", "zero2", "zero3", "fsdp2"] = Field(
        "auto", description="how more than one process shares the work: auto = ddp (each holds the whole model, "
                            "every batch is split among them); zero2 = DeepSpeed ZeRO-2 (optimizer state and "
                            "gradients sharded); zero3 = DeepSpeed ZeRO-3 (the weights too); fsdp2 = PyTorch FSDP2 "
                            "(weights, gradients and optimizer state sharded; CUDA GPUs only)")
    processes: int | Literal["auto"] = Field(
        "auto", description="training processes per node: auto = one per GPU the train container sees (1 on CPU)")
    nodes: int = Field(1, gt=0, le=1024, description="machines that train together (c10d rendezvous)")

    @field_validator("processes")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not 0 < value <= 64:
            raise ValueError("must be auto or a whole number from 1 to 64")
        return value


class TrainSection(_Section):
    method: Literal["lora", "qlora"] = Field("lora", description="qlora = 4-bit NF4 base, needs CUDA")
    cpu_fallback: bool = Field(False, description="train qlora configs as lora when no CUDA device is present")
    rank: int = Field(16, gt=0, le=1024, description="LoRA rank r")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout probability")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1, description="module names to adapt"
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full beside the adapter, e.g. [lm_head, embed_tokens]"
    )
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warmup")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay")
    epochs: float | None = Field(None, gt=0, description="passes over the data (default 1 when max_steps is unset)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(1, gt=0, description="examples per device per step")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step")
    seed: int = Field(42, ge=0, description="seed for data order, LoRA init and dropout")
    packing: bool = Field(False, description="pack several short examples into one max_seq_len row")
    assistant_only_loss: bool = Field(True, description="compute the loss on assistant turns only")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, fp32 on CPU"
    )
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    deterministic: bool = Field(True, description="the same inputs give byte-identical weights on any x86-64 CPU "
                                                  "with AVX2: deterministic algorithms (transformers' "
                                                  "full_determinism, on CPU) and the CPU kernels, BLAS path and "
                                                  "threads pinned (finetune/train/numerics.py); costs tokens/s on CPU "
                                                  "(`invoke bench`)")
    pin_cpu: bool = Field(True, description="with deterministic: pin the CPU kernels (AVX2), MKL's code path and the "
                                            "threads, so every x86-64 CPU with AVX2 gives the same bytes; false keeps "
                                            "torch's own choice (bytes then depend on the CPU)")
    cpu_threads: int = Field(2, gt=0, le=256, description="CPU threads of the train stage when pinned; the bytes "
                                                          "depend on it, so it is fixed rather than the core count")
    logging_steps: int = Field(10, gt=0, description="steps between metrics lines")
    save_steps: int = Field(100, gt=0, description="steps between resumable checkpoints")
    eval_steps: int | None = Field(None, gt=0, description="steps between eval-loss runs (default: at the end)")
    distributed: DistributedSection = Field(default_factory=DistributedSection,
                                            description="processes, machines and the sharing strategy")


class ConvertSection(_Section):
    outtype: OutType = Field("f16", description="precision of the full GGUF that the quants are made from")
    quant_types: list[QuantType] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["Q4_K_M"], description="llama-quantize types to build"
    )
    imatrix: bool = Field(False, description="compute an importance matrix from the training data first")
    require_stop: bool = Field(True, description="fail unless each fine-tuned GGUF's greedy answer stops by itself; "
                                                 "false only records how it ended (for deliberately short "
                                                 "trainings, such as `invoke bench`'s)")


class FewShot(_Section):
    user: str = Field(min_length=1, description="a user turn shown to the model before the conversation")
    assistant: str = Field(min_length=1, description="the answer shown for it")


class ServeSection(_Section):
    model_name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?$",
        description="Ollama model name: lowercase letters, digits, '.', '_', '-', optional :tag",
    )
    quant: str = Field("Q4_K_M", description="which GGUF to serve: one of convert.quant_types or convert.outtype")
    system_prompt: str | None = Field(None, description="Ollama SYSTEM; should match the training data's system turn")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature; 0 is greedy")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")
    top_k: int | None = Field(None, gt=0, description="sample from the k most likely tokens")
    repeat_penalty: float | None = Field(None, gt=0, description="penalty for repeated tokens (1 = none)")
    num_ctx: int = Field(2048, ge=64, le=1048576, description="context window Ollama allocates")
    num_thread: int | None = Field(None, gt=0, description="CPU threads per generation (default: Ollama's, one "
                                                           "per physical core); `invoke bench` shows the effect")
    stop: list[str] = Field(default_factory=list, description="extra stop strings; the template's own are added")
    few_shot: list[FewShot] = Field(default_factory=list, description="example turns (MESSAGE) for the baseline")
    baseline: bool = Field(True, description="also serve <model_name>-baseline: the base model with only "
                                             "system_prompt and few_shot (prompt engineering, no fine-tuning)")
    host: str = Field("127.0.0.1", description="address the Ollama port is published on; 0.0.0.0 exposes it")
    port: int = Field(11434, gt=0, le=65535, description="host port of the Ollama API")


class GateSection(_Section):
    chrf_gain: float | None = Field(None, description="fine-tuned chrF minus the baseline's must reach this")
    key_fact_rate: float | None = Field(None, ge=0, le=1, description="share of key facts the fine-tuned model "
                                                                      "must state")
    stop_rate: float | None = Field(None, ge=0, le=1, description="share of answers that must end by themselves")


class EvalSection(_Section):
    split: Literal["eval", "train"] = Field("eval", description="questions to ask: the held-out split, or the "
                                                                "training examples the run trained on")
    max_new_tokens: int = Field(256, gt=0, description="longest answer generated")
    side_by_side: int = Field(6, ge=0, description="questions shown side by side in the report")
    gate: GateSection = Field(default_factory=GateSection, description="thresholds that fail `invoke eval`")


class BenchSection(_Section):
    repeats: int = Field(3, ge=1, description="repetitions of every measurement; the table gives median, min, max")
    train_steps: int = Field(200, gt=0, description="train.max_steps of every training that `invoke bench` runs")
    port: int = Field(11444, gt=0, le=65535, description="host port of the bench runs' Ollama (not serve.port, "
                                                         "so a served model keeps running)")
    models: list[Literal["100m", "0.5b"]] = Field(
        default_factory=list, description="also time generation on these random-init models with a real "
        "vocabulary (Qwen2.5's shape and qwen2 vocabulary: 100m = 118M parameters, 0.5b = Qwen2.5-0.5B's 494M), "
        "Ollama against llama-bench, 1 thread and one per core")


class RunConfig(_Section):
    run: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="run name: artifacts go to artifacts/<run>/ (letters, digits, '.', '_', '-')",
    )
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    convert: ConvertSection = Field(default_factory=ConvertSection)
    serve: ServeSection
    eval: EvalSection = Field(default_factory=EvalSection)
    bench: BenchSection = Field(default_factory=BenchSection)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where it comes from, the key path, what is wrong, what to do."""

    where: str
    key: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.what}. Fix: {self.fix}"


class ConfigError(ValueError):
    """Every problem found in one config, reported together."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in the config:\n{lines}")


def load_config(path: str | Path, overrides: typing.Sequence[str] = (), root: str | Path = ".") -> RunConfig:
    """Read, override and validate a config; raise ConfigError listing every problem.

    `overrides` are `key.path=value` strings; the value is parsed as YAML (`20`, `true`, `[Q4_K_M, Q8_0]`).
    `root` is the project root that data paths are relative to; they must exist.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(source, [Problem(source, "(file)", f"cannot read it ({e.strerror})",
                                           "pass an existing file, e.g. configs/tiny-ja.yaml")]) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(source, [Problem(where, "(syntax)", f"not valid YAML ({getattr(e, 'problem', e)})",
                                           "fix the YAML syntax at that line")]) from e
    if not isinstance(raw, dict):
        raise ConfigError(source, [Problem(source, "(top level)", "the file is not a mapping of sections",
                                           "start from configs/tiny-ja.yaml")])
    lines = _key_lines(text)
    set_from: dict[tuple[str, ...], str] = {}
    problems = _apply_overrides(raw, overrides, set_from)

    def where(loc: tuple) -> str:
        keys = tuple(str(k) for k in loc if isinstance(k, str))
        for n in range(len(keys), 0, -1):
            if keys[:n] in set_from:
                return set_from[keys[:n]]
        for n in range(len(keys), 0, -1):
            if keys[:n] in lines:
                return f"{source}:{lines[keys[:n]]}"
        return source

    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as e:
        problems += [_problem(err, where) for err in e.errors(include_url=False)]
        raise ConfigError(source, problems) from None
    problems += [Problem(where(loc), _dotted(loc), what, fix) for loc, what, fix in _cross_checks(config, Path(root))]
    if problems:
        raise ConfigError(source, problems)
    return config


def to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML, keys in schema order (written next to every artifact)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _apply_overrides(raw: dict, overrides: typing.Sequence[str], set_from: dict) -> list[Problem]:
    problems = []
    for item in overrides:
        origin = f"--set {item}"
        key, sep, value = item.partition("=")
        keys = tuple(key.strip().split("."))
        if not sep or not all(keys):
            problems.append(Problem(origin, key or "(empty)", "an override needs the form KEY.PATH=VALUE",
                                    "write e.g. --set train.max_steps=20"))
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = raw
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k, {}), dict):
                problems.append(Problem(origin, ".".join(keys[: i + 1]), "is a value, not a section",
                                        "override the value itself, not a key below it"))
                break
            node = node.setdefault(k, {})
        else:
            node[keys[-1]] = parsed
            set_from[keys] = origin
    return problems


def _cross_checks(config: RunConfig, root: Path) -> list[tuple[tuple, str, str]]:
    """Checks that span keys or touch the filesystem, run once every field is valid on its own."""
    found = []
    m, d, t, c, s = config.model, config.data, config.train, config.convert, config.serve
    is_hub_id = not (m.id.startswith((layout.BUILTIN_PREFIX, "/", "./", "../")) or (root / m.id).is_dir())
    if layout.is_builtin(m.id) and m.id not in BUILTIN_MODELS:
        found.append((("model", "id"), f"unknown built-in model {m.id!r}", f"use one of: {', '.join(BUILTIN_MODELS)}"))
    if is_hub_id and m.revision is None:
        found.append((("model", "revision"), f"hub model {m.id!r} has no pinned revision",
                      "set model.revision to the 40-hex commit id shown on the model's 'Files' page"))
    if m.chat_template != "auto" and m.chat_template not in families.FAMILIES:
        if not m.chat_template.endswith(".jinja"):
            found.append((("model", "chat_template"),
                          f"{m.chat_template!r} is neither auto, a family nor a .jinja file",
                          f"use auto, one of {families.supported()}, or a path to a .jinja file"))
        elif not (root / m.chat_template).is_file():
            found.append((("model", "chat_template"), f"file not found: {m.chat_template}",
                          "give a path relative to the project root"))
    if (m.go_template is None) != (m.end_of_turn is None):
        found.append((("model", "go_template" if m.go_template is None else "end_of_turn"),
                      "model.go_template and model.end_of_turn go together",
                      "set both (a Go TEMPLATE of your own and the token that ends a turn), or neither"))
    if m.go_template is not None and not (root / m.go_template).is_file():
        found.append((("model", "go_template"), f"file not found: {m.go_template}",
                      "give a path relative to the project root"))
    for key in ("train", "eval"):
        rel = getattr(d, key)
        if rel is not None and not (root / rel).is_file():
            found.append((("data", key), f"file not found: {rel}", "give a path relative to the project root"))
    if t.epochs is not None and t.max_steps is not None:
        found.append((("train", "max_steps"), "both train.epochs and train.max_steps are set",
                      "keep one: max_steps for a fixed budget, epochs for passes over the data"))
    servable = [*c.quant_types, c.outtype]
    if s.quant not in servable:
        found.append((("serve", "quant"), f"{s.quant!r} is not built by the convert stage",
                      f"use one of {servable}, or add it to convert.quant_types"))
    found += modelfile_text.text_problems(s)
    if len(set(c.quant_types)) != len(c.quant_types):
        found.append((("convert", "quant_types"), "lists a quant type twice", "list each type once"))
    return found


def _problem(err: dict, where: typing.Callable[[tuple], str]) -> Problem:
    loc, kind = tuple(err["loc"]), err["type"]
    info = _field_info(loc)
    got = "" if kind in ("missing", "extra_forbidden") else f" (got {err['input']!r})"
    what = _PYDANTIC_WORDING.get(kind, err["msg"][:1].lower() + err["msg"][1:]) + got
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        fix = (f"did you mean '{close[0]}'? " if close else "remove it. ") + f"Valid keys here: {', '.join(valid)}"
    elif kind == "missing":
        fix = f"add it: {info.description}" if info and info.description else "add it"
    elif kind == "literal_error":
        choices = [str(x) for x in _literal_choices(info)]
        close = difflib.get_close_matches(str(err["input"]).upper(), [x.upper() for x in choices], n=1)
        hint = next((f"did you mean '{x}'? " for x in choices if close and x.upper() == close[0]), "")
        fix = f"{hint}use one of: {', '.join(choices)}"
    else:
        bounds = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        limits = [f"{op} {err['ctx'][k]}" for k, op in bounds.items() if k in err.get("ctx", {})]
        fix = f"use a value {' and '.join(limits)}" if limits else _FIX_BY_KIND.get(kind.rsplit("_", 1)[0], "give a valid value")
        if info is not None and info.description:
            fix += f" ({_dotted(loc)} is {info.description})"
    return Problem(where(loc), _dotted(loc), what, fix)


_PYDANTIC_WORDING = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected text (quote it in YAML)",
    "list_type": "expected a list",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
}


_FIX_BY_KIND = {  # keyed by the error type without its last word: int_parsing -> int
    "int": "write a whole number",
    "int_from": "write a whole number",
    "float": "write a number, e.g. 2.0e-4",
    "bool": "write true or false",
    "string": "write a string",
    "string_pattern": "write a value of the form shown",
    "string_too": "write a non-empty value",
    "list": "write a YAML list, e.g. [a, b]",
    "too": "give at least one item",
    "model": "write a mapping of keys, as in configs/tiny-ja.yaml",
    "model_attributes": "write a mapping of keys, as in configs/tiny-ja.yaml",
}


def _dotted(loc: tuple) -> str:
    out = ""
    for k in loc:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out or "(top level)"


def _field_info(loc: tuple):
    """The pydantic FieldInfo for a key path, or None where the path leaves the schema."""
    model, info = RunConfig, None
    for k in loc:
        if isinstance(k, int):
            continue
        if model is None or k not in model.model_fields:
            return None
        info = model.model_fields[k]
        model = _model_in(info.annotation)
    return info


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _valid_keys(parent: tuple) -> list[str]:
    model = RunConfig if not parent else _model_in(getattr(_field_info(parent), "annotation", None))
    return list(model.model_fields) if model else []


def _literal_choices(info) -> tuple:
    def walk(annotation):
        if typing.get_origin(annotation) is Literal:
            return typing.get_args(annotation)
        for arg in typing.get_args(annotation):
            if found := walk(arg):
                return found
        return ()

    return walk(info.annotation) if info is not None else ()


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to the 1-based line its key is written on."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = (*prefix, str(key.value))
                lines[path] = key.start_mark.line + 1
                walk(value, path)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def from_command_line(path: str, overrides: typing.Sequence[str]) -> RunConfig | None:
    """load_config for a command line: None, with every problem on stderr, instead of an exception."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file, e.g. configs/tiny-ja.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if (config := from_command_line(args.config, args.overrides)) is None:
        return 2
    sys.stdout.write(to_yaml(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
