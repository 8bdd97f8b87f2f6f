"""`invoke eval`: the served models answer the same questions, and the answers are measured.

Runs on the host against the run's serve container, through Ollama's API: the prompt-engineering baseline
(`<name>-baseline`), the fine-tuned model as served, and the fine-tuned model at every other built quant
type (created on demand by the serve container from serve/Modelfile.<QUANT>). Decoding is greedy with a
fixed seed. Per model:
    chrf            character n-gram F-score (chrF2: n = 1..6, beta 2; sacrebleu) against the reference answers,
                    corpus level, 0-100; character n-grams suit Japanese, which has no spaces between words
    key_fact_rate   share of the listed key facts ("14日以内") that appear in the answers
    japanese_ratio  share of the answers' characters that are kana or kanji (the "stays English" failure)
    answer_chars    mean answer length in characters
    stop_rate       share of answers that ended by themselves rather than at max_new_tokens
    latency_s       median time per answer; tokens_per_s: generated tokens over generation time, from the
                    answers Ollama ended with its final message (None if none did; each model's entry counts
                    answers_without_final_message)
Writes artifacts/<run>/eval/results.json (every answer and number), report.md and report.html.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.core import data as datasets_
from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.core.stage import publishing

CHRF_ORDER = 6
CHRF_BETA = 2


class EvalError(RuntimeError):
    """A precondition that failed, or a gate that was not met; the message names what and the fix."""


@dataclass(frozen=True)
class Question:
    id: str
    messages: list[dict]  # up to the last user turn, without the system turn (the Modelfile's SYSTEM)
    reference: str
    key_facts: list[str]


def questions(config: RunConfig) -> list[Question]:
    """The eval split, or with eval.split=train the examples the run trained on (the first data.limit)."""
    if config.eval.split == "eval":
        if config.data.eval is None:
            raise EvalError("eval.split is 'eval' but data.eval is not set: add a held-out file, or "
                            "--set eval.split=train")
        examples = datasets_.read_split(config.data.eval).examples
    else:
        examples = datasets_.read_split(config.data.train).examples[: config.data.limit]
    found = []
    for e in examples:
        last = max(i for i, m in enumerate(e.messages) if m["role"] == "user")
        found.append(Question(e.id or e.where, [m for m in e.messages[: last + 1] if m["role"] != "system"],
                              e.messages[last + 1]["content"], list(e.key_facts)))
    return found


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF2 (character n-grams up to 6, beta 2, whitespace ignored), 0-100: sacrebleu's CHRF with its
    defaults, the implementation papers report."""
    from sacrebleu.metrics import CHRF

    return CHRF(char_order=CHRF_ORDER, word_order=0, beta=CHRF_BETA).corpus_score(list(hypotheses),
                                                                                 [list(references)]).score


def japanese_ratio(text: str) -> float:
    """Share of the non-space characters that are hiragana, katakana or CJK ideographs."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(_is_japanese(c) for c in chars) / len(chars)


def _is_japanese(c: str) -> bool:
    o = ord(c)
    return 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xFF66 <= o <= 0xFF9F


def metrics(asked: Sequence[Question], answers: Sequence[dict]) -> dict:
    """The numbers of one model over all questions; `answers` are ask() results in the same order."""
    texts = [a["answer"] for a in answers]
    facts = [(f, t) for q, t in zip(asked, texts) for f in q.key_facts]
    generated_s = sum(a["generation_s"] for a in answers)
    return {
        "chrf": round(chrf(texts, [q.reference for q in asked]), 2),
        "key_fact_rate": round(sum(f in t for f, t in facts) / len(facts), 4) if facts else None,
        "japanese_ratio": round(statistics.mean(japanese_ratio(t) for t in texts), 4),
        "answer_chars": round(statistics.mean(len(t) for t in texts), 1),
        "stop_rate": round(sum(a["done_reason"] == "stop" for a in answers) / len(answers), 4),
        "latency_s": round(statistics.median(a["seconds"] for a in answers), 3),
        "tokens_per_s": round(sum(a["tokens"] for a in answers) / generated_s, 1) if generated_s else None,
    }


def ask(client, model: str, question: Question, config: RunConfig) -> dict:
    """One greedy answer from `model` with its timing, as Ollama reports it. Where Ollama cuts an answer short
    (server.stream_chat: 0.24.0 without its final message, newer releases with an error), the answer is what
    it streamed until then, the time the client's, with no token count (`final` false)."""
    from finetune.serve import server

    started = time.monotonic()
    answer, r = server.stream_chat(client, model, question.messages, {
        "temperature": 0, "seed": config.train.seed, "num_predict": config.eval.max_new_tokens})
    if r is None:
        return {"answer": answer, "done_reason": None, "final": False,
                "seconds": round(time.monotonic() - started, 4), "tokens": 0, "generation_s": 0.0}
    return {"answer": answer, "done_reason": r.done_reason, "final": True,
            "seconds": (r.total_duration or 0) / 1e9 or round(time.monotonic() - started, 4),
            "tokens": r.eval_count or 0, "generation_s": (r.eval_duration or 0) / 1e9}


