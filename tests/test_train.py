"""The train stage. Unit tests check the loss mask on the host; docker-marked tests run `invoke train` in the
real train image on CPU (the offline default), check that the merged model loads with transformers and beats
the base model on the eval split, that an interrupted run resumes from its checkpoint, and that a QLoRA
config fails early without CUDA."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from support import ROOT, in_train_image, invoke, sets

from finetune.core.templates import chatml_spans, render_chatml
from finetune.host import containers

CONVERSATION = [
    {"role": "system", "content": "丁寧に答えてください。"},
    {"role": "user", "content": "返品できますか？"},
    {"role": "assistant", "content": "14日以内であれば承ります。"},
    {"role": "user", "content": "送料は？"},
    {"role": "assistant", "content": "お客様負担です。"},
]


def test_loss_spans_cover_each_answer_and_its_end_marker():
    text, spans = chatml_spans(CONVERSATION)
    assert text == render_chatml(CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["14日以内であれば承ります。<|im_end|>", "お客様負担です。<|im_end|>"]


@pytest.mark.docker
@pytest.mark.slow
def test_assistant_masks_mark_exactly_each_answer_and_its_end_marker(trained_run):
    """tokenize() on the tiny model's real tokenizer (in the train image): the tokens under a mask of 1 decode
    to the assistant turns with their <|im_end|>, the rest (system, user, role headers) to none of them; with
    assistant_only_loss off every token counts."""
    code = (
        "import json; from transformers import AutoTokenizer; from finetune.core.data import Example; "
        "from finetune.train.sft import tokenize; from finetune.train import chat; "
        "t = AutoTokenizer.from_pretrained('/artifacts/train/merged'); f = chat.resolve('auto', t, 'merged'); "
        f"e = Example(messages={CONVERSATION!r}, where='x'); "
        "on, off = tokenize([e], t, f, True), tokenize([e], t, f, False); "
        "ids, mask = on['input_ids'][0], on['assistant_masks'][0]; "
        "runs, cur = [], []\n"
        "for i, m in zip(ids, mask):\n"
        "    if m: cur.append(i)\n"
        "    elif cur: runs.append(t.decode(cur)); cur = []\n"
        "runs += [t.decode(cur)] if cur else []; "
        "print(json.dumps({'runs': runs, 'unmasked': t.decode([i for i, m in zip(ids, mask) if not m]), "
        "'all_off': all(off['assistant_masks'][0]), 'same_ids': off['input_ids'] == on['input_ids']}, "
        "ensure_ascii=False))"
    )
    found = json.loads(in_train_image(code, trained_run))
    assert [r.strip() for r in found["runs"]] == ["14日以内であれば承ります。<|im_end|>", "お客様負担です。<|im_end|>"]
    assert "返品できますか" in found["unmasked"] and "14日以内" not in found["unmasked"]
    assert found["all_off"] and found["same_ids"]


def invoke_train(run: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return invoke("train", *sets(run, *overrides), env=env)


@pytest.fixture
def fresh_run(request):
    run = f"test-{request.node.name.replace('_', '-')[:40]}"
    subprocess.run(["rm", "-rf", str(ROOT / "artifacts" / run)], check=True)
    yield run
    subprocess.run(["rm", "-rf", str(ROOT / "artifacts" / run)], check=True)


@pytest.mark.docker
@pytest.mark.slow
def test_train_tiny_on_cpu_beats_the_base_model(fresh_run):
    done = invoke_train(fresh_run, "train.max_steps=60", "train.logging_steps=20", env={"HF_TOKEN": "hf_notareal1234"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "running finetune-train:latest on CPU (no NVIDIA runtime found)" in done.stdout
    assert "CPU kernels AVX2 (pinned: train.deterministic)" in done.stdout
    upstream = containers.dockerfile_default(ROOT / "Dockerfile.train", "BASE_IMAGE")
    if containers.cannot_pull(upstream) is not None:  # as on CI: README's command works without the prefix
        assert f"train: cannot pull {upstream} (" in done.stderr and "building FROM the local base" in done.stderr
    out = ROOT / "artifacts" / fresh_run / "train"
    for name in ("adapter/adapter_config.json", "merged/config.json", "merged/tokenizer.json",
                 "merged/tokenizer.model", "merged/chat_template.jinja", "metrics.jsonl", "loss.png", "inputs.json"):
        assert (out / name).is_file(), name
    assert not (out.parent / ".train.partial").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert summary["numerics"]["environment"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert summary["numerics"]["threads"] == 2 and summary["numerics"]["portable"]
    record = json.loads((out.parent / "manifest.json").read_text())["stages"]["train"]
    assert record["numerics"] == summary["numerics"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [20, 40, 60]
    assert all(m["peak_memory_mb"] > 0 for m in metrics) and metrics[-1]["tokens_per_s"] > 0
    # Independently of the trainer: load both models with transformers and score the eval split.
    losses = in_train_image(
        "from finetune.train.sft import eval_loss; "
        "print(eval_loss('/artifacts/train/base', 'data/customer_support_ja/eval.jsonl'), "
        "eval_loss('/artifacts/train/merged', 'data/customer_support_ja/eval.jsonl'))", fresh_run)
    base_loss, tuned_loss = map(float, losses.split())
    assert tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)
    # The token passed at run time is in no log line and no artifact.
    assert "hf_notareal1234" not in done.stdout + done.stderr
    assert not subprocess.run(["grep", "-r", "-l", "hf_notareal1234", str(out)], capture_output=True).stdout


@pytest.mark.docker
@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(fresh_run, tmp_path):
    overrides = ("train.max_steps=400", "train.save_steps=50", "train.logging_steps=25")
    checkpoints = ROOT / "artifacts" / fresh_run / ".train.partial" / "checkpoints"
    log = tmp_path / "first.log"
    with log.open("w") as sink:  # a file, not a pipe: nobody reads while we wait, and a full pipe would block
        first = subprocess.Popen([str(ROOT / "invoke"), "train", "--set", f"run={fresh_run}",
                                  *(x for o in overrides for x in ("--set", o))], cwd=ROOT,
                                 stdout=sink, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            assert time.monotonic() < deadline and first.poll() is None, "no checkpoint: " + log.read_text()[-2000:]
            time.sleep(0.2)
        containers.client().containers.get(f"finetune-train-{fresh_run}").kill()
        first.wait(timeout=60)
    output = log.read_text()
    assert first.returncode != 0 and "rerun `invoke train` to resume from the last checkpoint" in output
    assert not (ROOT / "artifacts" / fresh_run / "train").exists(), "a killed run must not look finished"
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))

    # serve.temperature is not a key the train stage reads (finetune/train/__init__.py): it must not restart training
    second = invoke_train(fresh_run, *overrides, "serve.temperature=0.1")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"train: resuming from checkpoint-{saved}" in second.stdout
    out = ROOT / "artifacts" / fresh_run / "train"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == f"checkpoint-{saved}" and summary["steps"] == 400
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(25, 401, 25)), steps  # continues after the checkpoint, no step logged twice


@pytest.mark.docker
def test_qlora_without_cuda_fails_early_and_writes_nothing(fresh_run):
    done = invoke_train(fresh_run, "train.method=qlora")
    assert done.returncode == 2
    assert "train.method is qlora, which needs a CUDA GPU (bitsandbytes 4-bit), and none is visible" in done.stdout
    assert not list((ROOT / "artifacts" / fresh_run).glob("*"))


@pytest.mark.docker
def test_train_image_is_non_root_and_holds_no_secret():
    image = containers.client().images.get("finetune-train:latest")
    assert image.attrs["Config"]["User"] == "10001:10001"
    env = "\n".join(image.attrs["Config"]["Env"])
    assert "PIP_CERT" not in env and "HF_TOKEN" not in env
    out = containers.client().containers.run(image, ["-c", "test ! -e /run/secrets/ca_bundle && echo clean"],
                                             entrypoint="sh", remove=True)
    assert out.decode().strip() == "clean"
