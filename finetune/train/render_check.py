"""What training feeds, for the family matrix to compare with llama.cpp and Ollama (`invoke families`).

    python -m finetune.train.render_check REQUESTS.json OUT.json      (in the train image)

REQUESTS is a list of {"model": a trained model directory, "chat": its chat.json, "messages": [...],
"think": null|true|false}. For each, OUT gets the trained template's rendering with the generation prompt
(Jinja, as transformers' apply_chat_template renders it), the same text as Ollama's Go template must render
it (BOS text removed where serving adds BOS as a token), and the token ids training would feed (BOS included).
With "answer": the conversation plus that answer is also tokenized with its loss mask as training does,
and the masked tokens decoded run by run: exactly what the model learns to produce. A request with
"template" instead of "model" is a template of a family whose vocabulary the source lacks (template_check).
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

from finetune.core.families import FAMILIES
from finetune.core.templates import encode, render, served_prompt
from finetune.train import chat


@cache
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def check(request: dict) -> dict:
    tokenizer = _tokenizer(request["model"])
    fmt = json.loads(Path(request["chat"]).read_text(encoding="utf-8"))
    resolved = chat.ChatFormat(**fmt)
    extra = {} if request.get("think") is None else {"enable_thinking": request["think"]}
    text = render(tokenizer, fmt["jinja"], request["messages"], True, {**fmt["template_vars"], **extra})
    result = {"jinja": text, "go": resolved.served(text), "ids": encode(tokenizer, text)[0]}
    if "answer" in request:
        answered = [*request["messages"], {"role": "assistant", "content": request["answer"]}]
        runs = []
        for text, spans in chat.training_texts(resolved, tokenizer, answered):
            ids, mask = encode(tokenizer, text, spans, assistant_only=True)
            current = []
            for token, m in zip([*ids, None], [*mask, 0]):
                if m:
                    current.append(token)
                elif current:
                    runs.append(tokenizer.decode(current))
                    current = []
        result["trained"] = runs
    return result


def template_check(request: dict) -> dict:
    """A template without a model (finetune/core/families.py PROMPT_CASES): {"template": a .jinja file,
    "special": [[name, text], ...], "conversations": [...]} gives the family the template renders like (or
    the TemplateError's message) and its rendering of each conversation with the generation prompt."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    special = dict(request["special"])
    vocab = {t: i for i, t in enumerate(["<unk>", *special.values()])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        unk_token="<unk>", **special)
    jinja = Path(request["template"]).read_text(encoding="utf-8")
    try:
        family = chat.detect(tokenizer, jinja, list(FAMILIES.values()))
    except chat.TemplateError as e:
        return {"family": None, "error": str(e), "go": []}
    return {"family": family.name, "go": [served_prompt(render(tokenizer, jinja, m, True, family.template_vars),
                                                        tokenizer.bos_token, family.bos_text)
                                          for m in request["conversations"]]}


def main(argv: list[str] | None = None) -> int:
    requests, out = (argv or sys.argv[1:])[:2]
    results = [check(r) if "model" in r else template_check(r)
               for r in json.loads(Path(requests).read_text(encoding="utf-8"))]
    Path(out).write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
