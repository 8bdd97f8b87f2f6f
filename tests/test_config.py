"""The run configuration: every preset loads, and every kind of mistake is reported with file, line or
--set, key path and a fix, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.core.config import ConfigError, load_config, to_yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny-ja.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_starts_with_its_command(path):
    config = load_config(path, root=ROOT)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert (config.run, config.model.id, config.data.train) == (raw["run"], raw["model"]["id"], raw["data"]["train"])
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# invoke ") or first.startswith("# ./invoke "), first


def test_presets_cover_the_guides_sizes():
    names = {p.name for p in CONFIGS}
    assert {"tiny-ja.yaml", "qwen2.5-3b-ja-qlora.yaml", "qwen2.5-7b-ja-qlora.yaml"} <= names
    for name in ("qwen2.5-3b-ja-qlora.yaml", "qwen2.5-7b-ja-qlora.yaml"):
        config = load_config(ROOT / "configs" / name, root=ROOT)
        assert config.train.method == "qlora" and config.model.revision is not None
        assert "VRAM arithmetic" in (ROOT / "configs" / name).read_text(encoding="utf-8")


FAMILY_OF = {"qwen2.5-3b-ja-qlora.yaml": "qwen2.5", "qwen2.5-7b-ja-qlora.yaml": "qwen2.5",
             "llama3.2-3b-ja-qlora.yaml": "llama3", "phi3.5-mini-ja-qlora.yaml": "phi3",
             "qwen3-1.7b-ja-lora.yaml": "qwen3"}


def test_hub_presets_keep_their_models_own_template_pin_the_revision_and_show_the_vram():
    """Real models of several families keep their own chat template (auto, the family named beside it);
    the toy keeps ChatML."""
    assert load_config(TINY, root=ROOT).model.chat_template == "chatml"
    assert {p.name for p in CONFIGS} == {"tiny-ja.yaml", *FAMILY_OF}
    for name, family in FAMILY_OF.items():
        config, text = load_config(ROOT / "configs" / name, root=ROOT), (ROOT / "configs" / name).read_text()
        assert config.model.chat_template == "auto" and config.model.revision is not None, name
        assert f"(family {family}" in text and "VRAM arithmetic" in text, name


def test_override_changes_one_key_and_keeps_the_rest():
    base = load_config(TINY, root=ROOT)
    config = load_config(TINY, ["train.max_steps=20", "convert.quant_types=[Q4_K_M, Q8_0]"], root=ROOT)
    assert config.train.max_steps == 20 and config.convert.quant_types == ["Q4_K_M", "Q8_0"]
    assert config.train.rank == base.train.rank and config.serve == base.serve


def test_resolved_config_round_trips(tmp_path):
    config = load_config(TINY, root=ROOT)
    copy = tmp_path / "resolved.yaml"
    copy.write_text(to_yaml(config), encoding="utf-8")
    assert load_config(copy, root=ROOT) == config


def errors(tmp_path, text: str, overrides=()) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, root=ROOT)
    return str(info.value)


def tiny_with(old: str, new: str) -> str:
    text = TINY.read_text(encoding="utf-8")
    assert old in text
    return text.replace(old, new, 1)


def test_unknown_key_names_line_and_suggests(tmp_path):
    message = errors(tmp_path, tiny_with("  rank: 16", "  rnak: 16"))
    line = TINY.read_text(encoding="utf-8").splitlines().index("  rank: 16") + 1
    assert f"bad.yaml:{line}: train.rnak: unknown key. Fix: did you mean 'rank'?" in message


def test_wrong_type(tmp_path):
    message = errors(tmp_path, tiny_with("  batch_size: 1", "  batch_size: two"))
    assert "train.batch_size: expected a whole number (got 'two'). Fix: write a whole number" in message


def test_impossible_value_states_the_bound(tmp_path):
    message = errors(tmp_path, tiny_with("  dropout: 0.0", "  dropout: 1.5"))
    assert "train.dropout: input should be less than 1 (got 1.5). Fix: use a value < 1" in message


def test_bad_choice_lists_valid_ones(tmp_path):
    message = errors(tmp_path, tiny_with("  method: lora", "  method: qlorra"))
    assert "train.method:" in message and "Fix: did you mean 'qlora'? use one of: lora, qlora" in message


def test_unknown_quant_type_lists_valid_ones(tmp_path):
    message = errors(tmp_path, TINY.read_text(encoding="utf-8"), ["convert.quant_types=[Q4_K_X]"])
    assert "--set convert.quant_types=[Q4_K_X]: convert.quant_types[0]:" in message
    assert "use one of: Q2_K, Q3_K_S" in message and "Q8_0" in message


def test_missing_section(tmp_path):
    text = TINY.read_text(encoding="utf-8").split("\nserve:")[0]
    message = errors(tmp_path, text)
    assert "bad.yaml: serve: required key is missing. Fix: add it" in message


def test_all_problems_reported_together(tmp_path):
    text = tiny_with("  rank: 16", "  rank: 0").replace("  seed: 42", "  seed: -1").replace("run: tiny-ja", "run: a/b")
    message = errors(tmp_path, text)
    assert "3 problems" in message
    assert "train.rank" in message and "train.seed" in message and "run:" in message


def test_hub_model_without_revision(tmp_path):
    text = (ROOT / "configs" / "qwen2.5-3b-ja-qlora.yaml").read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("revision:"))
    message = errors(tmp_path, text)
    assert "model.revision: hub model 'Qwen/Qwen2.5-3B-Instruct' has no pinned revision" in message


def test_revision_must_be_a_commit(tmp_path):
    message = errors(tmp_path, TINY.read_text(encoding="utf-8"), ["model.revision=main"])
    assert "model.revision: string should match pattern" in message and "40-hex commit" in message


def test_served_quant_must_be_built(tmp_path):
    message = errors(tmp_path, TINY.read_text(encoding="utf-8"), ["serve.quant=Q4_K_M"])
    assert "serve.quant: 'Q4_K_M' is not built by the convert stage. Fix: use one of ['Q8_0', 'f16']" in message


def test_epochs_and_max_steps_conflict(tmp_path):
    message = errors(tmp_path, TINY.read_text(encoding="utf-8"), ["train.epochs=2"])
    assert "both train.epochs and train.max_steps are set" in message


def test_missing_data_file(tmp_path):
    message = errors(tmp_path, TINY.read_text(encoding="utf-8"), ["data.train=data/nope.jsonl"])
    assert "--set data.train=data/nope.jsonl: data.train: file not found: data/nope.jsonl" in message


def test_bad_ollama_model_name(tmp_path):
    message = errors(tmp_path, tiny_with("model_name: sakura-support-tiny", "model_name: Sakura Support"))
    assert "serve.model_name: string should match pattern" in message and "lowercase" in message


def test_malformed_override(tmp_path):
    message = errors(tmp_path, TINY.read_text(encoding="utf-8"), ["train.max_steps"])
    assert "--set train.max_steps: train.max_steps: an override needs the form KEY.PATH=VALUE" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = errors(tmp_path, "run: x\nmodel: [unclosed\n")
    assert "bad.yaml:3: (syntax): not valid YAML" in message


def test_not_a_mapping(tmp_path):
    assert "the file is not a mapping of sections" in errors(tmp_path, "- just\n- a list\n")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "absent.yaml")
