"""Chat datasets: read JSONL, normalize every line to `messages`, report every bad line, print stats.

    python -m finetune.core.data --config configs/tiny-ja.yaml [--tokenizer PATH/tokenizer.json]

Accepted line formats (data.format, or `auto` to detect each line from its keys):
- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                     `content` may also be OpenAI content parts, [{"type": "text", "text": "..."}, ...]:
                     the text parts are joined with a line break (as vLLM does); other part types are errors
- sharegpt:          {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
- alpaca:            {"instruction": "...", "input": "...", "output": "...", "system": "..."}
- prompt_completion: {"prompt": "...", "completion": "..."}
Any line may also carry "id" (a string) and "key_facts" (strings that must appear in the last answer;
`invoke eval` scores them). A UTF-8 byte order mark at the start of the file (Windows editors, spreadsheet
exports) is ignored. Bad lines are reported as `file:line: what is wrong`; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core.templates import render_chatml

MIN_EXAMPLES = 50  # the guide: 50-100 examples at minimum
RECOMMENDED_EXAMPLES = 500  # the guide: 500-1000 recommended, quality over quantity

FORMAT_KEYS = {
    "messages": ({"messages"}, set()),
    "sharegpt": ({"conversations"}, set()),
    "alpaca": ({"instruction", "output"}, {"input", "system"}),
    "prompt_completion": ({"prompt", "completion"}, set()),
}
META_KEYS = {"id", "key_facts"}
ROLES = ("system", "user", "assistant")
# ShareGPT speakers and the roles they become; "user"/"assistant" appear in many ShareGPT exports too.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

TokenCounter = Callable[[Sequence[dict]], int]


@dataclass(frozen=True)
class Example:
    """One conversation, normalized to messages, with the file:line it came from."""

    messages: tuple[dict, ...]
    where: str
    key_facts: tuple[str, ...] = ()
    id: str | None = None

    @property
    def question(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")


@dataclass
class Split:
    """What reading one file produced: the good examples and a message for every bad line."""

    path: str
    examples: list[Example] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_split(path: str | Path, fmt: str = "auto", max_seq_len: int | None = None,
               count_tokens: TokenCounter | None = None) -> Split:
    """Read a JSONL file; every line that cannot be trained on becomes a `file:line: ...` problem.

    Lengths are checked against `max_seq_len` only when `count_tokens` is given, since only a tokenizer
    can tell how long a conversation is in tokens.
    """
    split = Split(str(path))
    seen: dict[str, int] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading BOM is dropped
    except (OSError, UnicodeDecodeError) as e:
        split.problems.append(f"{path}: cannot read it as UTF-8 text ({e})")
        return split
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            example = parse_line(line, where, fmt)
        except ValueError as e:
            split.problems.append(f"{where}: {e}")
            continue
        key = json.dumps(example.messages, ensure_ascii=False, sort_keys=True)
        if key in seen:
            split.problems.append(f"{where}: duplicate of line {seen[key]}; remove one of them")
            continue
        seen[key] = number
        if max_seq_len is not None and count_tokens is not None:
            n = count_tokens(example.messages)
            if n > max_seq_len:
                split.problems.append(f"{where}: {n} tokens, longer than data.max_seq_len={max_seq_len}; "
                                      "shorten the conversation or raise data.max_seq_len")
                continue
        split.examples.append(example)
    return split


def parse_line(line: str, where: str, fmt: str = "auto") -> Example:
    """Parse one JSONL line into an Example, or raise ValueError saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from e
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    fmt = _detect_format(obj) if fmt == "auto" else fmt
    required, optional = FORMAT_KEYS[fmt]
    if missing := sorted(required - obj.keys()):
        raise ValueError(f"missing {', '.join(map(repr, missing))} for the {fmt} format "
                         f"(keys here: {', '.join(sorted(obj)) or 'none'})")
    if unknown := sorted(obj.keys() - required - optional - META_KEYS):
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(sorted(required | optional | META_KEYS))}")
    messages = _to_messages(obj, fmt)
    _check_messages(messages)
    key_facts = obj.get("key_facts", [])
    if not (isinstance(key_facts, list) and all(isinstance(f, str) and f for f in key_facts)):
        raise ValueError("key_facts must be a list of non-empty strings")
    answer = messages[-1]["content"]
    for fact in key_facts:
        if fact not in answer:
            raise ValueError(f"key fact {fact!r} does not appear in the last assistant message")
    if "id" in obj and not isinstance(obj["id"], str):
        raise ValueError("id must be a string")
    return Example(tuple(messages), where, tuple(key_facts), obj.get("id"))


def _detect_format(obj: dict) -> str:
    for fmt, (required, _) in FORMAT_KEYS.items():
        if required <= obj.keys():
            return fmt
    raise ValueError(f"cannot tell the format from the keys ({', '.join(sorted(obj)) or 'none'}); use 'messages', "
                     "'conversations' (ShareGPT), 'instruction'+'output' (alpaca) or 'prompt'+'completion'")


def _to_messages(obj: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages, start=1):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise ValueError(f"message {i} must be an object with exactly 'role' and 'content'")
        return [{"role": m["role"], "content": _text(m["content"], i)} for i, m in enumerate(messages, start=1)]
    if fmt == "sharegpt":
        turns = obj["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversations' must be a non-empty list of {from, value} objects")
        messages = []
        for i, m in enumerate(turns, start=1):
            if not isinstance(m, dict) or set(m) != {"from", "value"}:
                raise ValueError(f"message {i} must be an object with exactly 'from' and 'value' (ShareGPT)")
            if m["from"] not in SHAREGPT_ROLES:
                raise ValueError(f"message {i}: unknown ShareGPT speaker {m['from']!r}; use system, human or gpt "
                                 "(tool and function turns cannot be trained on here: remove those lines)")
            messages.append({"role": SHAREGPT_ROLES[m["from"]], "content": _text(m["value"], i)})
        return messages
    if fmt == "alpaca":
        text = obj["instruction"] if not obj.get("input") else f"{obj['instruction']}\n\n{obj['input']}"
        system = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        return [*system, {"role": "user", "content": text}, {"role": "assistant", "content": obj["output"]}]
    return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]


