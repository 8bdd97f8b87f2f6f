"""Tiny random-init models of real families: a family's architecture with its real vocabulary and template.

    python -m finetune.train.vocab_models --case llama3.2 --source DIR --out DIR/llama3.2/base

The vocabulary comes from llama.cpp's `models/ggml-vocab-<name>.gguf` and the chat template from its
`models/templates/`, both in the pinned llama-cpp-python sdist of the convert image (`invoke families`
copies them out to DIR). transformers' own GGUF tokenizer loader gets these vocabularies wrong (EOS, the
pre-tokenizer), so the tokenizer is rebuilt from the GGUF's tokens and merges:

- BPE vocabularies (tokenizer.ggml.model = gpt2): byte-level BPE with the pre-tokenizer regex that
  llama.cpp uses for tokenizer.ggml.pre (NFC first for Qwen), BOS added where llama.cpp adds it;
- Gemma 4's vocabulary (gemma4): BPE over raw UTF-8 with spaces written "▁", split only at line breaks, byte
  fallback; every control token a special token of the tokenizer (the converter types tokens from that);
- SentencePiece vocabularies (llama): BPE over the pieces in score order with byte fallback and "▁"
  prepended to each text between special tokens, as the real tokenizer.json and llama.cpp do; plus a
  tokenizer.model written from the tokens, scores and types, which llama.cpp's converter reads.

Tokens a vocabulary file predates (Qwen 2.5/3's <tool_call>, <think>, ...) are added at their real ids.
Then every `.inp`/`.out` test case that llama.cpp ships beside the vocabulary must tokenize to the same
ids, or the build fails. The model is the family's transformers architecture at a toy size (2 layers,
hidden 64; `--shape` gives real sizes, for the bench), initialised from a fixed seed: untrained, so only
what it is fed can be compared, never what it says.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from finetune.core import families
from finetune.core.gguf_meta import read_metadata

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, the "original regex from tokenizer.json").
PRE_TOKENIZERS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
}
ADD_BOS = {"llama-bpe": True, "qwen2": False}  # llama.cpp's default per pre-tokenizer; the real tokenizers agree
IGNORE_MERGES = {"llama-bpe": True, "qwen2": False}
CONTROL, USER_DEFINED = 3, 4  # GGUF token types
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False)
# Real sizes, for `invoke bench`'s generation rows (bench.models): with the qwen2 vocabulary (151,936 tokens),
# "0.5b" is Qwen2.5-0.5B-Instruct's config.json (494M parameters, embeddings tied); "100m" the same
# proportions at hidden 512, 8 layers (118M, 78M of them the embeddings).
SHAPES = {
    "toy": SIZES,
    "100m": dict(hidden_size=512, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=32768, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=32768, tie_word_embeddings=True),
}
SEED = 1234


class VocabError(RuntimeError):
    """The rebuilt tokenizer disagrees with llama.cpp's test cases, or the source lacks a file."""


def vocab_files(source: Path, name: str) -> tuple[Path, Path | None, Path | None]:
    gguf = source / f"ggml-vocab-{name}.gguf"
    if not gguf.is_file():
        raise VocabError(f"{gguf} is missing: `invoke families` copies it out of the convert image")
    inp, out = gguf.with_name(gguf.name + ".inp"), gguf.with_name(gguf.name + ".out")
    return gguf, (inp if inp.is_file() else None), (out if out.is_file() else None)


def bpe_tokenizer(meta: dict, case: families.Case, out: Path):
    """A byte-level BPE PreTrainedTokenizerFast from a gpt2-type GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = meta["tokenizer.ggml.pre"]
    if pre not in PRE_TOKENIZERS:
        raise VocabError(f"no pre-tokenizer regex for tokenizer.ggml.pre={pre!r} (known: {', '.join(PRE_TOKENIZERS)})")
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    for i, content, _special in case.added_tokens:
        tokens[i], types[i] = content, USER_DEFINED
    vocab = {t: i for i, t in enumerate(tokens) if not t.startswith("[PAD")}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=IGNORE_MERGES[pre]))
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    special = {i for i, _, s in case.added_tokens if s} | {i for i, t in enumerate(types) if t == CONTROL}
    tokenizer.add_tokens([AddedToken(tokens[i], special=i in special, normalized=False)
                          for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED) and tokens[i] in vocab])
    bos = case.bos or tokens[meta["tokenizer.ggml.bos_token_id"]]
    if ADD_BOS[pre]:
        tokenizer.post_processor = bos_first(bos, vocab[bos])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=case.eos,
                                   pad_token=tokens[meta.get("tokenizer.ggml.padding_token_id", vocab[case.eos])],
                                   add_bos_token=ADD_BOS[pre], model_max_length=2048)


def gemma4_tokenizer(meta: dict, case: families.Case, out: Path):
    """Gemma 4's tokenizer from its GGUF vocabulary: BPE on raw UTF-8 with " " replaced by "▁" and no prefix
    space, split only into runs of line breaks and of other text (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GEMMA4),
    byte fallback. The control tokens (<|turn>, <turn|>, ...) are special tokens, <|channel>-style ones
    plain added tokens, as the converter (conversion/gemma.py, Gemma4Model.set_vocab) types them back."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    name = lambda key: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]  # noqa: E731
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=name("unknown"), fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [tokens[i] for i, t in enumerate(types) if t == CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, t in enumerate(types) if t == USER_DEFINED])
    bos = name("bos")
    tokenizer.post_processor = bos_first(bos, vocab[bos])
    named = {bos, case.eos, name("unknown"), name("padding"), name("mask")}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=case.eos,
                                   unk_token=name("unknown"), pad_token=name("padding"), mask_token=name("mask"),
                                   extra_special_tokens=[t for t in control if t not in named],
                                   add_bos_token=True, model_max_length=2048)


