"""Chat templates: how a conversation becomes one prompt string, identically in training and in Ollama.

The train stage installs CHATML_JINJA as the tokenizer's chat_template; the serve stage writes the matching
Go template into the Modelfile. `render_chatml` is the same format in plain Python, for measuring lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

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
