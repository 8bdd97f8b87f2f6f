"""The convert stage: the merged Hugging Face model to GGUF with the pinned llama.cpp, then quantized, and
every file checked.

    python -m finetune.convert --config run.yaml --out /artifacts      (inside the convert image: ./invoke convert)

Reads OUT/train/merged/ (read-only); writes OUT/convert/:
    model-<outtype>.gguf     the full-precision conversion (f16, bf16 or f32)
    model-<QUANT>.gguf       one per convert.quant_types (llama-quantize)
    base-<serve.quant>.gguf  when serve.baseline: the base model (OUT/train/base/), for the prompt-engineering
                             baseline that `invoke serve` puts beside the fine-tuned model
    imatrix.gguf             when convert.imatrix: importance matrix from the training conversations
    report.json              per file: type, size, bits/weight, sha256, load time, metadata checks, a greedy
                             generation and how it ended, perplexity on the eval answers and, for each quant,
                             KL divergence from the full-precision GGUF and same-top-token rate; provenance;
                             `seconds`: wall time per phase (the stage's profile)
    inputs.json              what the stage read: its declared config values and data file digests
    chat.json                the train stage's chat format (template, family, end of turn), for serve
Each check must pass: the file loads in llama-cpp-python (built from the same llama.cpp source), has the
expected architecture, the training chat template, the family's end-of-turn token among its
end-of-generation tokens, tokenizes a chat prompt to the ids training fed (BOS included: the GGUF's
add_bos_token must agree), and a greedy answer stops by itself (convert.require_stop). Work happens in
OUT/.convert.partial/ and moves to OUT/convert/ only
when all is done; on failure nothing is left behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from finetune.convert import STAGE
from finetune.core import data as datasets_
from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.core.stage import Stopwatch, file_sha256, publishing, stage_main
from finetune.core.templates import encode, render, served_prompt, without_bos

LLAMA_CPP_DIR = Path(os.environ.get("LLAMA_CPP_DIR", "/opt/llama.cpp"))
LLAMA_CPP_COMMIT = os.environ.get("LLAMA_CPP_COMMIT", "unknown")
MAX_NEW_TOKENS = 256
# llama-perplexity runs beside the in-process checks (convert()), the two on separate halves of the cores:
# ggml's threads spin while they wait for each other, so two runs that each took every core would slow both.
# Without data.eval no perplexity runs, and the checks take every core.
CORES = os.cpu_count() or 1
PERPLEXITY_THREADS = max(1, CORES // 2)
CHECK_THREADS = max(1, CORES - PERPLEXITY_THREADS)
REPEAT_PENALTY = 1.1
COMMON_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")


class ConvertError(RuntimeError):
    """A precondition or a check that failed; the message says what to do."""


def supported_architectures() -> list[str]:
    """HF architectures the pinned converter handles (listed once at image build time)."""
    text = (LLAMA_CPP_DIR / "supported-models.txt").read_text()
    return re.findall(r"^\s*-\s*(\S+)\s*$", text, re.M)


# The GGUF architecture of a transformers model_type, where the names differ: the text-only halves of
# multimodal families, which llama.cpp's converter writes as the family (conversion/gemma.py).
GGUF_ARCHITECTURES = {"gemma3_text": "gemma3", "gemma4_text": "gemma4"}


def check_merged(merged: Path) -> dict:
    """The merged model's config.json, once the directory is complete and its architecture convertible."""
    if not merged.is_dir():
        raise ConvertError(f"no merged model at {merged}: run `invoke train` first")
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (merged / name).is_file()]
    if not list(merged.glob("*.safetensors")):
        missing.append("*.safetensors (the weights)")
    if not ((merged / "tokenizer.json").is_file() or (merged / "tokenizer.model").is_file()):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise ConvertError(f"incomplete merged model in {merged}: missing {', '.join(missing)}; "
                           "rerun `invoke train` to write it again")
    hf_config = json.loads((merged / "config.json").read_text())
    arch = (hf_config.get("architectures") or ["(none)"])[0]
    supported = supported_architectures()
    if arch not in supported:
        common = [a for a in COMMON_ARCHITECTURES if a in supported]
        raise ConvertError(f"architecture {arch!r} is not supported by the pinned llama.cpp converter "
                           f"({LLAMA_CPP_COMMIT}); fine-tune a base model it converts, such as {', '.join(common)} "
                           f"({len(supported)} in all: convert_hf_to_gguf.py --print-supported-models)")
    return hf_config