def spm_tokenizer(meta: dict, case: families.Case, out: Path):
    """A SentencePiece-style BPE PreTrainedTokenizerFast from a llama-type GGUF vocabulary, in the form of
    the real Phi-3/Llama 2 tokenizer.json: "▁" prepended to every text between special tokens, as llama.cpp
    does (add_space_prefix after each special token). tokenizer.model, which llama.cpp's converter reads,
    holds the pieces below the first added token; the added ones (Phi-3's <|user|>, ...) are added tokens."""
    from sentencepiece import sentencepiece_model_pb2 as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    pieces = case.spm_pieces
    proto = spm.ModelProto()
    for token, score, kind in zip(tokens[:pieces], scores[:pieces], types[:pieces]):
        proto.pieces.add(piece=token, score=score, type=kind)
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = pieces
    proto.trainer_spec.byte_fallback = True
    spec = proto.trainer_spec
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.escape_whitespaces = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())

    vocab = {t: i for i, t in enumerate(tokens[:pieces])}
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]]
    # SentencePiece BPE merges in the order of the merged piece's score; special and byte pieces never merge.
    merges = generate_merges(vocab, dict(zip(tokens[:pieces], scores[:pieces])),
                             skip_tokens={tokens[i] for i in range(pieces) if types[i] != 1})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    added = [i for i in range(len(tokens)) if (i < pieces and types[i] == CONTROL)
             or (i >= pieces and not tokens[i].startswith("[PAD"))]
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in added])
    bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    if add_bos:
        tokenizer.post_processor = bos_first(bos, vocab[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=case.eos, unk_token=unk,
                                   pad_token=case.eos, add_bos_token=add_bos, model_max_length=2048)


def bos_first(bos: str, bos_id: int):
    """The post-processor that puts BOS before every text, as the real Llama tokenizers do."""
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, bos_id)])


def check_test_cases(tokenizer, inp: Path | None, expected: Path | None) -> int:
    """Tokenize llama.cpp's test texts (no special tokens, as test-tokenizer-0 does); the number checked."""
    if inp is None or expected is None:
        return 0
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    wanted = expected.read_text(encoding="utf-8").split("\n")
    wrong = []
    for text, ids in zip(texts, wanted):
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != [int(x) for x in ids.split()]:
            wrong.append(f"{text[:30]!r}: {got[:12]} != {ids.split()[:12]}")
    if wrong:
        raise VocabError(f"{inp.name}: {len(wrong)} of {len(texts)} test cases tokenize differently:\n  "
                         + "\n  ".join(wrong[:5]))
    return len(texts)


def build(case: families.Case, source: Path, out: Path, shape: str = "toy") -> dict:
    """The tokenizer (checked against llama.cpp's test cases), the chat template and a random model of
    `case` (at the toy size, or one of SHAPES) into `out`; returns what was built."""
    import torch
    import transformers

    gguf, inp, expected = vocab_files(source, case.vocab)
    meta = read_metadata(gguf)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    make = {"gpt2": bpe_tokenizer, "gemma4": gemma4_tokenizer}.get(meta["tokenizer.ggml.model"], spm_tokenizer)
    tokenizer = make(meta, case, out)
    checked = check_test_cases(tokenizer, inp, expected)
    tokenizer.chat_template = (source / case.template).read_text(encoding="utf-8")
    tokenizer.save_pretrained(out)
    torch.manual_seed(SEED)
    architecture = getattr(transformers, case.architecture)
    config = architecture.config_class(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(case.eos), pad_token_id=tokenizer.pad_token_id,
        **(SHAPES[shape] | dict(case.model_config)))
    model = architecture(config)
    model.save_pretrained(out)
    built = {"case": case.name, "vocab": gguf.name, "template": case.template, "test_cases": checked,
             "architecture": case.architecture, "vocab_size": config.vocab_size, "shape": shape,
             "parameters": sum(p.numel() for p in model.parameters())}
    (out / "vocab_model.json").write_text(json.dumps(built, indent=2) + "\n", encoding="utf-8")
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a tiny model of a family with its real vocabulary.")
    parser.add_argument("--case", required=True, choices=[c.name for c in families.CASES])
    parser.add_argument("--source", type=Path, required=True, help="the vocabularies and templates, copied out")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=list(SHAPES), default="toy", help="the model's size (default: toy)")
    args = parser.parse_args(argv)
    case = next(c for c in families.CASES if c.name == args.case)
    try:
        print(json.dumps(build(case, args.source, args.out, args.shape)))
    except VocabError as e:
        print(f"vocab_models: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
