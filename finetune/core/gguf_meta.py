"""The metadata of a GGUF file (its key/value header), read in plain Python: no llama.cpp, no numpy.

    read_metadata(path) -> {"general.architecture": "llama", "tokenizer.ggml.tokens": [...], ...}

The format (llama.cpp's docs/gguf.md, version 2 and 3): magic "GGUF", version, tensor count, key/value
count, then each key as a length-prefixed UTF-8 string, a value type and the value; arrays carry an element
type and a count. Tensors follow the header and are not read. The train image uses it to build a family's
tokenizer from the vocabulary files that llama.cpp ships (finetune/train/vocab_models.py).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """Not a GGUF file, or one cut short."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of the GGUF header at `path`, arrays as lists."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
        version, _tensors, count = struct.unpack("<IQQ", _exactly(f, 20, path))
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version}, this reader knows 2 and 3")
        return {_string(f, path): _value(f, _unpack(f, "<I", path), path) for _ in range(count)}


def _value(f: BinaryIO, kind: int, path) -> Any:
    if kind == _STRING:
        return _string(f, path)
    if kind == _ARRAY:
        element, n = _unpack(f, "<I", path), _unpack(f, "<Q", path)
        if element in _SCALARS:  # one read for the whole array: vocabularies have 100k+ entries
            fmt = _SCALARS[element]
            return list(struct.unpack(f"<{n}{fmt[1]}", _exactly(f, n * struct.calcsize(fmt), path)))
        return [_value(f, element, path) for _ in range(n)]
    if kind not in _SCALARS:
        raise GGUFError(f"{path}: unknown GGUF value type {kind}")
    return _unpack(f, _SCALARS[kind], path)


def _string(f: BinaryIO, path) -> str:
    return _exactly(f, _unpack(f, "<Q", path), path).decode("utf-8")


def _unpack(f: BinaryIO, fmt: str, path) -> Any:
    return struct.unpack(fmt, _exactly(f, struct.calcsize(fmt), path))[0]


def _exactly(f: BinaryIO, n: int, path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError(f"{path}: the GGUF header is cut short")
    return data
