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


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