def gguf_architecture(hf_config: dict) -> str:
    """The general.architecture the converter writes for a config.json."""
    return GGUF_ARCHITECTURES.get(hf_config["model_type"], hf_config["model_type"])


def run_tool(command: list[str], what: str) -> str:
    """Run a llama.cpp tool; on failure raise ConvertError with the end of its output."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise ConvertError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout + done.stderr


def to_gguf(merged: Path, out: Path, outtype: str, description: str, fmt: dict) -> None:
    """convert_hf_to_gguf.py into out (via a temporary name, renamed when the converter succeeded)."""
    metadata = out.with_suffix(".metadata.json")
    metadata.write_text(json.dumps({"general.description": description}))
    partial = out.with_suffix(".gguf.tmp")
    try:
        run_tool([sys.executable, str(LLAMA_CPP_DIR / "convert_hf_to_gguf.py"), str(merged), "--outfile", str(partial),
                  "--outtype", outtype, "--metadata", str(metadata)], f"converting {merged} to {outtype}")
    finally:
        metadata.unlink()
    if fmt.get("bos_text"):
        set_add_bos(partial, False)
    partial.rename(out)


def set_add_bos(path: Path, value: bool) -> None:
    """Rewrite tokenizer.ggml.add_bos_token in place. For a family whose Ollama renderer writes the BOS text
    (Gemma 4), the converter's add_bos_token = true (conversion/gemma.py writes it whatever the tokenizer
    says) would make Ollama's tokenizer add a second BOS."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    if field is None:
        raise ConvertError(f"{path.name} has no tokenizer.ggml.add_bos_token to set")
    field.parts[field.data[0]][0] = value  # a memory map of the file: the one byte of the value
    reader.data.flush()


def quantize(source: Path, out: Path, quant: str, imatrix: Path | None) -> None:
    partial = out.with_suffix(".gguf.tmp")
    command = ["llama-quantize", *(["--imatrix", str(imatrix)] if imatrix else []), str(source), str(partial), quant,
               str(CORES)]
    run_tool(command, f"quantizing to {quant}")
    partial.rename(out)


def answers_text(path: str | Path) -> str:
    """The assistant answers of a JSONL split, one per line: what perplexity is measured on. (llama-perplexity
    does not parse special tokens, so chat markers in its text would be spelled out as pieces the model
    never saw, and the prompt text is not what the model was trained to predict.)"""
    return "".join(m["content"] + "\n" for e in datasets_.read_split(path).examples
                   for m in e.messages if m["role"] == "assistant")


def conversations_text(path: str | Path, hf_dir: Path, fmt: dict) -> str:
    """The conversations of a JSONL split rendered with the chat template: the text for the imatrix."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return "".join(without_bos(render(tokenizer, fmt["jinja"], e.messages, False, fmt["template_vars"]),
                               tokenizer.bos_token) for e in datasets_.read_split(path).examples)


def chat_format(train: Path) -> dict:
    """The train stage's chat.json: the template trained with, its family, end of turn and BOS."""
    path = train / layout.CHAT_FORMAT
    if not path.is_file():
        raise ConvertError(f"{path} is missing: the train output predates per-family chat templates; "
                           "run `invoke train --force`")
    return json.loads(path.read_text(encoding="utf-8"))


