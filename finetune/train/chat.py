"""The chat template of a run in training: which Jinja template, which family, the loss spans and token ids.

    fmt = resolve(setting, tokenizer, model_id)   # model.chat_template: auto | a family | a .jinja file
    for text, spans in training_texts(fmt, tokenizer, messages):
        ids, mask = templates.encode(tokenizer, text, spans, assistant_only=True)

`auto` keeps the base tokenizer's own template; a family name installs that family's reference template
(finetune/train/assets/templates, from llama.cpp's models/templates); a path installs that file. Whatever
the source, the family is then found by what the template renders (finetune/core/families.py): the one
whose Go template renders the probe conversations identically, or an error naming the families.

The loss spans come from the template itself: an assistant answer starts where the rendering of the
conversation before it, with the generation prompt, ends, and it ends after the family's end-of-turn token,
which the model must learn to produce. What lies between (Qwen 3's empty thinking block) is part of what the
model generates, so it is in the span too. Where each generation prompt is a prefix of the full rendering,
the conversation is one sequence with a span per answer. Where it is not (Gemma 4's generation prompt opens
an empty thought channel that a finished answer in the history no longer shows), each answer becomes a
sequence of its own: the generation prompt of the conversation before it, then the answer and the end of
its turn as the template renders them, so that every answer is trained after the very prompt that serving
gives the model, and none is dropped.

BOS: the ids are the tokenizer's (BOS added when it adds one) of the rendered text, with the template's own
BOS text, if any, in place of the added one rather than beside it (finetune/core/templates.py: encode).
Serving does the same: the Go template leaves the BOS text out and llama.cpp and Ollama add BOS when the
GGUF's add_bos_token says so; the convert stage checks that llama.cpp's ids equal these. A family whose
Ollama renderer writes the BOS text itself (Gemma 4: `bos_text`) keeps it in the served prompt, and its GGUF
says add_bos_token = false.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from finetune.core import families, layout
from finetune.core.families import FAMILIES, Family
from finetune.core.templates import CHATML_JINJA, render, served_prompt, without_bos

REFERENCE_TEMPLATES = Path(__file__).with_name("assets") / "templates"


class TemplateError(RuntimeError):
    """The model's chat template cannot be trained and served identically; the message says what to do."""


@dataclass(frozen=True)
class ChatFormat:
    """The resolved chat format of a run, written to train/chat.json for the convert and serve stages."""

    family: str
    source: str  # auto (the base tokenizer's), a family name (its reference template), or the .jinja path
    jinja: str = field(repr=False)
    sha256: str
    end_of_turn: str
    end_of_turn_id: int
    bos: bool  # the token ids start with BOS: the GGUF must say add_bos_token = this, unless bos_text
    bos_token: str | None
    template_vars: dict
    go_template: str = ""  # the Modelfile's TEMPLATE
    stop: list[str] = field(default_factory=list)
    # Probe conversations with a system turn (so that a Modelfile SYSTEM does not join them) and the prompt
    # the Jinja template renders for each, BOS text aside: `invoke serve` asks Ollama to render the same.
    probes: list[dict] = field(default_factory=list)
    bos_text: bool = False  # the served prompt carries the BOS text (families.Family.bos_text)

    def served(self, text: str) -> str:
        """A Jinja rendering as Ollama renders the same conversation: the BOS text left to the tokenizer,
        unless the family's renderer writes it."""
        return served_prompt(text, self.bos_token, self.bos_text)

    def write(self, out: Path) -> None:
        (out / layout.CHAT_FORMAT).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")


def choices() -> str:
    return f"auto (the base model's own template), {families.supported()}, or a path to a .jinja file"


def template_text(setting: str, tokenizer, model_id: str) -> str:
    """The Jinja text that `model.chat_template` names."""
    if setting == "auto":
        jinja = tokenizer.chat_template
        if isinstance(jinja, dict):  # named templates (tool_use, rag, ...): the default one is the chat template
            jinja = jinja.get("default")
        if not jinja:
            raise TemplateError(f"model.chat_template is auto, but the base model {model_id} has no chat template "
                                f"(none in its tokenizer_config.json or chat_template.jinja). Fix: set "
                                f"model.chat_template to one of {choices()}")
        return jinja
    if setting == "chatml":
        return CHATML_JINJA
    if setting in FAMILIES:
        return (REFERENCE_TEMPLATES / FAMILIES[setting].reference).read_text(encoding="utf-8")
    return Path(setting).read_text(encoding="utf-8")  # the config check made sure it is a .jinja file


