"""Which texts an Ollama Modelfile carries unchanged: the config check refuses the others, naming the key.

Ollama's Modelfile parser (parser/parser.go, v0.24.0) has no escape sequences: a value is the text between
two triple double quotes, and it ends at the first line break where what was read so far ends with triple
quotes. It also silently drops every character Go's strconv.IsPrint rejects apart from space, tab, CR and
LF: the ideographic space U+3000 common in Japanese text, zero-width characters, control characters.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

_CUT_SHORT = re.compile(r'"""[^\S\r\n]*[\r\n]')  # """ then a line break (spaces between): the value ends there
_KEPT_CONTROLS = {" ", "\t", "\r", "\n"}


def unreadable(text: str) -> tuple[str, str] | None:
    """(what is wrong, the fix) if Ollama's Modelfile parser would not read `text` back exactly, else None."""
    for i, ch in enumerate(text):
        if ch not in _KEPT_CONTROLS and not _go_printable(ch):
            name = unicodedata.name(ch, "a control character")
            fix = "replace it with an ASCII space" if unicodedata.category(ch) == "Zs" else "remove it"
            return (f"character {i + 1} is U+{ord(ch):04X} ({name}), which Ollama's Modelfile parser silently drops",
                    fix)
    if found := _CUT_SHORT.search(text):
        return (f"'\"\"\"' followed by a line break (at character {found.start() + 1}) would end the value early "
                "in a Modelfile, which has no escapes", "put a character other than a space before the line break")
    return None


def text_problems(serve: Any) -> list[tuple[tuple, str, str]]:
    """(key path, what, fix) for each text of the serve section (config.ServeSection) that a Modelfile cannot
    carry unchanged: what the config check reports."""
    values: dict[tuple, str | None] = {("serve", "system_prompt"): serve.system_prompt}
    values |= {("serve", "stop", i): s for i, s in enumerate(serve.stop)}
    for i, shot in enumerate(serve.few_shot):
        values |= {("serve", "few_shot", i, "user"): shot.user, ("serve", "few_shot", i, "assistant"): shot.assistant}
    return [(key, *problem) for key, text in values.items() if text is not None and (problem := unreadable(text))]


def _go_printable(ch: str) -> bool:
    """Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"
