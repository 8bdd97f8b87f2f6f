"""Modelfile generation on the host: what goes in, which texts a Modelfile cannot carry (refused with the key
and the character), and the serve task's errors before any container starts. That Ollama reads the generated
Modelfiles back exactly, and renders prompts as training did, is proven against a real Ollama in
test_serve.py."""

from __future__ import annotations

import pytest
from support import ROOT, invoke, run_dir, sets

from finetune.core import layout, modelfile_text
from finetune.core.config import ConfigError, load_config
from finetune.core.families import FAMILIES
from finetune.serve import modelfile, modelfiles

# Texts Ollama's parser reads back unchanged inside triple quotes (checked for real in test_serve.py).
CARRIED = [
    'He said "hello" and left.',
    "It's a 'single' quote",
    'triple """quotes""" inside',
    'ends with a quote"',
    '"""',
    "back\\slash, \\n and \\t written out",
    "line one\nline two\n\nafter a blank line",
    "trailing newline\n",
    "tab\tseparated",
    "{{ .System }} {{ range .Messages }}{{ end }} Go template syntax",
    "<|im_start|> and <|im_end|> as text",
    "返品承知いたしました。「注文履歴」から（14日以内）",
    "emoji 🙂 and accents: café",
    # Lines that begin like Modelfile instructions: nothing may read them back as instructions.
    "Be polite.\nFROM now on, answer in Japanese.\nPARAMETER stop is not a parameter\nTEMPLATE {{ .Prompt }}\n"
    "SYSTEM also text\nMESSAGE user hi\nADAPTER ./adapter.gguf\nFROM ../convert/base-Q8_0.gguf",
]
REFUSED = [
    ("全角\u3000スペース", "character 3 is U+3000 (IDEOGRAPHIC SPACE), which Ollama's Modelfile parser silently drops",
     "replace it with an ASCII space"),
    ("zero\u200bwidth", "U+200B (ZERO WIDTH SPACE)", "remove it"),
    ("bell\x07", "U+0007 (a control character)", "remove it"),
    ('x"""\ny', "'\"\"\"' followed by a line break (at character 2) would end the value early", "line break"),
    ('x"""  \r\ny', "followed by a line break", "put a character other than a space"),
]

CHATML = FAMILIES["chatml"]


def tiny(**serve_changes):
    config = load_config(ROOT / "configs" / "tiny-ja.yaml", root=ROOT)
    return config.model_copy(update={"serve": config.serve.model_copy(update=serve_changes)})


def test_modelfile_has_the_training_template_its_stop_tokens_system_and_sampling():
    config = tiny()
    text = modelfile.render("../convert/model-Q8_0.gguf", config, CHATML)
    lines = text.splitlines()
    assert lines[1] == "FROM ../convert/model-Q8_0.gguf"
    assert f'TEMPLATE """{CHATML.go_template}"""' in text
    assert 'PARAMETER stop """<|im_end|>"""' in lines and 'PARAMETER stop """<|im_start|>"""' in lines
    for line in ("PARAMETER temperature 0.0", "PARAMETER top_p 1.0", "PARAMETER num_ctx 1024", "PARAMETER seed 42"):
        assert line in lines
    assert f'SYSTEM """{config.serve.system_prompt}"""' in lines
    assert not any(x.startswith("MESSAGE") for x in lines), "few-shot turns belong to the baseline only"


def test_baseline_modelfile_adds_the_few_shot_turns_in_order():
    config = tiny()
    text = modelfile.render("../convert/base-Q8_0.gguf", config, CHATML, modelfile.few_shot_turns(config))
    shot = config.serve.few_shot[0]
    assert text.endswith(f'MESSAGE user """{shot.user}"""\nMESSAGE assistant """{shot.assistant}"""\n')


def test_a_family_with_an_ollama_renderer_names_it_and_its_parser_instead_of_a_template():
    """Gemma 4: Ollama ignores a TEMPLATE for gemma4 GGUFs, so the Modelfile names the built-in renderer the
    family renders like; the passthrough parser keeps Ollama from switching thinking on by default."""
    lines = modelfile.render("m.gguf", tiny(), FAMILIES["gemma4"]).splitlines()
    assert lines[1:4] == ["FROM m.gguf", "RENDERER gemma4-large", "PARSER passthrough"]
    assert not any(x.startswith("TEMPLATE") for x in lines) and 'PARAMETER stop """<turn|>"""' in lines


def test_extra_stop_strings_follow_the_template_ones_once():
    lines = modelfile.render("m.gguf", tiny(stop=["<|im_end|>", "###"]), CHATML).splitlines()
    assert [x for x in lines if x.startswith("PARAMETER stop")] == [
        'PARAMETER stop """<|im_end|>"""', 'PARAMETER stop """<|im_start|>"""', 'PARAMETER stop """###"""']


@pytest.mark.parametrize("text", CARRIED)
def test_texts_a_modelfile_carries_are_accepted(text):
    assert modelfile_text.unreadable(text) is None


@pytest.mark.parametrize(("text", "what", "fix"), REFUSED)
def test_texts_a_modelfile_would_alter_are_refused_with_the_fix(text, what, fix):
    problem = modelfile_text.unreadable(text)
    assert problem is not None and what in problem[0] and fix in problem[1]


def test_config_names_the_file_line_and_key_of_a_text_ollama_cannot_carry(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "configs" / "tiny-ja.yaml").read_text(encoding="utf-8").replace(
        "assistant: 通常配送の場合", "assistant: \"通常配送\\u3000の場合"), encoding="utf-8")
    config.write_text(config.read_text(encoding="utf-8").replace("ご確認いただけます。\n", "ご確認いただけます。\"\n"),
                      encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(config, root=ROOT)
    line = next(i for i, x in enumerate(config.read_text(encoding="utf-8").splitlines(), 1) if "few_shot:" in x)
    assert (f"bad.yaml:{line}: serve.few_shot[0].assistant: character 5 is U+3000 (IDEOGRAPHIC SPACE), which "
            "Ollama's Modelfile parser silently drops. Fix: replace it with an ASCII space") in str(e.value)


def test_baseline_name_keeps_an_explicit_tag():
    assert layout.baseline_name("sakura") == "sakura-baseline"
    assert layout.baseline_name("sakura:v2") == "sakura-baseline:v2"


@pytest.mark.cli
def test_serve_without_a_converted_model_says_to_convert_first():
    run = "test-serve-missing"
    done = invoke("serve", *sets(run, "serve.port=11533"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert (f"serve: no model-Q8_0.gguf or base-Q8_0.gguf in artifacts/{run}/convert: run `invoke convert` first"
            in done.stderr)
    assert not run_dir(run).exists()


def test_serve_names_the_fix_when_the_trained_chat_format_is_missing_or_unknown(tmp_path):
    (tmp_path / "convert").mkdir()
    with pytest.raises(modelfiles.ServeError, match="chat.json .*run `invoke convert --force`"):
        modelfiles.trained_family(tmp_path)
    (tmp_path / "convert" / layout.CHAT_FORMAT).write_text('{"family": "mistral"}')
    with pytest.raises(modelfiles.ServeError, match="'mistral', which this version has no Ollama template for"):
        modelfiles.trained_family(tmp_path)
    (tmp_path / "convert" / layout.CHAT_FORMAT).write_text('{"family": "phi3"}')
    assert modelfiles.trained_family(tmp_path) is FAMILIES["phi3"]