def detect(tokenizer, jinja: str, candidates: list[Family]) -> Family:
    """The first candidate whose Go template renders every probe as `jinja` does; else a TemplateError that
    shows the first difference against each candidate."""
    differences = []
    for family in candidates:
        variants = [None] + ([True, False] if family.thinking else [])
        try:
            for think in variants:
                wanted = families.probe_renderings(family, think)
                extra = {} if think is None else {"enable_thinking": think}
                for (messages, gen), expected in zip(families.probe_conversations(), wanted):
                    got = without_bos(render(tokenizer, jinja, messages, gen, {**family.template_vars, **extra}),
                                      tokenizer.bos_token)
                    if got != expected:
                        raise _Differs(f"{family.name}: {_first_difference(got, expected)}")
        except _Differs as e:
            differences.append(str(e))
            continue
        except Exception as e:  # the template itself refused a probe (raise_exception, a missing variable)
            differences.append(f"{family.name}: the template fails on a probe conversation: {e}")
            continue
        return family
    raise TemplateError("the chat template renders like none of the families this project has an Ollama "
                        f"template for ({families.supported()}):\n    " + "\n    ".join(differences) + "\n"
                        "Fix: set model.chat_template to one of those families (the model is then trained on "
                        "that family's template); or pass an Ollama Go TEMPLATE of your own that renders what this "
                        "template renders, as model.go_template (a file) with model.end_of_turn (the token that "
                        "ends a turn), which `invoke serve` checks against the trained prompts; or add a Family to "
                        "finetune/core/families.py, proven by `invoke families`")


class _Differs(Exception):
    pass


def _first_difference(got: str, expected: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return (f"at character {at} the template renders {got[at:at + 40]!r}, "
            f"the family's Go template {expected[at:at + 40]!r}")


def resolve(setting: str, tokenizer, model_id: str, own: Family | None = None) -> ChatFormat:
    """The ChatFormat of `model.chat_template` = setting for this tokenizer; installs the template in it.
    `own`: a family of the user's own (model.go_template), taken as given; serve checks it."""
    jinja = template_text(setting, tokenizer, model_id)
    named = FAMILIES.get(setting)
    family = own or detect(tokenizer, jinja, [named] if named else list(FAMILIES.values()))
    end_id = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id or \
            tokenizer.encode(family.end_of_turn, add_special_tokens=False) != [end_id]:
        raise TemplateError(f"the {family.name} template ends turns with {family.end_of_turn}, which is not a "
                            f"single token of {model_id}'s tokenizer: trained that way, the model could not learn "
                            f"to stop. Fix: use the base model's own template (model.chat_template: auto)")
    tokenizer.chat_template = jinja
    first = tokenizer("x", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id is not None and first[:1] == [tokenizer.bos_token_id]
    if not bos and tokenizer.bos_token and render(tokenizer, jinja, families.PROBES[0], True,
                                                  family.template_vars).startswith(tokenizer.bos_token):
        bos = True  # the template writes BOS itself while the tokenizer adds none: it is still the first id
    fmt = ChatFormat(family=family.name, source=setting, jinja=jinja,
                     sha256=hashlib.sha256(jinja.encode()).hexdigest(), end_of_turn=family.end_of_turn,
                     end_of_turn_id=end_id, bos=bos, bos_token=tokenizer.bos_token,
                     template_vars=dict(family.template_vars), go_template=family.go_template,
                     stop=list(family.stop), bos_text=family.bos_text)
    probes = [{"messages": list(p), "go": fmt.served(render(tokenizer, jinja, p, True, family.template_vars))}
              for p in families.PROBES if p[0]["role"] == "system"]
    return replace(fmt, probes=probes)


def training_texts(fmt: ChatFormat, tokenizer, messages) -> list[tuple[str, list[tuple[int, int]]]]:
    """The texts a conversation trains on, each with the character spans where the loss applies: each
    assistant answer, from the end of the generation prompt before it through the end-of-turn token after it.
    One text when every generation prompt is a prefix of the full rendering; else one per answer (see the
    module docstring)."""
    full = render(tokenizer, fmt.jinja, messages, False, fmt.template_vars)
    heads = {i: render(tokenizer, fmt.jinja, messages[:i], True, fmt.template_vars)
             for i, m in enumerate(messages) if m["role"] == "assistant"}
    if all(full.startswith(head) for head in heads.values()):
        return [(full, [_answer_span(fmt, full, head, i, messages[i]) for i, head in heads.items()])]
    texts = []
    for i, head in heads.items():
        answered = full if i == len(messages) - 1 else render(tokenizer, fmt.jinja, messages[:i + 1], False,
                                                              fmt.template_vars)
        at = answered.rfind(messages[i]["content"].strip())
        if at < 0:
            raise TemplateError(f"the {fmt.family} template does not render answer {i} as it was given (it "
                                f"renders {answered[-80:]!r}), so its tokens cannot be found")
        text = head + answered[at:]
        texts.append((text, [_answer_span(fmt, text, head, i, messages[i])]))
    return texts


def _answer_span(fmt: ChatFormat, text: str, head: str, i: int, message: dict) -> tuple[int, int]:
    """The span of answer i in text, which continues head: from the end of head through the end of turn."""
    content = message["content"].strip()  # Llama 3's and Gemma 4's templates trim it
    at = text.find(content, len(head))
    end = at + len(content)
    end += len(text[end:]) - len(text[end:].lstrip())  # white space the template keeps after the answer
    if at < 0 or not text.startswith(fmt.end_of_turn, end):
        raise TemplateError(f"the {fmt.family} template does not render answer {i} followed by "
                            f"{fmt.end_of_turn}: {text[len(head):len(head) + 80]!r}")
    return len(head), end + len(fmt.end_of_turn)
