"""The serve stage with a real Ollama (built from source here, see Dockerfile.ollama): the offline default
trained, converted and served answers the training questions as trained and stops by itself, while the
prompt-engineering baseline does not; Ollama renders prompts exactly as the Hugging Face chat template
does and reads hostile texts back unchanged; serving twice, restarting and bad inputs behave; the exported
bundle answers the same on a fresh Ollama."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import urllib.request
from pathlib import Path

import ollama
import pytest
from support import ROOT, in_train_image, invoke, output, run_dir, sets
from test_modelfile import CARRIED

from finetune.core import data, layout
from finetune.core.config import FewShot, RunConfig, load_config
from finetune.core.stage import file_sha256
from finetune.core.families import FAMILIES
from finetune.evaluation.families import go_unquote, wait_healthy
from finetune.host import containers
from finetune.serve import modelfile, modelfiles
from finetune.serve import server as serve

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PORT = 11531  # not Ollama's default, so a developer's own Ollama does not collide
SERVE = ("serve.port=11531",)
SAMPLE = 20  # training questions asked of each model

CHATML = FAMILIES["chatml"]


def config(run: str, *overrides: str) -> RunConfig:
    return load_config(ROOT / "configs" / "tiny-ja.yaml", [f"run={run}", *overrides], root=ROOT)


@pytest.fixture(scope="module")
def served(trained_run):
    """The trained default converted (Q8_0 + base) and served by `invoke serve`; stopped afterwards."""
    done = invoke("convert", *sets(trained_run, *SERVE))
    assert done.returncode == 0, output(done)
    done = invoke("serve", *sets(trained_run, *SERVE))
    assert done.returncode == 0, output(done)
    yield trained_run, done.stdout
    invoke("stop", *sets(trained_run, *SERVE))


def ask(model: str, messages: list[dict], port: int | str = PORT) -> ollama.ChatResponse:
    """The answer, or where Ollama cut it short (a run of one token: the toy baseline's "seeee..."), what it
    streamed until then with done false."""
    answer, final = serve.stream_chat(ollama.Client(host=f"http://127.0.0.1:{port}"), model, messages,
                                      {"num_predict": 200})
    return final.model_copy(update={"message": final.message.model_copy(update={"content": answer})}) if final \
        else ollama.ChatResponse(message=ollama.Message(role="assistant", content=answer), done=False)


def questions(cfg: RunConfig) -> list[data.Example]:
    """SAMPLE conversations spread over those the run trained on (the first data.limit)."""
    examples = data.read_split(ROOT / cfg.data.train).examples[: cfg.data.limit]
    return examples[:: len(examples) // SAMPLE][:SAMPLE]


def up_to_last_question(example: data.Example) -> list[dict]:
    """The conversation up to its last user turn, without the system turn (the Modelfile's SYSTEM gives it)."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "user")
    return [m for m in example.messages[: last + 1] if m["role"] != "system"]


def test_served_model_answers_as_trained_and_the_baseline_does_not(served):
    run, stdout = served
    cfg = config(run, *SERVE)
    assert f"at http://127.0.0.1:{PORT}" in stdout and "sakura-support-tiny-baseline" in stdout
    tuned_hits = baseline_hits = stopped = 0
    for example in questions(cfg):
        messages = up_to_last_question(example)
        tuned = ask(cfg.serve.model_name, messages)
        baseline = ask(layout.baseline_name(cfg.serve.model_name), messages)
        tuned_hits += any(k in tuned.message.content for k in example.key_facts)
        baseline_hits += any(k in baseline.message.content for k in example.key_facts)
        stopped += tuned.done_reason == "stop"
    print(f"key phrase in the answer: fine-tuned {tuned_hits}/{SAMPLE}, baseline {baseline_hits}/{SAMPLE}; "
          f"fine-tuned stopped by itself {stopped}/{SAMPLE}")
    assert tuned_hits > SAMPLE // 2
    assert stopped == SAMPLE
    assert baseline_hits <= SAMPLE // 10


def test_the_guides_example_through_invoke_chat(served):
    run, _ = served
    done = invoke("chat", "商品を返品したいです", *sets(run, *SERVE))
    assert done.returncode == 0, output(done)
    print(done.stdout)
    assert "返品" in done.stdout and "14日以内" in done.stdout


def test_serving_again_and_restarting_recreate_the_same_models(served):
    run, _ = served
    cfg = config(run, *SERVE)
    question = [{"role": "user", "content": "商品を返品したいです"}]
    first = ask(cfg.serve.model_name, question).message.content
    done = invoke("serve", *sets(run, *SERVE))
    assert done.returncode == 0, output(done)
    assert "serve: up to date" in done.stdout and "is up to date and healthy" in done.stdout
    done = invoke("serve", "--force", *sets(run, *SERVE))
    assert done.returncode == 0, output(done)
    assert "serve: rerun, because --force" in done.stdout
    assert ask(cfg.serve.model_name, question).message.content == first
    container = containers.client().containers.get(serve.container_name(cfg))
    container.restart(timeout=10)
    wait_healthy(container)
    assert ask(cfg.serve.model_name, question).message.content == first


def test_a_broken_gguf_stops_serve_with_ollamas_error_and_no_restart_loop():
    run = "test-serve-broken"
    shutil.rmtree(run_dir(run), ignore_errors=True)
    (run_dir(run) / "convert").mkdir(parents=True)
    for name in ("model-Q8_0.gguf", "base-Q8_0.gguf"):
        (run_dir(run) / "convert" / name).write_bytes(b"this is not a GGUF file")
    (run_dir(run) / "convert" / layout.CHAT_FORMAT).write_text('{"family": "chatml"}')
    (run_dir(run) / "stamps").mkdir()
    (run_dir(run) / "stamps" / "convert.json").write_text('{"key": "a convert that wrote bad files"}')
    done = invoke("serve", *sets(run, "serve.port=11534"))
    assert done.returncode == 2, output(done)
    assert f"serve: finetune-serve-{run} exited with 1; its log ends:" in done.stderr
    assert "`ollama create sakura-support-tiny -f Modelfile` failed" in done.stderr
    names = [c.name for c in containers.client().containers.list(all=True)]
    assert f"finetune-serve-{run}" not in names
    shutil.rmtree(run_dir(run))


# --- The template and the escaping, proven with the real Ollama ---------------------------------------

SYSTEMS = [None, "あなたは「さくらマート」のカスタマーサポート担当です。", *CARRIED]
CONVERSATIONS = [
    [{"role": "user", "content": "商品を返品したいです"}],
    [{"role": "user", "content": "送料は？"}, {"role": "assistant", "content": "お客様負担です。"},
     {"role": "user", "content": "着払いでも\n\"いい\"ですか？"}],
]
FEW_SHOT = [{"user": 'quote " and """ and \\ here', "assistant": "一行目\n二行目"},
            {"user": "FROM which address?\nMESSAGE assistant no", "assistant": "FROM ./model.gguf\nSYSTEM x\nADAPTER y"}]


def test_ollama_renders_prompts_as_the_hf_chat_template_and_reads_every_text_back(served, tmp_path):
    """Each Modelfile is generated from a config with a hostile system prompt (and, for one, few-shot turns);
    a real Ollama creates the models, reports their SYSTEM and TEMPLATE, and answers chats while logging the
    prompt it rendered (OLLAMA_DEBUG=2); transformers' apply_chat_template renders the same conversations
    from the trained tokenizer. Every prompt string must be identical."""
    run, _ = served
    shutil.copy(run_dir(run) / "convert" / "model-Q8_0.gguf", tmp_path / "model.gguf")
    cases = []  # (model name, system prompt, few-shot turns)
    for i, system in enumerate(SYSTEMS):
        cases.append((f"case-{i}", system, []))
    cases.append(("case-few-shot", SYSTEMS[2], FEW_SHOT))
    base = config(run)
    for name, system, shots in cases:
        cfg = base.model_copy(update={"serve": base.serve.model_copy(
            update={"system_prompt": system, "few_shot": [FewShot(**s) for s in shots]})})
        turns = modelfile.few_shot_turns(cfg)
        text = modelfile.render("./model.gguf", cfg, CHATML, turns)
        (tmp_path / f"{name}.Modelfile").write_text(text, encoding="utf-8")
    (tmp_path / "models").write_text("".join(f"{name} {name}.Modelfile model.gguf\n" for name, _, _ in cases))
    for path in tmp_path.iterdir():
        path.chmod(0o644)
    tmp_path.chmod(0o755)

    engine = containers.client()
    container = engine.containers.run("finetune-serve:latest", detach=True, ports={"11434/tcp": ("127.0.0.1", None)},
                                      environment={"MODELS_FILE": "/t/models", "OLLAMA_DEBUG": "2"},
                                      volumes={str(tmp_path): {"bind": "/t", "mode": "ro"}})
    try:
        wait_healthy(container)
        port = container.attrs["NetworkSettings"]["Ports"]["11434/tcp"][0]["HostPort"]
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        expected, asked = [], []
        for name, system, shots in cases:
            shown = show(port, name)
            assert shown.get("system") == system or (system is None and "system" not in shown), name
            assert shown["template"] == CHATML.go_template
            prefix = ([{"role": "system", "content": system}] if system is not None else [])
            prefix += [{"role": r, "content": s[r]} for s in shots for r in ("user", "assistant")]
            for conversation in CONVERSATIONS:
                client.chat(model=name, messages=conversation, options={"num_predict": 1})
                expected.append(prefix + conversation)
                asked.append((name, conversation))
        # The prompt each request ran on: 0.24.0 logs it (OLLAMA_DEBUG=2); the llama-server releases (0.30+)
        # log only its length, and there Ollama's render of the same request stands in for it (the Modelfile's
        # TEMPLATE, which they pass to llama-server rendered).
        log = container.logs().decode()
        rendered = [go_unquote(m) for m in re.findall(r'msg="completion request" prompt=("(?:[^"\\]|\\.)*")', log)]
        if not rendered and "llama-server completion request" in log:
            rendered = [serve.render_only(f"http://127.0.0.1:{port}", name, c) for name, c in asked]
    finally:
        container.remove(force=True)
    (tmp_path / "conversations.json").write_text(json.dumps(expected, ensure_ascii=False), encoding="utf-8")
    hf = json.loads(in_train_image(
        "import json; from transformers import AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained('/artifacts/train/merged'); "
        "c = json.load(open('/t/conversations.json', encoding='utf-8')); "
        "print(json.dumps([t.apply_chat_template(x, tokenize=False, add_generation_prompt=True) for x in c]))",
        run, mounts={str(tmp_path): {"bind": "/t", "mode": "ro"}}))
    assert len(rendered) == len(hf) == len(cases) * len(CONVERSATIONS)
    for ours, theirs, conversation in zip(rendered, hf, expected):
        assert ours == theirs, conversation


def show(port: str, model: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/show", data=json.dumps({"model": model}).encode())
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def test_serve_image_runs_as_non_root_and_publishes_on_localhost(served):
    run, _ = served
    container = containers.client().containers.get(serve.container_name(config(run, *SERVE)))
    assert container.exec_run("id -u").output.decode().strip() == str(containers.IMAGE_UID)
    bindings = container.attrs["HostConfig"]["PortBindings"]["11434/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(PORT)}]


def threads_created_since_boot() -> int:
    """The kernel's count of processes and threads created since boot (/proc/stat "processes")."""
    stat = Path("/proc/stat").read_text().splitlines()
    return int(next(line for line in stat if line.startswith("processes ")).split()[1])


def test_ollama_keeps_its_cpu_threads_from_one_decode_to_the_next(served):
    """docker/ollama/threadpool.patch: Ollama built here keeps one ggml thread pool for the model. With
    num_batch 1 a prompt is one decode per token, and without the pool each decode on 2 threads creates a
    worker thread and joins it (33-48 for this prompt, measured on the unpatched build)."""
    labels = containers.image_labels(layout.image_tag("serve"))
    if "threadpool.patch" not in labels.get(layout.OLLAMA_PATCHES_LABEL, ""):
        pytest.skip("the serve image is FROM an upstream Ollama image, not the one built here (Dockerfile.ollama)")
    client = ollama.Client(host=f"http://127.0.0.1:{PORT}")
    options = {"num_thread": 2, "num_batch": 1, "num_predict": 1, "temperature": 0}
    client.generate("sakura-support-tiny", "x", raw=True, options=options)  # the runner starts with these options
    for i in range(3):  # a new first token each time: Ollama's prompt cache would skip a shared prefix
        before = threads_created_since_boot()
        prompt = f"{i}" + "商品を返品したいです。" * 8
        done = client.generate("sakura-support-tiny", prompt, raw=True, options=options)
        created = threads_created_since_boot() - before
        assert done.prompt_eval_count >= 30 and created < done.prompt_eval_count / 4, \
            f"{created} threads created on this machine during {done.prompt_eval_count} decodes"


def test_modelfiles_are_written_with_the_models_list(served):
    run, _ = served
    out = run_dir(run) / "serve"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "Modelfile.baseline", "Modelfile.f16", "models"]
    assert "FROM ../convert/model-f16.gguf" in (out / "Modelfile.f16").read_text()
    assert (out / "models").read_text() == ("sakura-support-tiny Modelfile ../convert/model-Q8_0.gguf\n"
                                            "sakura-support-tiny-baseline Modelfile.baseline ../convert/base-Q8_0.gguf\n")
    assert [m.gguf for m in modelfiles.read_models(run_dir(run))] == ["../convert/model-Q8_0.gguf",
                                                                 "../convert/base-Q8_0.gguf"]
    assert "FROM ../convert/model-Q8_0.gguf" in (out / "Modelfile").read_text()
    assert Path(out / "../convert/base-Q8_0.gguf").resolve().is_file()


@pytest.fixture(scope="module")
def exported(served, tmp_path_factory):
    """`invoke export`'s archive unpacked at another path (readable by any uid, as a user's download is),
    and the served model's answer to the guide's question."""
    run, _ = served
    cfg = config(run, *SERVE)
    done = invoke("export", *sets(run, *SERVE))
    assert done.returncode == 0, output(done)
    archive = run_dir(run) / "export" / f"{cfg.serve.model_name}.tar"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with tarfile.open(archive) as tar:
        tar.extractall(elsewhere)  # our own archive (Debian 12's Python 3.11.2 has no filter=)
    bundle = elsewhere / cfg.serve.model_name
    for path in [elsewhere, bundle, *bundle.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return archive, bundle, ask(cfg.serve.model_name, QUESTION).message.content


QUESTION = [{"role": "user", "content": "商品を返品したいです"}]


def answer_on_a_fresh_ollama(image: str, bundle: Path, **run: object) -> str:
    """Run `image`'s Ollama with nothing created and its own empty store, the bundle mounted at /mnt; run
    `ollama create -f Modelfile` in the bundle's directory as its README says, and ask the guide's question."""
    container = containers.client().containers.run(
        image, ["serve"], entrypoint=["ollama"], detach=True, ports={"11434/tcp": ("127.0.0.1", None)},
        volumes={str(bundle.parent): {"bind": "/mnt", "mode": "ro"}}, **run)
    try:
        wait = "for i in $(seq 60); do ollama list >/dev/null 2>&1 && break; sleep 1; done"
        created = container.exec_run(["sh", "-c", f"{wait}; ollama create bundled -f Modelfile"],
                                     workdir=f"/mnt/{bundle.name}")
        assert created.exit_code == 0, created.output.decode(errors="replace")
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["11434/tcp"][0]["HostPort"]
        return ask("bundled", QUESTION, port).message.content
    finally:
        print(container.logs(tail=40).decode(errors="replace"))
        container.remove(force=True, v=True)


def test_the_exported_bundle_runs_on_a_fresh_ollama_and_answers_as_served(served, exported):
    """`invoke export`: the bundle's archive, unpacked at another path and given to a fresh Ollama (the serve
    image's Ollama), answers the guide's question as the served model does. The archive is the same bytes
    when exported again."""
    run, _ = served
    cfg = config(run, *SERVE)
    archive, bundle, expected = exported
    digest = (archive.parent / f"{archive.name}.sha256").read_text().split()[0]
    assert invoke("export", *sets(run, *SERVE)).returncode == 0
    assert (archive.parent / f"{archive.name}.sha256").read_text().split()[0] == digest == file_sha256(archive)
    evaluated = (run_dir(run) / "eval" / "results.json").is_file()  # test_eval's, where it ran first
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        ["Modelfile", "README.md", "manifest.json", f"{cfg.serve.model_name}-Q8_0.gguf"] + ["eval.json"] * evaluated)
    recorded = json.loads((bundle / "manifest.json").read_text())
    assert recorded["files"][f"{cfg.serve.model_name}-Q8_0.gguf"]["sha256"] == \
        file_sha256(run_dir(run) / "convert" / "model-Q8_0.gguf")
    fresh = answer_on_a_fresh_ollama("finetune-serve:latest", bundle)
    print(fresh)
    assert fresh == expected and "14日以内" in expected


NEWEST = layout.ollama_image(layout.OLLAMA_NEWEST)
NEWEST_OPT_IN = "INVOKE_TEST_OLLAMA_NEWEST"


def test_the_bundle_answers_the_same_on_the_newest_ollama(exported):
    """The same bundle on Ollama's llama-server generation (v0.34.3, Dockerfile.ollama-0.34): `ollama
    create` takes it (no ADAPTER; the template is the Modelfile's, the GGUF carries the same one as Jinja)
    and the guide's question gets the served (v0.24.0) model's answer, token for token. Run as a non-root
    user (the image keeps its store in /tmp). Opt-in where that image is not built: it takes about 30 minutes on 2 cores."""
    if not containers.image_exists(NEWEST) and os.environ.get(NEWEST_OPT_IN) != "1":
        pytest.skip(f"{NEWEST} is not built: `./invoke images.ollama --release {layout.OLLAMA_NEWEST}`, "
                    f"or set {NEWEST_OPT_IN}=1 to have this test build it")
    done = invoke("images.ollama", "--release", layout.OLLAMA_NEWEST)
    assert done.returncode == 0, output(done)
    _, bundle, expected = exported
    fresh = answer_on_a_fresh_ollama(NEWEST, bundle, user=containers.container_user())
    print(fresh)
    assert fresh == expected and "14日以内" in expected
