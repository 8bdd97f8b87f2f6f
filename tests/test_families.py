"""Model families, each with its own chat template. Unit tests: the config's choices, the GGUF reader, the
matrix's log parsing and expected loss spans. Docker-marked: `invoke families` trains, converts and serves a
tiny model of every family with its real vocabulary and template (from the pinned llama.cpp source) and finds
Ollama's prompts and token ids equal to training's (a family without a vocabulary there: its prompts); templates that no family renders, and a forced format
the vocabulary cannot carry, are refused before any training, naming the choices."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import pytest
from support import ROOT, in_train_image, invoke, output, run_dir, sets

from finetune.core import families, gguf_meta, layout
from finetune.core.config import ConfigError, load_config
from finetune.evaluation import families as matrix

TINY = ROOT / "configs" / "tiny-ja.yaml"


# ---- unit ----

def test_chat_template_accepts_auto_a_family_or_a_jinja_file_and_names_the_choices(tmp_path):
    assert load_config(TINY, root=ROOT).model.chat_template == "chatml"
    assert load_config(TINY, ["model.chat_template=auto"], root=ROOT).model.chat_template == "auto"
    assert load_config(TINY, ["model.chat_template=llama3"], root=ROOT).model.chat_template == "llama3"
    (tmp_path / "mine.jinja").write_text("{{ messages }}")
    assert load_config(TINY, [f"model.chat_template={tmp_path / 'mine.jinja'}"], root=ROOT)
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.chat_template=zephyr"], root=ROOT)
    assert "'zephyr' is neither auto, a family nor a .jinja file" in str(e.value)
    assert "chatml, qwen2.5, qwen3, llama3, phi3, gemma4" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.chat_template=missing/x.jinja"], root=ROOT)
    assert "model.chat_template: file not found: missing/x.jinja" in str(e.value)


def test_gguf_metadata_reader_reads_every_value_type(tmp_path):
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    kvs = [string("general.architecture") + struct.pack("<I", 8) + string("llama"),
           string("tokenizer.ggml.add_bos_token") + struct.pack("<I?", 7, True),
           string("tokenizer.ggml.bos_token_id") + struct.pack("<II", 4, 128000),
           string("x.float") + struct.pack("<If", 6, 0.5),
           string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("<s>") + string("返品"),
           string("tokenizer.ggml.token_type") + struct.pack("<IIQ3i", 9, 5, 3, 3, 1, 1)]
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    assert gguf_meta.read_metadata(path) == {
        "general.architecture": "llama", "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 128000,
        "x.float": 0.5, "tokenizer.ggml.tokens": ["<s>", "返品"], "tokenizer.ggml.token_type": [3, 1, 1]}
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("cut"))
    with pytest.raises(gguf_meta.GGUFError, match="cut short"):
        gguf_meta.read_metadata(path)
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(gguf_meta.GGUFError, match="not a GGUF file"):
        gguf_meta.read_metadata(path)


def test_every_family_renders_each_probe_and_answers_end_with_its_end_of_turn():
    for family in families.FAMILIES.values():
        for text in families.probe_renderings(family):
            assert text and "{{" not in text, family.name
        runs = matrix.expected_answers(family, matrix.ANSWERED, matrix.ANSWER)
        assert len(runs) == 2 and all(r.endswith(family.end_of_turn) for r in runs), family.name
        assert runs[-1].removesuffix(family.end_of_turn).endswith(matrix.ANSWER)
    assert matrix.expected_answers(families.FAMILIES["qwen3"], matrix.ANSWERED, matrix.ANSWER)[-1] == \
        families.EMPTY_THINK + matrix.ANSWER + "<|im_end|>"  # Qwen 3's last answer carries its empty thinking


def test_where_the_generation_prompt_is_no_prefix_each_answer_trains_after_its_own_prompt():
    """Gemma 4's empty thought channel, DeepSeek-R1's empty thinking block and Mistral Nemo's system prompt
    are in the generation prompt but not in an answered turn: the loss covers each answer and its end of turn,
    the text before it being that prompt (train/chat.py training_texts)."""
    answered = [*matrix.ANSWERED, {"role": "assistant", "content": matrix.ANSWER}]
    with_system = [{"role": "system", "content": "丁寧に"}, *answered]
    for name in ("gemma4", "deepseek-r1", "mistral-nemo"):
        family = families.FAMILIES[name]
        heads = [family.render(with_system[:i], True, None) for i in (2, 4)]
        assert not all(family.render(with_system, False, None).startswith(h) for h in heads), name
        end = family.end_of_turn
        assert matrix.expected_answers(family, matrix.ANSWERED, matrix.ANSWER) == [
            matrix.ANSWERED[1]["content"] + end, matrix.ANSWER + end], name
    thought = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nA"}]
    assert families.FAMILIES["deepseek-r1"].render(thought, False, None) == \
        "<｜User｜>Q<｜Assistant｜>\n\nA<｜end▁of▁sentence｜>"  # its template drops an answer's thinking


def test_the_matrix_reads_prompts_and_the_runners_ids_from_ollamas_trace_log():
    log = "\n".join([
        'time=1 level=TRACE msg="completion request" prompt="<|im_start|>user\\n\\u8fd4<|im_end|>\\n"',
        'time=2 level=TRACE msg=encoded string="<|im_start|>user\\n\\u8fd4<|im_end|>\\n" ids="[151643 151644 872]"',
        'time=3 level=TRACE source=bytepairencoding.go:287 msg=encoded string="second" ids="[1 2]"',
        'time=4 level=TRACE source=server.go:1581 msg="completion request" prompt="second"',
    ])
    assert matrix.logged_requests(log) == [("<|im_start|>user\n返<|im_end|>\n", [151643, 151644, 872]),
                                           ("second", None)]  # the count before a request is not its runner's


# ---- the matrix, for real ----

@pytest.fixture(scope="module")
def matrix_rows():
    done = invoke("families")
    print(done.stdout[-4000:])
    assert done.returncode == 0, output(done)
    return {r["case"]: r for r in json.loads((ROOT / "artifacts" / "families" / "families.json").read_text())}


@pytest.mark.docker
@pytest.mark.slow
def test_every_family_is_served_with_the_prompt_and_ids_it_was_trained_on(matrix_rows):
    assert list(matrix_rows) == [c.name for c in (*families.CASES, *families.PROMPT_CASES)]
    rows = dict(matrix_rows)
    for case in families.PROMPT_CASES:  # no vocabulary in the source: the prompts alone
        row = rows.pop(case.name)
        assert row["prompt_only"] and row["problems"] == [] and row["prompts"] == [4, 4], case.name
    for case, row in rows.items():
        assert row["test_cases"] == (46 if case == "gemma4" else 47), case  # llama.cpp's test cases of the vocabulary
        assert row["convert"] == "ok" and row["problems"] == [], case
        assert row["prompts"][0] == row["prompts"][1] >= 5 and row["ids"][0] == row["ids"][1] >= 5, case
    assert matrix_rows["qwen3"]["prompts"][1] == 15  # thinking unset, off and on
    assert matrix_rows["qwen3"]["runner"] == "Go engine" and matrix_rows["llama3.2"]["runner"] == "llama.cpp"
    assert matrix_rows["gemma4"]["runner"] == "Go engine"  # its prompt from Ollama's gemma4-large renderer
    table = (ROOT / "artifacts" / "families" / "families.md").read_text()
    assert table in (ROOT / "README.md").read_text(), "README's table is the matrix's output"


@pytest.mark.docker
@pytest.mark.slow
def test_the_loss_covers_each_answer_and_its_end_of_turn_token(matrix_rows):
    """The masked tokens of a two-answer conversation, decoded in the train image: each answer plus the
    family's end-of-turn token, nothing of the prompts (Qwen 3's last answer: its empty thinking block too)."""
    first, last = matrix.ANSWERED[1]["content"], matrix.ANSWER
    for case in families.CASES:
        end = families.FAMILIES[case.family].end_of_turn
        think = families.EMPTY_THINK if case.family == "qwen3" else ""
        assert matrix_rows[case.name]["trained_runs"] == [first + end, think + last + end], case.name


ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("case, template, says", [
    ("qwen2.5", "zephyr.jinja", ["renders like none of the families", "chatml, qwen2.5, qwen3, llama3, phi3, gemma4",
                                 "llama3: at character", "Fix: set model.chat_template"]),
    ("phi3.5", "chatml", ["ends turns with <|im_end|>, which is not a single token", "model.chat_template: auto"]),
    ("qwen2.5", "no template", ["has no chat template", "set model.chat_template to one of auto"]),
])
def test_a_template_that_cannot_be_served_as_trained_is_refused_before_training(matrix_rows, tmp_path, case,
                                                                                 template, says):
    base = ROOT / "artifacts" / "families" / case / "base"
    overrides = [f"model.id={base}"]
    if template == "zephyr.jinja":
        (tmp_path / template).write_text(ZEPHYR)
        overrides.append(f"model.chat_template={tmp_path / template}")
    elif template == "no template":
        shutil.copytree(base, tmp_path / "base")
        (tmp_path / "base" / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
        subprocess.run(["chmod", "-R", "a+rX", str(tmp_path / "base")], check=True)  # the container's user reads it
        overrides = [f"model.id={tmp_path / 'base'}", "model.chat_template=auto"]
    else:
        overrides.append(f"model.chat_template={template}")
    run = f"test-refused-{case}"
    shutil.rmtree(run_dir(run), ignore_errors=True)
    done = invoke("train", "--config", str(matrix.case_dir(next(c for c in families.CASES if c.name == case))
                                            / "config.yaml"), *sets(run, *overrides))
    assert done.returncode == 2, output(done)
    for text in says:
        assert text in done.stdout + done.stderr, output(done)  # the container's output comes on stdout
    assert not layout.stage_dir(run_dir(run), "train").exists()
    shutil.rmtree(run_dir(run), ignore_errors=True)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("template", matrix.UNSUPPORTED_TEMPLATES)
def test_real_templates_of_families_without_a_go_template_are_refused(matrix_rows, template):
    """DeepSeek-R1-Distill, Gemma 2, Mistral Nemo: their real templates (from the pinned llama.cpp source)
    on the Llama 3 vocabulary stop `invoke train` before training, with the first difference per family."""
    case = next(c for c in families.CASES if c.name == "llama3.2")
    run = "test-refused-unsupported"
    done = invoke("train", "--config", str(matrix.case_dir(case) / "config.yaml"),
                  *sets(run, f"model.chat_template={matrix.ROOT / 'source' / template}"))
    assert done.returncode == 2, output(done)
    said = done.stdout + done.stderr
    assert "renders like none of the families" in said and "phi3: " in said and "stopped with the error" in said
    assert not layout.stage_dir(run_dir(run), "train").exists()
    shutil.rmtree(run_dir(run), ignore_errors=True)


@pytest.mark.docker
@pytest.mark.slow
def test_a_named_family_installs_its_reference_template_and_records_it(matrix_rows):
    """model.chat_template=chatml on the Qwen 2.5 vocabulary (its <|im_start|>/<|im_end|> are single tokens):
    trained on plain ChatML, recorded as such, converted with that template in the GGUF."""
    case = next(c for c in families.CASES if c.name == "qwen2.5")
    run = "test-named-chatml"
    shutil.rmtree(run_dir(run), ignore_errors=True)
    config = str(matrix.case_dir(case) / "config.yaml")
    done = invoke("train", "--config", config, *sets(run, "model.chat_template=chatml"))
    assert done.returncode == 0, output(done)
    recorded = json.loads((layout.stage_dir(run_dir(run), "train") / layout.CHAT_FORMAT).read_text())
    assert (recorded["family"], recorded["source"], recorded["bos"]) == ("chatml", "chatml", False)
    assert "You are Qwen" not in recorded["jinja"]
    shutil.rmtree(run_dir(run), ignore_errors=True)


PACKING = (
    "import json; from datasets import Dataset; from transformers import AutoTokenizer; "
    "from trl.data_utils import pack_dataset; from finetune.core.data import Example; "
    "from finetune.train import chat; from finetune.train.sft import tokenize; "
    "t = AutoTokenizer.from_pretrained('/artifacts/train/merged'); f = chat.resolve('auto', t, 'merged'); "
    "c = json.load(open('/t/conversations.json', encoding='utf-8')); "
    "cols = tokenize([Example(messages=m, where='x') for m in c], t, f, True); "
    "packed = pack_dataset(Dataset.from_dict(cols), 512, 'bfd').to_dict(); "
    "print(json.dumps({'cols': cols, 'packed': packed}))"
)


@pytest.mark.docker
@pytest.mark.slow
def test_packing_keeps_each_conversation_whole_with_its_loss_mask(matrix_rows, tmp_path):
    """train.packing packs with TRL's best-fit-decreasing strategy: each packed row is whole conversations
    end to end, each with its own mask and its length recorded (seq_lengths), from which the positions restart
    at each boundary (padding-free). Checked on Qwen 3's real vocabulary and template."""
    conversations = [[*matrix.ANSWERED, {"role": "assistant", "content": matrix.ANSWER}]] + [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in (("送料は？", "全国一律500円です。"), ("営業時間は？", "平日9時から18時です。"))]
    (tmp_path / "conversations.json").write_text(json.dumps(conversations, ensure_ascii=False), encoding="utf-8")
    tmp_path.chmod(0o755)
    (tmp_path / "conversations.json").chmod(0o644)
    found = json.loads(in_train_image(PACKING, "family-qwen3", mounts={str(tmp_path): {"bind": "/t", "mode": "ro"}}))
    originals = sorted(zip(map(tuple, found["cols"]["input_ids"]), map(tuple, found["cols"]["assistant_masks"])))
    pieces = []
    for ids, mask, lengths in zip(*(found["packed"][k] for k in ("input_ids", "assistant_masks", "seq_lengths"))):
        assert sum(lengths) == len(ids) == len(mask) <= 512
        at = 0
        for n in lengths:
            pieces.append((tuple(ids[at:at + n]), tuple(mask[at:at + n])))
            at += n
    assert sorted(pieces) == originals and len(found["packed"]["input_ids"]) < len(originals)


