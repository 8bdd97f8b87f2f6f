"""The family matrix (`invoke families`): each chat-template family trained, converted and served for real,
and what reaches the model compared with what training fed it.

For each case of finetune/core/families.py CASES, in artifacts/families/<case>/:
1. `base/`: a tiny random model of the family's architecture with its real vocabulary and chat template,
   from the pinned llama.cpp source in the convert image (finetune/train/vocab_models.py; the build checks
   llama.cpp's own tokenizer test cases);
2. `config.yaml`: a run on it (model.chat_template auto, 2 LoRA steps), which `invoke
   families` trains and converts like any run (the convert stage's checks included);
3. then one Ollama (the serve image, OLLAMA_DEBUG=2) serves every case, plainly and with a SYSTEM plus
   few-shot MESSAGE turns, and answers each probe conversation (Qwen 3: thinking unset, off and on) with one
   token. Compared per conversation:
   - the prompt Ollama rendered (its log) with the trained Jinja template's rendering (apply_chat_template),
     byte for byte, BOS text aside (BOS is a token in both), unless the family's Ollama renderer writes it;
   - the token ids: training's (finetune/core/templates.py encode), llama.cpp's of Ollama's prompt (the
     pinned llama.cpp, as llama-server and Ollama's llama.cpp runner tokenize), and Ollama's own: the ids
     its Go engine logs, or, where Ollama runs the model with its llama.cpp runner (which logs no ids), the
     prompt_eval_count it reports;
   - what the loss trains, decoded: each answer of a multi-turn conversation plus the end-of-turn token.
4. the families whose vocabulary the source lacks (PROMPT_CASES: Mistral Nemo's tekken) are compared on their
   prompts alone: the real template must render like the family, and Ollama, serving the family's Modelfile
   on a stand-in case's GGUF, every probe as the template does (compare_prompts).
The table goes to artifacts/families/families.md and .json; any difference is a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from finetune.core import families, layout
from finetune.core.config import FewShot, load_config
from finetune.core.families import CASES, FAMILIES, PROMPT_CASES, Case, PromptCase
from finetune.host import containers
from finetune.serve import modelfile, server

ROOT = Path("artifacts") / "families"
MODELS_DIR = layout.LLAMA_CPP_MODELS_DIR
SYSTEM = "あなたは「さくらマート」のカスタマーサポート担当です。"
SHOTS = [FewShot(user="送料はいくらですか？", assistant="全国一律500円です。")]
ANSWERED = [{"role": "user", "content": "商品を返品したいです"},
            {"role": "assistant", "content": "返品承知いたしました。14日以内であれば承ります。"},
            {"role": "user", "content": "着払いでもいいですか？"}]
ANSWER = "はい、着払いで承ります。"
# Real templates of families this project has no Go template for (README: "Not in the matrix, and why"):
# copied out with the others, so that a test can show each is refused before training.
UNSUPPORTED_TEMPLATES = ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "google-gemma-2-2b-it.jinja",
                         "Mistral-Small-3.2-24B-Instruct-2506.jinja")


class FamilyError(RuntimeError):
    """A step of the matrix that could not run; the message says which and why."""


@dataclass
class Row:
    case: str
    family: str
    vocab: str
    runner: str = ""
    test_cases: int = 0
    trained: str = ""  # "ok" or what the loss trains instead
    trained_runs: list[str] = field(default_factory=list)  # the masked tokens of ANSWERED + ANSWER, decoded
    convert: str = ""
    prompts: list[int] = field(default_factory=lambda: [0, 0])  # identical, compared
    ids: list[int] = field(default_factory=lambda: [0, 0])
    problems: list[str] = field(default_factory=list)
    prompt_only: bool = False  # a PromptCase: no vocabulary, so no training, conversion or ids

    @property
    def ok(self) -> bool:
        return not self.problems and self.prompts[0] == self.prompts[1] > 0 and (
            self.prompt_only or self.ids[0] == self.ids[1] > 0)


def case_dir(case: Case) -> Path:
    return ROOT / case.name


def export_sources(image: str) -> Path:
    """Copy the cases' vocabularies (with their test cases) and templates out of the convert image."""
    source = ROOT / "source"
    names = sorted({f"ggml-vocab-{c.vocab}.gguf{x}" for c in CASES for x in ("", ".inp", ".out")}
                   | {f"templates/{t}" for t in (*(c.template for c in (*CASES, *PROMPT_CASES)),
                                                 *UNSUPPORTED_TEMPLATES)})
    code = containers.run(image, [f"cp {' '.join(f'{MODELS_DIR}/{n}' for n in names)} /out/"],
                          [containers.Mount(source, "/out", read_only=False)], entrypoint=["sh", "-c"])
    if code != 0:
        raise FamilyError(f"copying the vocabularies and templates out of {image} failed (exit {code})")
    return source


