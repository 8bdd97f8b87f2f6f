"""Chat templates with a Hugging Face tokenizer: how a conversation becomes one prompt and its token ids,
identically in training (finetune/train/chat.py), in the convert stage's checks and in Ollama.

`render` is the tokenizer's apply_chat_template with the run's template and fixed variables; `encode`
gives the ids training feeds, BOS once; `without_bos` is the prompt as Ollama's Go template renders it
(serving adds BOS as a token). ChatML, the offline toy's format, is also written out in plain Python
(`render_chatml`), for measuring lengths without a tokenizer. `save_tokenizer` keeps the markers single
special tokens once converted, so the same string also becomes the same tokens in llama.cpp and Ollama.
The tokenizer is passed in: nothing here imports transformers.
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


def render(tokenizer, jinja: str, messages: Sequence[dict], add_generation_prompt: bool, template_vars: dict) -> str:
    """The Jinja template's rendering of `messages` (transformers' apply_chat_template, no tokenizing)."""
    return tokenizer.apply_chat_template(list(messages), chat_template=jinja, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_vars)


def without_bos(text: str, bos_token: str | None) -> str:
    """The rendered text as Ollama's Go template renders it: the BOS text, if it leads, becomes a token."""
    return text[len(bos_token):] if bos_token and text.startswith(bos_token) else text


def served_prompt(text: str, bos_token: str | None, bos_text: bool = False) -> str:
    """A Jinja rendering as Ollama renders the same conversation: without_bos, unless the family's Ollama
    renderer writes the BOS text itself (families.Family.bos_text)."""
    return text if bos_text else without_bos(text, bos_token)


def encode(tokenizer, text: str, spans: Sequence[tuple[int, int]] = (), assistant_only: bool = False
           ) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a rendered conversation: the tokenizer's ids with special tokens (BOS where it
    adds one), the template's own BOS text, if any, in place of the added BOS rather than beside it (as
    llama.cpp and Ollama, which add BOS to a Go template that leaves it out); 1 in the mask where the loss
    applies: inside `spans`, or everywhere unless assistant_only."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        ids, offsets = ids[1:], offsets[1:]
    mask = [int(not assistant_only or any(s <= a and b <= e and b > a for s, e in spans)) for a, b in offsets]
    return ids, mask


def save_tokenizer(tokenizer, out: Path, add_bos: bool | None = None) -> None:
    """`tokenizer.save_pretrained(out)`, plus the `added_tokens_decoder` table in tokenizer_config.json, and
    `add_bos_token` when given: whether the ids training fed start with BOS.

    llama.cpp's converter writes tokenizer.ggml.add_bos_token from tokenizer.json's post-processor or from
    that flag; transformers 5 saves a post-processor it cannot read ("$A" alone), and without the key
    Ollama's Go engine (Qwen 3, Gemma 3) adds BOS by default: a Qwen 3 prompt would start with
    <|endoftext|>, which training never fed.

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
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
