"""The serve stage's output, written on the host: artifacts/<run>/serve/, the Modelfiles and the models list.

    Modelfile           the fine-tuned model: FROM ../convert/model-<serve.quant>.gguf, the Go template and
                        stop tokens of the family trained with (convert/chat.json), SYSTEM and sampling
    Modelfile.baseline  when serve.baseline: the base model with the same SYSTEM plus the few-shot turns
                        (MESSAGE): the prompt engineering to try before fine-tuning
    Modelfile.<QUANT>   the fine-tuned model at each other built type; created on demand (`invoke eval`)
    models              `<model name> <Modelfile> <GGUF>` per line (paths relative to serve/): what the container
                        creates at start. The GGUF travels here, beside the Modelfile, so that nothing reads a
                        path back out of Modelfile text (a SYSTEM line may well begin with "FROM ").
The Modelfiles work outside the container too: `cd artifacts/<run>/serve && ollama create NAME -f Modelfile`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.core import families, layout
from finetune.core.config import RunConfig
from finetune.core.stage import publishing
from finetune.serve import STAGE, modelfile


class ServeError(RuntimeError):
    """A missing input or a container that did not become healthy; the message says what to do."""


@dataclass(frozen=True)
class ListedModel:
    """One model of the run: its name, its Modelfile and its GGUF (paths relative to serve/)."""

    name: str
    modelfile: str
    gguf: str


def served_models(config: RunConfig) -> list[tuple[ListedModel, list[modelfile.Turn]]]:
    """The models the container creates at start, with each one's few-shot turns: the fine-tuned model at
    serve.quant, and the baseline when serve.baseline."""
    quant, name = config.serve.quant, config.serve.model_name
    models = [(ListedModel(name, layout.MODELFILE, layout.gguf_from_serve(layout.model_gguf(quant))), [])]
    if config.serve.baseline:
        models.append((ListedModel(layout.baseline_name(name), layout.BASELINE_MODELFILE,
                                   layout.gguf_from_serve(layout.base_gguf(quant))), modelfile.few_shot_turns(config)))
    return models


def other_quants(config: RunConfig) -> dict[str, ListedModel]:
    """{type: model} for every built type besides the served one: written, created only on demand."""
    built = [config.convert.outtype, *config.convert.quant_types]
    return {q: ListedModel(layout.quant_name(config.serve.model_name, q), layout.quant_modelfile(q),
                           layout.gguf_from_serve(layout.model_gguf(q)))
            for q in dict.fromkeys(built) if q != config.serve.quant}


def check_inputs(config: RunConfig, run_dir: Path) -> None:
    """Raise ServeError, with the fix, when a GGUF to serve is missing."""
    convert = layout.stage_dir(run_dir, "convert")
    ggufs = [Path(m.gguf).name for m, _ in served_models(config)]
    missing = [gguf for gguf in ggufs if not (convert / gguf).is_file()]
    if missing:
        raise ServeError(f"no {' or '.join(missing)} in {convert}: run `invoke convert` "
                         f"first (serve.quant={config.serve.quant} must be among the types it builds; the base GGUF "
                         "is built when serve.baseline is true)")


def trained_format(run_dir: Path) -> dict:
    """convert/chat.json: the chat format the train stage resolved (finetune/train/chat.py, ChatFormat)."""
    path = layout.stage_dir(run_dir, "convert") / layout.CHAT_FORMAT
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        recorded["family"]
    except (OSError, ValueError, KeyError) as e:
        raise ServeError(f"cannot read the trained chat format from {path} ({e}): run `invoke convert --force`") from e
    return recorded


def trained_family(run_dir: Path) -> families.Family:
    """The chat-template family the model was trained with (convert/chat.json, from the train stage); a
    family of the user's own (model.go_template) as recorded there."""
    recorded = trained_format(run_dir)
    name, path = recorded["family"], layout.stage_dir(run_dir, "convert") / layout.CHAT_FORMAT
    if name == "custom":
        return families.custom(recorded["go_template"], recorded["end_of_turn"])
    if name not in families.FAMILIES:
        raise ServeError(f"{path} names the chat-template family {name!r}, which this version has no Ollama "
                         f"template for ({families.supported()}): run `invoke train --force`")
    return families.FAMILIES[name]


def write_modelfiles(config: RunConfig, run_dir: Path) -> Path:
    """Write run_dir/serve/ (see the module docstring) from the convert stage's GGUFs; return the directory.
    Reads the config through the stage's declaration, so an undeclared key fails here rather than missing
    the cache key."""
    config = STAGE.view(config)
    check_inputs(config, run_dir)
    family = trained_family(run_dir)
    served = served_models(config)
    final = layout.stage_dir(run_dir, "serve")
    with publishing(layout.partial_dir(run_dir, "serve"), final) as work:
        for m, turns in served:
            (work / m.modelfile).write_text(modelfile.render(m.gguf, config, family, turns), encoding="utf-8")
        for m in other_quants(config).values():
            (work / m.modelfile).write_text(modelfile.render(m.gguf, config, family), encoding="utf-8")
        (work / layout.MODELS_LIST).write_text("".join(f"{m.name} {m.modelfile} {m.gguf}\n" for m, _ in served))
        for path in work.iterdir():
            path.chmod(0o644)  # readable by the container's user
    return final


def read_models(run_dir: Path) -> list[ListedModel]:
    """The models that run_dir/serve/models lists (written by write_modelfiles)."""
    text = (layout.stage_dir(run_dir, "serve") / layout.MODELS_LIST).read_text(encoding="utf-8")
    return [ListedModel(*line.split(" ")) for line in text.splitlines() if line.strip()]
