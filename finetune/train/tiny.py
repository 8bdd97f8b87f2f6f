"""The offline base model: a tiny Llama built deterministically, with no download.

    python -m finetune.train.tiny --out DIR --domain data/customer_support_ja/train.jsonl

1. A SentencePiece BPE tokenizer (byte fallback, ChatML markers as single pieces) trained on the bundled
   generic English/Japanese sentences plus the domain conversations, so Japanese text stays short in tokens.
2. A Llama (hidden 256, 4 layers; sizes that llama.cpp's k-quants accept) initialised from a fixed seed.
3. A short "pre-training" on the generic sentences only: it writes generic text and does not yet know the
   support domain, which is what fine-tuning then teaches it.
The same inputs give byte-identical files (fixed seeds, one thread, deterministic algorithms).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

from finetune.core import data, templates
from finetune.core.data import read_split
from finetune.core.templates import CHATML_END, CHATML_JINJA, CHATML_START, save_tokenizer
from finetune.train import numerics

GENERIC_CORPUS = Path(__file__).with_name("assets") / "generic_corpus.txt"
VOCAB_SIZE = 2048  # the domain text has ~1,200 distinct characters; rarer ones fall back to bytes
SEED = 1234
PRETRAIN_STEPS = 400
PRETRAIN_LR = 3e-3
HIDDEN = 256  # a multiple of 256: llama.cpp's k-quants need rows of 256
LAYERS = 4


def corpus_lines(domain_files: list[Path]) -> tuple[list[str], list[str]]:
    """(generic sentences, domain texts): the message contents of the domain JSONL files."""
    generic = [x for x in GENERIC_CORPUS.read_text(encoding="utf-8").splitlines() if x.strip()]
    domain = [m["content"] for path in domain_files for e in read_split(path).examples for m in e.messages]
    return generic, domain


def train_tokenizer(lines: list[str], out: Path) -> None:
    """SentencePiece BPE -> `out/tokenizer.model`, then a transformers tokenizer saved beside it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    # From memory to memory: trained from a file, the model records that file's path and its own output path
    # (trainer_spec.input, model_prefix), and so differed with the build directory (a cache key, a pid).
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB_SIZE,
        character_coverage=0.9995, byte_fallback=True, user_defined_symbols=[CHATML_START, CHATML_END],
        add_dummy_prefix=False, split_digits=False, num_threads=1, shuffle_input_sentence=False,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    # transformers 5 builds a broken vocabulary from LlamaTokenizer(vocab_file=...); loading the directory
    # through AutoTokenizer with a tokenizer_config.json works (and needs protobuf).
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": CHATML_END, "unk_token": "<unk>",
        "pad_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "add_prefix_space": False, "model_max_length": 1024,
    }), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(out)
    # Also HF special tokens, so that save_tokenizer lists them in added_tokens_decoder, where llama.cpp's
    # converter looks: a SentencePiece user-defined symbol alone becomes a NORMAL GGUF token.
    tokenizer.add_special_tokens({"additional_special_tokens": [CHATML_START, CHATML_END]})
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"the ChatML markers were added as new tokens ({len(tokenizer)} != {VOCAB_SIZE})")
    tokenizer.chat_template = CHATML_JINJA
    sample = "返品承知いたしました。14日以内であれば Hello!"
    decoded = tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"])
    if decoded != sample:
        raise RuntimeError(f"tokenizer round trip failed: {sample!r} -> {decoded!r}")
    save_tokenizer(tokenizer, out)


def build(out: Path, domain_files: list[Path], steps: int = PRETRAIN_STEPS) -> Path:
    """Build the tokenizer and the pre-trained tiny Llama into `out`; return `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    generic, domain = corpus_lines(domain_files)
    train_tokenizer(generic + domain, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64, num_key_value_heads=HIDDEN // 128, max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    order = random.Random(SEED)
    model.train()
    for _ in range(steps):
        ids = tokenizer(order.choice(generic))["input_ids"] + [tokenizer.convert_tokens_to_ids("</s>")]
        batch = torch.tensor([ids])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    (out / "tiny.json").write_text(json.dumps({"seed": SEED, "steps": steps, "final_loss": round(loss.item(), 4)}))
    return out


def build_key(domain_files: list[Path]) -> str:
    """What a build depends on: this code, the tokenizer saving and data reading code, the corpora, the library
    versions and the numerical pin (finetune/train/numerics.py)."""
    import sentencepiece
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256()
    for path in (Path(__file__), Path(templates.__file__), Path(data.__file__), Path(numerics.__file__),
                 GENERIC_CORPUS, *domain_files):
        digest.update(path.read_bytes())
    for module in (torch, transformers, tokenizers, sentencepiece):
        digest.update(f"{module.__name__}=={module.__version__}".encode())
    digest.update(json.dumps(numerics.in_use(), sort_keys=True).encode())  # other kernels, other bytes
    return digest.hexdigest()[:16]


def cached_build(out: Path, domain_files: list[Path], cache: Path) -> bool:
    """build() into `out`, or copy an earlier build of the same inputs from `cache`: the build is
    deterministic, so the copy is the same model, byte for byte, without the pre-training (about 10 s on two
    cores). A new build enters the cache by an atomic rename, complete or not at all. True if it was built."""
    entry = cache / build_key(domain_files)
    built = not (entry / "tiny.json").is_file()
    if built:
        partial = cache / f".{entry.name}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build(partial, domain_files)
        try:
            partial.rename(entry)
        except OSError:  # another run cached the same build first
            shutil.rmtree(partial)
    shutil.copytree(entry, out, dirs_exist_ok=True)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny offline base model.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--domain", type=Path, action="append", default=[], help="JSONL whose texts the tokenizer sees")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (pinned, as train.cpu_threads)")
    args = parser.parse_args(argv)
    numerics.record(numerics.pin(args.threads))  # the same bytes as inside the train stage
    build(args.out, args.domain, args.steps)
    print(f"tiny base model written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