def perplexity(model: Path, text_file: Path, logits: Path | None = None, compare: bool = False) -> dict:
    """llama-perplexity over text_file in 128-token chunks (the tiny model's context is short).

    With `logits`, compare=False also saves the model's logits there (the full-precision GGUF), and
    compare=True scores a quant against them: KL divergence from the full-precision model and how often
    both pick the same top token.
    """
    command = ["llama-perplexity", "-m", str(model), "-f", str(text_file), "-c", "128", "-b", "128",
               "-t", str(PERPLEXITY_THREADS)]
    command += ["--kl-divergence-base", str(logits)] if logits else []
    started = time.monotonic()
    output = run_tool(command + (["--kl-divergence"] if compare else []), f"perplexity of {model.name}")
    return perplexity_figures(output, compare) | {
        "perplexity_seconds": round(time.monotonic() - started, 3)}


def perplexity_figures(output: str, compare: bool) -> dict:
    """The figures of llama-perplexity's output (tools/perplexity/perplexity.cpp at the pinned commit): "Final
    estimate: PPL = %.4lf"; with --kl-divergence "Mean PPL(Q)   : %10.6lf", "Mean    KLD: %10.6lf" and "Same
    top p: %6.3lf %%" (not the per-chunk table's header, which has no colon). None where a line is missing."""
    number = lambda pattern: float(m.group(1)) if (m := re.search(pattern, output)) else None  # noqa: E731
    if not compare:
        return {"perplexity": number(r"Final estimate: PPL = ([0-9.]+)")}
    return {"perplexity": number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"), "kl_divergence": number(r"Mean\s+KLD:\s*([0-9.]+)"),
            "same_top_token": number(r"Same top p:\s*([0-9.]+)")}


def check_gguf(path: Path, hf_dir: Path, expected_arch: str, fmt: dict, tuned: bool,
               prompt_messages: list[dict], require_stop: bool = True, clock: Stopwatch | None = None,
               threads: int = CHECK_THREADS) -> dict:
    """Load a GGUF, check its metadata and that it tokenizes a chat prompt (rendered with the trained
    template, `fmt` from chat.json) into the ids the Hugging Face tokenizer in hf_dir gives in training, BOS
    included, and generate greedily; raise ConvertError if anything is off.

    tuned False checks a base model: it loads and generates, but it was never taught the template or to
    end its turn. require_stop False records how the greedy answer ended without failing on it. `clock`
    gets a lap per check ("checks: ..."): their costs, which `invoke bench` shows. `threads`: llama.cpp's
    for the load and the generation.
    """
    lap = clock.lap if clock else (lambda phase: None)
    import llama_cpp
    from llama_cpp import Llama

    started = time.monotonic()
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, seed=0, verbose=False)
    load_seconds = time.monotonic() - started
    lap("checks: load in llama.cpp")
    # The metadata as llama.cpp read it: gguf-py's GGUFReader took 6.8 s to parse it again from a GGUF with
    # Qwen2.5's 151,936-token vocabulary (0.07 s for the toy). A bool reads "true" or "false".
    arch, template = llm.metadata.get("general.architecture"), llm.metadata.get("tokenizer.chat_template")
    add_bos_key = {"true": True, "false": False}.get(llm.metadata.get("tokenizer.ggml.add_bos_token", ""))
    bos_text = bool(fmt.get("bos_text"))  # the served prompt carries the BOS text (Gemma 4's renderer writes it)
    n_params = llm._model.n_params()
    problems = []
    if arch != expected_arch:
        problems.append(f"architecture is {arch!r}, expected {expected_arch!r}")
    if tuned and template != fmt["jinja"]:
        problems.append("tokenizer.chat_template differs from the one the model was trained with")
    if add_bos_key is None:
        problems.append("tokenizer.ggml.add_bos_token is missing: llama.cpp would then decide by vocabulary type and "
                        f"Ollama's Go engine would add BOS; training fed {'one' if fmt['bos'] else 'none'}")
    elif tuned and add_bos_key != (fmt["bos"] and not bos_text):
        problems.append(f"tokenizer.ggml.add_bos_token is {add_bos_key}, but training fed "
                        f"{'a' if fmt['bos'] else 'no'} BOS" + (", which the served prompt carries as text"
                                                                 if bos_text else ""))
    lap("checks: metadata")
    end = fmt["end_of_turn"]
    if tuned and not llama_cpp.llama_vocab_is_eog(llm._model.vocab, fmt["end_of_turn_id"]):
        problems.append(f"{end} (id {fmt['end_of_turn_id']}) is not an end-of-generation token of the GGUF: "
                        "generation would not stop at the end of a turn")
    tokenizer = _tokenizer(hf_dir)
    lap("checks: the trained tokenizer")  # loaded once per model directory
    text = render(tokenizer, fmt["jinja"], prompt_messages, True, fmt["template_vars"])
    prompt = llm.tokenize(served_prompt(text, tokenizer.bos_token, bos_text).encode(), add_bos=not bos_text,
                          special=True)
    if (difference := token_difference(prompt, encode(tokenizer, text)[0], tokenizer, llm)) is not None:
        problems.append(f"llama.cpp tokenizes the chat prompt differently from the trained tokenizer ({difference}): "
                        "Ollama would feed the model input it was not trained on; check that the chat markers "
                        "are special tokens in tokenizer_config.json (added_tokens_decoder)")
    lap("checks: prompt ids")
    # Greedy, with the repeat penalty llama.cpp and Ollama apply by default (1.1): a model whose template or
    # end token is wrong still runs to the limit, while a small model's digit loops ("000...") do not.
    result = llm.create_completion(prompt, max_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=1, seed=0,
                                   repeat_penalty=REPEAT_PENALTY)
    choice = result["choices"][0]
    if tuned and require_stop and choice["finish_reason"] != "stop":
        problems.append(f"a greedy answer (repeat penalty {REPEAT_PENALTY}) did not stop by itself within "
                        f"{MAX_NEW_TOKENS} tokens "
                        f"(runaway generation: check the chat template and end tokens): {choice['text'][:120]!r}")
    add_bos = bool(llm._model.add_bos_token())
    del llm
    lap("checks: greedy answer")
    if problems:
        raise ConvertError(f"{path.name} failed its checks: " + "; ".join(problems))
    size = path.stat().st_size
    return {
        "file": path.name, "size_bytes": size, "bits_per_weight": round(size * 8 / n_params, 3),
        "parameters": n_params, "sha256": file_sha256(path), "load_seconds": round(load_seconds, 3),
        "architecture": arch, "end_of_turn": end, "add_bos": add_bos,
        "greedy_answer": choice["text"], "generated_tokens": result["usage"]["completion_tokens"],
        "finish_reason": choice["finish_reason"],
    }