def _text(content, i: int) -> str:
    """A message's text: a string as it is, OpenAI content parts joined with line breaks (vLLM's rule)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message {i}: content must be a string or a list of text parts, "
                         f"got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content, start=1):
        if not isinstance(part, dict):
            raise ValueError(f"message {i}: content part {j} is a {type(part).__name__}, not an object "
                             "{\"type\": \"text\", \"text\": \"...\"}")
        if part.get("type") != "text":
            raise ValueError(f"message {i}: content part {j} has type {part.get('type')!r}; only text parts can be "
                             "trained on (a text-only model): remove that part, or the line")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i}: content part {j} is a text part without a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages, start=1):
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; use system, user or assistant")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string or a list of text parts, "
                             f"got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}): empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: there is nothing to learn from this line")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            number = i + 1 + (len(messages) - len(turns))
            raise ValueError(f"roles out of order: message {number} is {m['role']}, expected {expected} "
                             "(an optional system turn first, then user and assistant alternating)")
    if turns[-1]["role"] != "assistant":
        raise ValueError("the last message is a user turn; end each conversation with the assistant's answer")


def check(train_path: str | Path, eval_path: str | Path | None, fmt: str = "auto", max_seq_len: int | None = None,
          count_tokens: TokenCounter | None = None, limit: int | None = None) -> tuple[list[Split], list[str], list[str]]:
    """Read both splits; return them with every problem and every warning across them. `limit` keeps only the
    first examples of the training split (data.limit)."""
    splits = [read_split(p, fmt, max_seq_len, count_tokens) for p in (train_path, eval_path) if p is not None]
    problems = [p for s in splits for p in s.problems]
    warnings = []
    if limit is not None and len(splits[0].examples) > limit:
        warnings.append(f"{splits[0].path}: training on the first {limit} of {len(splits[0].examples)} examples "
                        "(data.limit)")
        splits[0].examples = splits[0].examples[:limit]
    train = splits[0]
    if len(splits) == 2:
        asked = {e.question: e.where for e in train.examples}
        problems += [f"{e.where}: the same question is in the training data at {asked[e.question]}; "
                     "eval questions must be held out" for e in splits[1].examples if e.question in asked]
    n = len(train.examples)
    if n < MIN_EXAMPLES:
        problems.append(f"{train.path}: only {n} usable examples; at least {MIN_EXAMPLES} are needed "
                        "(the guide: 50-100 at minimum, 500-1000 recommended, quality over quantity)")
    elif n < RECOMMENDED_EXAMPLES:
        warnings.append(f"{train.path}: {n} examples is enough to start; {RECOMMENDED_EXAMPLES}-1000 are "
                        "recommended, and quality matters more than quantity")
    return splits, problems, warnings


def stats(split: Split, count_tokens: TokenCounter | None = None) -> dict:
    """Counts and lengths of one split, for the terminal and for the run's records."""
    examples = split.examples
    if not examples:
        return {"file": split.path, "examples": 0}
    user_turns = [sum(m["role"] == "user" for m in e.messages) for e in examples]
    answer_chars = [len(m["content"]) for e in examples for m in e.messages if m["role"] == "assistant"]
    out = {
        "file": split.path,
        "examples": len(examples),
        "multi_turn": sum(t > 1 for t in user_turns),
        "user_turns_max": max(user_turns),
        "with_system": sum(e.messages[0]["role"] == "system" for e in examples),
        "answer_chars_median": statistics.median(answer_chars),
        "answer_chars_max": max(answer_chars),
    }
    if count_tokens is not None:
        tokens = sorted(count_tokens(e.messages) for e in examples)
        out |= {"tokens_median": statistics.median(tokens), "tokens_p95": tokens[int(0.95 * (len(tokens) - 1))],
                "tokens_max": tokens[-1], "tokens_total": sum(tokens)}
    return out


def tokenizer_counter(tokenizer_json: str | Path) -> TokenCounter:
    """Count tokens of a conversation rendered as ChatML: an estimate for `invoke data --tokenizer` (the host
    has no Jinja). The train stage checks data.max_seq_len with the model's own template."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return lambda messages: len(tokenizer.encode(render_chatml(messages), add_special_tokens=False).ids)


def main(argv: list[str] | None = None) -> int:
    from finetune.core.config import from_command_line

    parser = argparse.ArgumentParser(description="Validate a run's dataset and print its stats.")
    parser.add_argument("--config", default="configs/tiny-ja.yaml", help="run config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tokenizer", help="tokenizer.json to measure lengths in tokens")
    args = parser.parse_args(argv)
    if (config := from_command_line(args.config, args.overrides)) is None:
        return 2
    counter = tokenizer_counter(args.tokenizer) if args.tokenizer else None
    splits, problems, warnings = check(config.data.train, config.data.eval, config.data.format,
                                       config.data.max_seq_len, counter, config.data.limit)
    for split in splits:
        print(json.dumps(stats(split, counter), ensure_ascii=False))
    if counter is None:
        print("token lengths: not measured (pass --tokenizer PATH/tokenizer.json)")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s); fix them and run again (nothing was written)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
