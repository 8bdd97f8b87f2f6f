"""Chat templates: how a conversation becomes one prompt string, identically in training and in Ollama.

The train stage installs CHATML_JINJA as the tokenizer's chat_template; the serve stage writes the matching
Go template into the Modelfile. `render_chatml` is the same format in plain Python, for measuring lengths.
`save_tokenizer` keeps the markers single special tokens once converted, so the same string also becomes
the same tokens in llama.cpp and Ollama.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"

# The Jinja form transformers renders (apply_chat_template); kept byte-for-byte equal to render_chatml.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_spans(messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text of a conversation, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, and the
    character spans of each assistant answer with its end marker (where training computes the loss)."""
    text, spans = "", []
    for m in messages:
        head = f"{CHATML_START}{m['role']}\n"
        start = len(text) + len(head)
        text += f"{head}{m['content']}{CHATML_END}\n"
        if m["role"] == "assistant":
            spans.append((start, start + len(m["content"]) + len(CHATML_END)))
    return text, spans


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The ChatML prompt string, optionally opening the assistant's turn."""
    return chatml_spans(messages)[0] + (f"{CHATML_START}assistant\n" if add_generation_prompt else "")


def save_tokenizer(tokenizer, out: Path) -> None:
    """`tokenizer.save_pretrained(out)`, plus the `added_tokens_decoder` table in tokenizer_config.json.

    transformers 5 no longer writes that table, and llama.cpp's converter reads a SentencePiece model's
    special tokens only from it (or added_tokens.json): without it <|im_start|> becomes a normal GGUF token
    that llama.cpp and Ollama spell out as <, |, im, _, ... and the model sees prompts it was never trained on.
    """
    tokenizer.save_pretrained(out)
    path = Path(out) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