def build_base(case: Case, image: str, source: Path) -> dict:
    """finetune/train/vocab_models.py in the train image: artifacts/families/<case>/base/."""
    out = case_dir(case)
    code = containers.run(image, ["-m", "finetune.train.vocab_models", "--case", case.name, "--source", "/src",
                                  "--out", "/out/base"],
                          [containers.Mount(source, "/src"), containers.Mount(out, "/out", read_only=False)],
                          entrypoint=["python"])
    if code != 0:
        raise FamilyError(f"{case.name}: building the tiny model failed (exit {code})")
    return json.loads((out / "base" / "vocab_model.json").read_text(encoding="utf-8"))


def write_config(case: Case) -> Path:
    """The run config of a case: its tiny model, 2 LoRA steps (on the first 50 conversations, the fewest the
    data check accepts), Q8_0, no baseline."""
    path = case_dir(case) / "config.yaml"
    path.write_text(yaml.safe_dump({
        "run": run_name(case),
        "model": {"id": str(case_dir(case) / "base"), "chat_template": "auto"},
        "data": {"train": "data/customer_support_ja/train.jsonl", "format": "messages", "max_seq_len": 512,
                 "limit": 50},
        "train": {"max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "precision": "fp32",
                  "target_modules": list(case.target_modules), "rank": 4, "alpha": 8, "dropout": 0.0},
        "convert": {"outtype": "f16", "quant_types": ["Q8_0"], "require_stop": False},
        "serve": {"model_name": run_name(case), "quant": "Q8_0", "baseline": False, "temperature": 0.0},
    }, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def requests(case: Case) -> list[dict]:
    """(model, messages, think) for every comparison of a case: the probes on the plain model, the first
    probe on the model with SYSTEM and few-shot turns (the full conversation Ollama then renders)."""
    thinks = [None, False, True] if FAMILIES[case.family].thinking else [None]
    found = [{"model": f"{case.name}-plain", "messages": list(p), "think": t} for p in families.PROBES for t in thinks]
    prefix = [{"role": "system", "content": SYSTEM}] + [
        {"role": r, "content": getattr(s, r)} for s in SHOTS for r in ("user", "assistant")]
    found += [{"model": f"{case.name}-shots", "messages": [families.PROBES[0][0]], "expected": prefix
               + [families.PROBES[0][0]], "think": t} for t in thinks]
    return found


def serve_all(cases: list[Case], image: str, work: Path) -> tuple[list[dict], str]:
    """One Ollama serving every case (plain and with SYSTEM + few-shot), asked every request with one
    token; (the responses, the container's log)."""
    work.mkdir(parents=True, exist_ok=True)
    lines = []
    for case in cases:
        cfg = load_config(case_dir(case) / "config.yaml")
        shutil.copy(layout.stage_dir(run_dir(case), "convert") / layout.model_gguf("Q8_0"), work / f"{case.name}.gguf")
        family = FAMILIES[case.family]
        shots = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"system_prompt": SYSTEM,
                                                                              "few_shot": SHOTS})})
        for name, config, turns in ((f"{case.name}-plain", cfg, []),
                                    (f"{case.name}-shots", shots, modelfile.few_shot_turns(shots))):
            (work / f"{name}.Modelfile").write_text(modelfile.render(f"./{case.name}.gguf", config, family, turns),
                                                    encoding="utf-8")
            lines.append(f"{name} {name}.Modelfile {case.name}.gguf\n")
    (work / "models").write_text("".join(lines), encoding="utf-8")
    container, port = start_ollama(image, work)
    try:
        responses = [ask(port, r) for case in cases for r in requests(case)]
        log = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    return responses, log