ZEPHYR_GO = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|im_end|>\n{{ end }}<|assistant|>\n"


def test_a_go_template_of_ones_own_needs_its_end_of_turn_token_and_an_existing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.end_of_turn=<|im_end|>"], root=ROOT)
    assert "model.go_template and model.end_of_turn go together" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.go_template=none.gotmpl", "model.end_of_turn=<|im_end|>"], root=ROOT)
    assert "model.go_template: file not found: none.gotmpl" in str(e.value)


@pytest.mark.docker
@pytest.mark.slow
def test_a_go_template_of_ones_own_is_served_only_if_ollama_renders_the_trained_prompts(matrix_rows, tmp_path):
    """A Zephyr-style template (no family renders it) with model.go_template: trained, converted and served,
    `invoke serve` having had Ollama render the trained probe conversations (`_debug_render_only`) identically;
    the same with a Go template that drops one line break is refused by `invoke serve`, naming the place."""
    case = next(c for c in families.CASES if c.name == "qwen2.5")
    (tmp_path / "zephyr.jinja").write_text(ZEPHYR)
    config = str(matrix.case_dir(case) / "config.yaml")
    for go, run, port in ((ZEPHYR_GO, "test-own-template", "11536"),
                          (ZEPHYR_GO.removesuffix("\n"), "test-own-template-wrong", "11537")):
        (tmp_path / f"{run}.gotmpl").write_text(go)
        overrides = sets(run, f"model.chat_template={tmp_path / 'zephyr.jinja'}", f"serve.port={port}",
                         f"model.go_template={tmp_path / f'{run}.gotmpl'}", "model.end_of_turn=<|im_end|>")
        shutil.rmtree(run_dir(run), ignore_errors=True)
        for task in ("train", "convert"):
            done = invoke(task, "--config", config, *overrides)
            assert done.returncode == 0, output(done)
        recorded = json.loads((layout.stage_dir(run_dir(run), "train") / layout.CHAT_FORMAT).read_text())
        assert (recorded["family"], recorded["go_template"], len(recorded["probes"])) == ("custom", go, 2)
        done = invoke("serve", "--config", config, *overrides)
        invoke("stop", "--config", config, *overrides)
        if go == ZEPHYR_GO:
            assert done.returncode == 0, output(done)
            assert f'TEMPLATE """{go}"""' in (layout.stage_dir(run_dir(run), "serve") / layout.MODELFILE).read_text()
        else:
            assert done.returncode == 2, output(done)
            assert "Ollama renders family-qwen2.5's prompt differently from training: at character" in done.stderr
        shutil.rmtree(run_dir(run), ignore_errors=True)