def gate_failures(config: RunConfig, tuned: dict, baseline: dict | None) -> list[str]:
    """One line per eval.gate threshold the fine-tuned (served) model misses."""
    gate, failures = config.eval.gate, []
    if gate.chrf_gain is not None:
        gain = tuned["chrf"] - (baseline["chrf"] if baseline else 0.0)
        if gain < gate.chrf_gain:
            failures.append(f"chrf gain over the baseline is {gain:.2f} < {gate.chrf_gain} (eval.gate.chrf_gain)")
    for key in ("key_fact_rate", "stop_rate"):
        wanted = getattr(gate, key)
        if wanted is not None and (tuned[key] is None or tuned[key] < wanted):
            failures.append(f"{key} is {tuned[key]} < {wanted} (eval.gate.{key})")
    return failures


def evaluate(config: RunConfig, run_dir: Path) -> dict:
    """Ask every model every question, measure, and write run_dir/eval/ (results.json, report.md/.html)."""
    import ollama

    from finetune.evaluation import report
    from finetune.serve import server
    from finetune.serve.modelfiles import ServeError, other_quants

    models = {layout.BASELINE_LABEL: layout.baseline_name(config.serve.model_name)} if config.serve.baseline else {}
    models[layout.tuned_label(config.serve.quant)] = config.serve.model_name
    for quant in other_quants(config):
        try:
            models[layout.tuned_label(quant)] = server.create_other_quant(config, quant).name
        except ServeError as e:
            raise EvalError(str(e)) from e
    asked = questions(config)
    client = ollama.Client(host=server.url(config))
    results = {"run": config.run, "split": config.eval.split, "questions": len(asked), "models": {}}
    for label, name in models.items():
        print(f"eval: {label} ({name}): {len(asked)} questions", flush=True)
        answers = [ask(client, name, q, config) for q in asked]
        results["models"][label] = {"model": name, "metrics": metrics(asked, answers), "answers": answers,
                                    "answers_without_final_message": sum(not a["final"] for a in answers)}
    results["question_ids"] = [q.id for q in asked]
    convert_report = layout.stage_dir(run_dir, "convert") / layout.CONVERT_REPORT
    results["quants"] = json.loads(convert_report.read_text())["files"] if convert_report.is_file() else []
    for row in results["quants"]:
        row.pop("greedy_answer", None)
    tuned = results["models"][layout.tuned_label(config.serve.quant)]["metrics"]
    baseline = results["models"].get(layout.BASELINE_LABEL, {}).get("metrics")
    results["gate"] = {"config": config.eval.gate.model_dump(), "failures": gate_failures(config, tuned, baseline)}
    with publishing(layout.partial_dir(run_dir, "eval"), layout.stage_dir(run_dir, "eval")) as work:
        (work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        losses = layout.stage_dir(run_dir, "train") / layout.METRICS
        curve = [json.loads(x) for x in losses.read_text().splitlines()] if losses.is_file() else []
        (work / "report.md").write_text(report.markdown(results, asked, config), encoding="utf-8")
        (work / "report.html").write_text(report.html(results, asked, config, curve), encoding="utf-8")
    return results