def start_ollama(image: str, work: Path):
    """The serve image serving the models that work/models lists (with their Modelfiles and GGUFs in work),
    at trace level; (the healthy container, its port on 127.0.0.1)."""
    for path in [work, *work.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    container = containers.client().containers.run(
        image, detach=True, ports={"11434/tcp": ("127.0.0.1", None)},
        environment={"MODELS_FILE": "/t/models", "OLLAMA_DEBUG": "2"},
        volumes={str(work.resolve()): {"bind": "/t", "mode": "ro"}})
    try:
        wait_healthy(container)
    except FamilyError:
        container.remove(force=True)
        raise
    return container, container.attrs["NetworkSettings"]["Ports"]["11434/tcp"][0]["HostPort"]


def compare_prompts(cases: list[PromptCase], train_image: str, serve_image: str, rows: dict[str, Row]) -> None:
    """The families without a vocabulary in the source (PROMPT_CASES): the real template must render like
    the family (the train stage's detection), and Ollama, serving the family's Modelfile on a stand-in GGUF,
    must render every probe as the template does (asked with `_debug_render_only`)."""
    work = ROOT / "compare-prompts"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ollama").mkdir(parents=True)
    conversations = [list(p) for p in families.PROBES]
    expected = in_image(train_image, "finetune.train.render_check",
                        [{"template": f"/src/{c.template}", "special": c.special, "conversations": conversations}
                         for c in cases], [containers.Mount(ROOT / "source", "/src")], work)
    lines = []
    for case in cases:
        stand_in = next(c for c in CASES if c.name == case.stand_in)
        shutil.copy(layout.stage_dir(run_dir(stand_in), "convert") / layout.model_gguf("Q8_0"),
                    work / "ollama" / f"{case.name}.gguf")
        text = modelfile.render(f"./{case.name}.gguf", load_config(case_dir(stand_in) / "config.yaml"),
                                FAMILIES[case.family])
        (work / "ollama" / f"{case.name}.Modelfile").write_text(text, encoding="utf-8")
        lines.append(f"{case.name} {case.name}.Modelfile {case.name}.gguf\n")
    (work / "ollama" / "models").write_text("".join(lines), encoding="utf-8")
    container, port = start_ollama(serve_image, work / "ollama")
    try:
        for case, want in zip(cases, expected):
            row = rows[case.name]
            if want["family"] != case.family:
                row.problems.append(f"{case.template} renders like {want['family']}, not {case.family}: "
                                    f"{want.get('error', '')}")
            for messages, go in zip(conversations, want["go"]):
                rendered = server.render_only(f"http://127.0.0.1:{port}", case.name, messages)
                row.prompts[1] += 1
                if rendered == go:
                    row.prompts[0] += 1
                else:
                    row.problems.append(f"{len(messages)} messages: Ollama rendered {rendered!r}, the template {go!r}")
    finally:
        container.remove(force=True)


def ask(port: str, request: dict) -> dict:
    body = {"model": request["model"], "messages": request["messages"], "stream": False,
            "options": {"num_predict": 1, "temperature": 0}}
    if request["think"] is not None:
        body["think"] = request["think"]
    http = urllib.request.Request(f"http://127.0.0.1:{port}/api/chat", data=json.dumps(body).encode())
    with urllib.request.urlopen(http, timeout=300) as response:
        return json.loads(response.read())


def wait_healthy(container, within_s: float = 300) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        container.reload()
        if container.attrs["State"].get("Health", {}).get("Status") == "healthy":
            return
        if container.status != "running":
            break
        time.sleep(1)
    raise FamilyError(f"Ollama did not become healthy:\n{container.logs().decode(errors='replace')[-3000:]}")


def go_unquote(quoted: str) -> str:
    """A Go strconv.Quote'd string (how Ollama's log writes values) back to the text."""
    escapes = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}

    def one(m: re.Match) -> str:
        code = m.group(1)
        return chr(int(code[1:], 16)) if code[0] in "xuU" else escapes[code]

    return re.sub(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", one, quoted[1:-1])


QUOTED = r'("(?:[^"\\]|\\.)*")'


def logged_requests(log: str) -> list[tuple[str, list[int] | None]]:
    """(prompt, ids) per completion request, in order: the prompt Ollama rendered (logged at trace level) and
    the ids its Go engine's runner logged tokenizing it, BOS included: the first `encoded` line of that text
    after the request (the server's own count of the next prompt, without BOS, comes later). None where
    the model runs in Ollama's llama.cpp runner, which logs no ids."""
    marks = list(re.finditer(r'msg="completion request" prompt=' + QUOTED, log))
    found = []
    for i, mark in enumerate(marks):
        prompt = go_unquote(mark.group(1))
        segment = log[mark.end():marks[i + 1].start() if i + 1 < len(marks) else len(log)]
        encoded = re.findall(r"msg=encoded string=" + QUOTED + r' ids="?\[([0-9 ]*)\]', segment)
        ids = [[int(x) for x in numbers.split()] for text, numbers in encoded if go_unquote(text) == prompt]
        found.append((prompt, ids[0] if ids else None))
    return found


def in_image(image: str, module: str, payload: list[dict], mounts: list[containers.Mount], work: Path) -> list:
    """Run `python -m module IN OUT` in an image on a JSON payload; its JSON result."""
    (work / "in.json").write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    (work / "in.json").chmod(0o644)
    code = containers.run(image, ["-m", module, "/io/in.json", "/io/out.json"],
                          [*mounts, containers.Mount(work, "/io", read_only=False)], entrypoint=["python"])
    if code != 0:
        raise FamilyError(f"{module} failed in {image} (exit {code})")
    return json.loads((work / "out.json").read_text(encoding="utf-8"))


def run_name(case: Case) -> str:
    """The run (and the Ollama model name) of a case: family-<case>."""
    return f"family-{case.name}"


def run_dir(case: Case) -> Path:
    return layout.run_dir(run_name(case))


def expected_answers(family: families.Family, messages: list[dict], answer: str) -> list[str]:
    """What each answer's loss must cover, from the family's Go-template twin: the text between the
    generation prompt before the answer and the end of its turn, in the full conversation (or, where the
    generation prompt is no prefix of it, after that prompt: the answer and its end of turn)."""
    full_messages = [*messages, {"role": "assistant", "content": answer}]
    full = family.render(full_messages, False, None)
    found = []
    for i, m in enumerate(full_messages):
        if m["role"] == "assistant":
            head = family.render(full_messages[:i], True, None)
            text = full if full.startswith(head) else head + m["content"] + family.end_of_turn
            found.append(text[len(head):text.index(family.end_of_turn, len(head)) + len(family.end_of_turn)])
    return found


def compare(cases: list[Case], train_image: str, convert_image: str, serve_image: str, rows: dict[str, Row]) -> None:
    """Serve every case and compare prompts, ids and what the loss trains (the module docstring, step 3)."""
    work = ROOT / "compare"
    shutil.rmtree(work, ignore_errors=True)
    responses, log = serve_all(cases, serve_image, work / "ollama")
    (ROOT / "ollama.log").write_text(log, encoding="utf-8")
    logged = logged_requests(log)
    prompts = [p for p, _ in logged]
    asked = [(case, r) for case in cases for r in requests(case)]
    trained = {case.name: {"model": f"/work/{run_dir(case)}/train/{layout.MERGED}",
                           "chat": f"/work/{run_dir(case)}/train/{layout.CHAT_FORMAT}"} for case in cases}
    checks = [{**trained[case.name], "messages": r.get("expected", r["messages"]), "think": r["think"]}
              for case, r in asked]
    checks += [{**trained[case.name], "messages": ANSWERED, "think": None, "answer": ANSWER} for case in cases]
    mounts = [containers.Mount(run_dir(case), f"/work/{run_dir(case)}") for case in cases]
    expected = in_image(train_image, "finetune.train.render_check", checks, mounts, work)
    texts = [{"gguf": f"/io/ollama/{case.name}.gguf", "text": prompts[i] if i < len(prompts) else "",
              "add_bos": not FAMILIES[case.family].bos_text} for i, (case, _) in enumerate(asked)]
    llama_ids = in_image(convert_image, "finetune.convert.tokens", texts, [], work)
    for i, (case, request) in enumerate(asked):
        row, want = rows[case.name], expected[i]
        label = f"{request['model']} {len(request['messages'])} messages, think={request['think']}"
        got = prompts[i] if i < len(prompts) else None
        row.prompts[1] += 1
        if got == want["go"]:
            row.prompts[0] += 1
        else:
            row.problems.append(f"{label}: Ollama rendered {got!r}, the template {want['go']!r}")
        row.ids[1] += 1
        count = responses[i].get("prompt_eval_count")
        ours = logged[i][1] if i < len(logged) else None
        row.runner = "Go engine" if ours is not None else "llama.cpp"
        same = llama_ids[i] == want["ids"] and (ours == want["ids"] if ours is not None else count == len(want["ids"]))
        if same:
            row.ids[0] += 1
        else:
            row.problems.append(f"{label}: ids trained {want['ids'][:12]}..., llama.cpp {llama_ids[i][:12]}..., "
                                f"Ollama {(ours or [])[:12]}... ({count} prompt tokens)")
    for j, case in enumerate(cases):
        trained = expected[len(asked) + j]["trained"]
        wanted = expected_answers(FAMILIES[case.family], ANSWERED, ANSWER)
        rows[case.name].trained_runs = trained
        rows[case.name].trained = "ok" if trained == wanted else f"{trained!r}, expected {wanted!r}"
        if trained != wanted:
            rows[case.name].problems.append(f"the loss trains {trained!r}, expected {wanted!r}")


def table(rows: list[Row]) -> str:
    """The README's table of the matrix."""
    lines = ["| case | family | vocabulary (llama.cpp test cases) | Ollama runner | train (loss on answer + "
             "end of turn) | convert checks | Ollama prompt = Jinja | ids: train = llama.cpp = Ollama |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.prompt_only:
            lines.append(f"| {r.case} | {r.family} | {r.vocab} | {r.runner} | n/a | n/a | "
                         f"{r.prompts[0]}/{r.prompts[1]} | n/a |")
            continue
        lines.append(f"| {r.case} | {r.family} | {r.vocab} ({r.test_cases}/{r.test_cases}) | {r.runner} | "
                     f"{'ok' if r.trained == 'ok' else 'DIFFERS'} | {r.convert} | {r.prompts[0]}/{r.prompts[1]} | "
                     f"{r.ids[0]}/{r.ids[1]} |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[Row]) -> Path:
    (ROOT / "families.json").write_text(json.dumps([asdict(r) for r in rows], indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    (ROOT / "families.md").write_text(table(rows), encoding="utf-8")
    return ROOT / "families.md"