@contextmanager
def worker() -> Iterator[ThreadPoolExecutor]:
    """One thread for jobs beside the main line; on a failure, the jobs not begun are dropped, not waited for."""
    pool = ThreadPoolExecutor(1)
    try:
        yield pool
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()


def load_check_tools(model_dirs: list[Path]) -> None:
    """Import what check_gguf uses and load the trained tokenizers, so that this can run beside the converter."""
    import llama_cpp  # noqa: F401

    for model_dir in model_dirs:
        _tokenizer(model_dir)


@functools.cache
def _tokenizer(hf_dir: Path):
    """The Hugging Face tokenizer of a model directory, loaded once for all the GGUFs checked against it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def token_difference(ours: list[int], theirs: list[int], tokenizer, llm) -> str | None:
    """Where llama.cpp's tokens first differ from the ids training fed, or None."""
    if ours == theirs:
        return None
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    show = lambda ids: [llm.detokenize([t], special=True).decode(errors="replace") for t in ids]  # noqa: E731
    return (f"{len(ours)} tokens instead of {len(theirs)}; from token {i}: GGUF {show(ours[i:i + 5])} vs "
            f"trained {tokenizer.convert_ids_to_tokens(theirs[i:i + 5])}")


def convert(config: RunConfig, out: Path) -> Path:
    """Convert, quantize and check per `config` into out/convert/ (see the module docstring)."""
    train = layout.stage_dir(out, "train")
    merged, work, final = train / layout.MERGED, layout.partial_dir(out, "convert"), layout.stage_dir(out, "convert")
    clock = Stopwatch()
    hf_config = check_merged(merged)
    fmt = chat_format(train)
    with publishing(work, final):
        STAGE.write_inputs(config, work)
        (work / layout.CHAT_FORMAT).write_text((train / layout.CHAT_FORMAT).read_text(encoding="utf-8"),
                                               encoding="utf-8")
        c = config.convert
        # No run name and no time: the same config gives the same bytes in any run (golden/, verify --golden).
        description = (f"fine-tuned by finetune from {config.model.id}"
                       f"{'@' + config.model.revision if config.model.revision else ''}; llama.cpp {LLAMA_CPP_COMMIT}")
        full = work / layout.model_gguf(c.outtype)
        print(f"convert: {merged} -> {full.name}", flush=True)
        base = train / layout.BASE if config.serve.baseline and (train / layout.BASE).is_dir() else None
        reference = None
        if config.data.eval:
            reference = work / "perplexity-input.txt"
            reference.write_text(answers_text(config.data.eval), encoding="utf-8")
        clock.lap("start")
        # A worker beside the main line, one job at a time and in order. First the checks' largest cost on a
        # small model, the trained tokenizers (transformers' import first) and the check libraries, while the
        # converter (a subprocess) runs. Then llama-perplexity (a subprocess) on each GGUF as soon as it is
        # written, while the main line quantizes and checks: the full-precision GGUF first, whose logits the
        # quants' KL divergence reads. One at a time, as two runs of a large model would compete for the
        # same cores and memory. The laps are what the main line waited; each run's own time is in its row.
        with worker() as beside:
            tools = beside.submit(load_check_tools, [d for d in (merged, base) if d is not None])
            to_gguf(merged, full, c.outtype, description, fmt)
            clock.lap("convert_hf_to_gguf")
            scores: dict[Path, Future] = {}

            def score(path: Path, baseline: bool = False) -> None:
                if reference is not None:  # no data.eval: no perplexity
                    logits = None if baseline else work / "logits.bin"
                    scores[path] = beside.submit(perplexity, path, reference, logits, not baseline and path != full)

            score(full)
            tools.result()
            clock.lap("checks: the trained tokenizer")  # what the converter's time did not hide
            imatrix = None
            if c.imatrix:
                text = work / "imatrix-input.txt"
                text.write_text(conversations_text(config.data.train, merged, fmt), encoding="utf-8")
                imatrix = work / "imatrix.gguf"
                run_tool(["llama-imatrix", "-m", str(full), "-f", str(text), "-o", str(imatrix), "-c", "128"],
                         "computing the importance matrix")
                text.unlink()
                clock.lap("imatrix")
            files = [(c.outtype, full)]
            for quant in c.quant_types:
                target = work / layout.model_gguf(quant)
                print(f"convert: {full.name} -> {target.name}", flush=True)
                quantize(full, target, quant, imatrix)
                score(target)
                files.append((quant, target))
            clock.lap("llama-quantize")
            if base is not None:
                files.append((f"base {config.serve.quant}", base_gguf(base, work, config, description, fmt)))
                score(files[-1][1], baseline=True)
                clock.lap("baseline GGUF")

            first = datasets_.read_split(config.data.train).examples[0].messages
            prompt = list(first[: next(i for i, m in enumerate(first) if m["role"] == "user") + 1])
            rows = []
            for kind, path in files:
                baseline = kind.startswith("base")
                rows.append({"type": kind, **check_gguf(path, train / (layout.BASE if baseline else layout.MERGED),
                                                        gguf_architecture(hf_config), fmt, not baseline, prompt,
                                                        c.require_stop, clock,
                                                        CHECK_THREADS if reference is not None else CORES)})
                clock.lap("checks: sha256")  # the file's digest, taken for the report after the checks
            for row, (_, path) in zip(rows, files):
                row |= scores[path].result() if path in scores else {}
            clock.lap("perplexity")
        if reference:
            reference.unlink()
            (work / "logits.bin").unlink(missing_ok=True)
        report = {
            "llama_cpp": {"commit": LLAMA_CPP_COMMIT, "source": "llama-cpp-python==0.3.36 sdist "
                          "sha256:832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"},
            "source_model": {"architecture": hf_config["architectures"][0], "model_type": hf_config["model_type"]},
            "files": rows,
            "seconds": clock.seconds,  # wall time per phase: the stage's profile
        }
        (work / layout.CONVERT_REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
        print_table(rows)
    return final


def base_gguf(base: Path, work: Path, config: RunConfig, description: str, fmt: dict,
              cache: Path = Path(os.environ.get("FINETUNE_BASE_GGUF_CACHE", layout.BASE_GGUF_CACHE_MOUNT))) -> Path:
    """The base model as a GGUF of the served quant type: what the prompt-engineering baseline serves.

    It depends only on the base model (train/base/: weights, tokenizer, the chat template trained with),
    the pinned llama.cpp, the types and the description, not on the run: so it is made once per such key
    into `cache` (the host's artifacts/.cache/base-gguf/, which `invoke convert` mounts, or names in
    FINETUNE_BASE_GGUF_CACHE for a native run) and copied from
    there by every later run, after its sha256 is checked against the one recorded when it was made."""
    c, quant = config.convert, config.serve.quant
    full, target = work / layout.base_gguf(c.outtype), work / layout.base_gguf(quant)
    key = base_gguf_key(base, c.outtype, quant, description, bool(fmt.get("bos_text")))
    cached, record = cache / f"{key}.gguf", cache / f"{key}.sha256"
    if cached.is_file() and record.is_file() and file_sha256(cached) == record.read_text().strip():
        shutil.copyfile(cached, target)
        print(f"convert: {target.name} (the baseline) reused from the base GGUF cache (key {key[:12]}: the same "
              "base model, llama.cpp, types and description)", flush=True)
        return target
    print(f"convert: {base} -> {target.name} (the baseline)", flush=True)
    to_gguf(base, full, c.outtype, f"base model of {description}", fmt)
    if quant != c.outtype:
        quantize(full, target, quant, None)
        full.unlink()
    if cache.is_dir():
        partial = cache / f".{key}.{os.getpid()}.partial"
        shutil.copyfile(target, partial)
        partial.rename(cached)
        record.write_text(file_sha256(cached) + "\n")
    return target


def base_gguf_key(base: Path, outtype: str, quant: str, description: str, bos_text: bool) -> str:
    """What the baseline's GGUF depends on, hashed: every file of the base model, the llama.cpp commit, the
    types, the GGUF's description and whether its add_bos_token is rewritten."""
    files = {p.relative_to(base).as_posix(): file_sha256(p) for p in sorted(base.rglob("*")) if p.is_file()}
    what = {"files": files, "llama_cpp": LLAMA_CPP_COMMIT, "outtype": outtype, "quant": quant,
            "description": description, "bos_text": bos_text}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def print_table(rows: list[dict]) -> None:
    print(f"{'file':<22} {'type':<12} {'size':>10} {'bpw':>6} {'load s':>7} {'ppl':>9}  sha256")
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "-"  # no data.eval: none
        print(f"{r['file']:<22} {r['type']:<12} {r['size_bytes'] / 2**20:>8.2f}MB {r['bits_per_weight']:>6.2f} "
              f"{r['load_seconds']:>7.3f} {ppl:>9}  {r['sha256'][:16]}")


def without_torch() -> None:
    """Keep torch out of this process. The checks need the trained tokenizer only, but transformers imports
    torch whenever it is installed (modeling_rope_utils), which cost the convert stage about 2 s of CPU beside
    the converter (a subprocess with its own torch) and 1 s at exit on 2 vCPUs (`invoke bench`'s profile).
    A None in sys.modules makes an import fail and importlib.util.find_spec, transformers' test, say absent."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # not "PyTorch was not found" on every run


def main(argv: list[str] | None = None) -> int:
    without_torch()
    return stage_main(STAGE, "Convert the run's merged model to GGUF and quantize it.", convert, (ConvertError,), argv)


if __name__ == "__main__":
    sys.exit(main())
