"""llama.cpp's token ids of prompts, for the family matrix (`invoke families`).

    python -m finetune.convert.tokens REQUESTS.json OUT.json      (in the convert image)

REQUESTS is a list of {"gguf": path, "text": the prompt as Ollama renders it, "add_bos": bool}. OUT gets,
for each, the ids that the pinned llama.cpp feeds the model: special tokens parsed, BOS added where the
GGUF's add_bos_token says so (unless add_bos is false: the prompt carries the BOS text, as Gemma 4's
renderer writes it, and llama.cpp adds BOS to every Gemma 4 prompt whatever the GGUF says), as llama-server
and Ollama's llama.cpp runner tokenize a rendered prompt.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path


@cache
def _vocab(gguf: str):
    from llama_cpp import Llama

    return Llama(model_path=gguf, vocab_only=True, verbose=False)


def main(argv: list[str] | None = None) -> int:
    requests, out = (argv or sys.argv[1:])[:2]
    ids = [_vocab(r["gguf"]).tokenize(r["text"].encode(), add_bos=r.get("add_bos", True), special=True)
           for r in json.loads(Path(requests).read_text(encoding="utf-8"))]
    Path(out).write_text(json.dumps(ids), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
