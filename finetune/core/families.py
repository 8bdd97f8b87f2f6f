"""Chat-template families: for each, the Ollama Go TEMPLATE that renders what the family's Jinja renders.

A model keeps the chat template it was trained with; Ollama, though, renders prompts with the Go template
of the Modelfile (its own detection of a GGUF's Jinja template accepts only near-copies of the templates it
knows, and maps some families to the wrong one). So the Modelfile's TEMPLATE comes from here, chosen by
what the model's Jinja template *does*, not by its name:

- Each Family has a Go template, its stop strings, the token that ends an assistant turn (which the loss
  keeps, so the model learns to stop), the Jinja variables training fixes (Llama 3's date, which the real
  template takes from the clock), and `render`: the Go template's output written in Python.
- `PROBES` are conversations (with and without a system prompt, multi-turn, Japanese, line breaks). The
  train stage renders them with the model's Jinja template (transformers' apply_chat_template) and keeps the
  family whose `render` gives the same strings, byte for byte, leading BOS aside (serving adds BOS as a token,
  per the GGUF's add_bos_token). No family matching is an error that names the families, never a guess.
- That `render` equals Ollama's rendering of the Go template is proven per family with a real Ollama
  (tests/test_families.py, `invoke families`).

For some architectures Ollama ignores a TEMPLATE and renders with its own code (Gemma 4): such a family names
that renderer and parser instead, and its `render` is that renderer's output written in Python, proven the
same way. PROMPT_CASES are families whose vocabulary the pinned source lacks (Mistral Nemo's tekken): only
their prompts are compared.

Jinja that a Go template cannot express is left out on purpose: Llama 3 trims each message (Go templates
have no trim), so contents with leading or trailing white space render differently; the probes keep to
contents without it (README: "Known limits").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from finetune.core.templates import render_chatml

Messages = Sequence[dict]


def _leading_system(messages: Messages) -> tuple[str | None, Messages]:
    """(the first message's content if it is a system turn, else None; the messages after it)."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


@dataclass(frozen=True)
class Family:
    """A chat format that this project trains and serves identically (see the module docstring)."""

    name: str
    go_template: str
    stop: tuple[str, ...]  # PARAMETER stop: the end of a turn, and the start of a next one
    end_of_turn: str  # the token that closes an assistant turn: in the loss, and an end-of-generation token
    render: Callable[[Messages, bool, bool | None], str] | None  # (messages, add_generation_prompt, think) -> text
    template_vars: dict = field(default_factory=dict)  # fixed Jinja variables of training
    thinking: bool = False  # the template has a thinking switch (Ollama's `think`, Jinja's enable_thinking)
    reference: str = ""  # the template file, in llama.cpp's models/templates, of the model it was written from
    # Ollama's built-in renderer and parser in place of a Go TEMPLATE (Ollama ignores TEMPLATE for some
    # architectures, Gemma 4 among them); `render` is then that renderer's output written in Python.
    renderer: str = ""
    parser: str = ""
    # The served prompt carries the BOS text (Ollama's Gemma 4 renderer writes "<bos>"), so the GGUF must not
    # make the tokenizer add a second BOS: the convert stage writes add_bos_token = false.
    bos_text: bool = False


def _render_chatml(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    return render_chatml(messages, add_generation_prompt)


CHATML_GO = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _render_qwen25(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    default = "" if messages and messages[0]["role"] == "system" else f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
    return default + _render_chatml(messages, add_generation_prompt)


QWEN25_GO = ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
             + QWEN_SYSTEM + "<|im_end|>\n{{ end }}" + CHATML_GO)

EMPTY_THINK = "<think>\n\n</think>\n\n"


def _render_qwen3(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    """Qwen 3: ChatML; an assistant turn after the last user turn that ends the conversation carries an empty
    thinking block; the generation prompt carries one when thinking is switched off."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    text = ""
    for i, m in enumerate(messages):
        body = m["content"]
        if m["role"] == "assistant" and i > last_user and i == len(messages) - 1:
            body = EMPTY_THINK + body.lstrip("\n")
        text += f"<|im_start|>{m['role']}\n{body}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n" + (EMPTY_THINK if think is False else "")
    return text


# The never-true `.Thinking` branch names the thinking tags, from which Ollama infers that the model thinks
# (so `think` is accepted and the answer's <think> part is returned as `thinking`); it renders nothing, as
# Qwen 3's Jinja drops the thinking of every answer before the last user turn.
QWEN3_GO = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if and .Thinking (eq .Role "none") }}<think>{{ .Thinking }}'
    "</think>{{ end }}{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    '{{ if and $.IsThinkSet (not $.Think) }}' + EMPTY_THINK + "{{ end }}"
)

LLAMA3_DATE = "26 Jul 2024"  # the real template's own fallback; Llama 3.2's takes today's date otherwise
LLAMA3_HEAD = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: "


def _render_llama3(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    system, rest = _leading_system(messages)
    text = f"{LLAMA3_HEAD}{LLAMA3_DATE}\n\n{system or ''}<|eot_id|>"
    text += "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in rest)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


LLAMA3_GO = (
    LLAMA3_HEAD + LLAMA3_DATE + "\n\n"
    + '{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role "system") }}{{ $m.Content }}{{ end }}{{ end }}'
    + "<|eot_id|>"
    + '{{ range $i, $m := .Messages }}{{ if not (and (eq $i 0) (eq $m.Role "system")) }}'
    + "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>{{ end }}{{ end }}"
    + "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

PHI3_EOS = "<|endoftext|>"


def _render_phi3(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    """Phi-3.5: an empty system turn is left out; a finished conversation ends with the EOS text."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages
                   if m["role"] in ("user", "assistant") or (m["role"] == "system" and m["content"]))
    return text + ("<|assistant|>\n" if add_generation_prompt else PHI3_EOS)


PHI3_GO = (
    '{{- range .Messages }}{{ if or (ne .Role "system") .Content }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n'
    "{{ end }}{{ end }}<|assistant|>\n"
)

GEMMA4_EMPTY_THOUGHT = "<|channel>thought\n<channel|>"


def _render_gemma4(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    """Gemma 4 (the 26B/31B template, Ollama's gemma4-large renderer), thinking off: the system turn is a
    turn of its own; the assistant's role is "model"; every content is trimmed (the answers' thinking
    channel stripped); the generation prompt opens an empty thought channel, which a finished answer in the
    history no longer shows (so training puts each answer after the generation prompt: train/chat.py)."""
    system, rest = _leading_system(messages)
    text = f"<|turn>system\n{system.strip()}<turn|>\n" if system is not None else ""
    for m in rest:
        role = "model" if m["role"] == "assistant" else m["role"]
        text += f"<|turn>{role}\n{m['content'].strip()}<turn|>\n"
    return text + (f"<|turn>model\n{GEMMA4_EMPTY_THOUGHT}" if add_generation_prompt else "")


def _render_mistral_nemo(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    """Mistral Nemo: no turn markers but [INST]...[/INST] around the user's text and </s> after each answer;
    the system prompt joins the last user turn, and only when the conversation ends with it (a finished
    answer in the history no longer shows it, so each answer trains after its own prompt: train/chat.py); no
    generation prompt."""
    system, rest = _leading_system(messages)
    text = ""
    for i, m in enumerate(rest):
        if m["role"] == "user":
            joined = f"{system}\n\n" if system is not None and i == len(rest) - 1 else ""
            text += f"[INST]{joined}{m['content']}[/INST]"
        elif m["role"] == "assistant":
            text += m["content"] + "</s>"
    return text


# Go: $system, the last system message's content, and $hasSystem, whether there is one (Ollama passes the
# system prompt among .Messages).
LAST_SYSTEM_GO = (
    '{{- $system := "" }}{{- $hasSystem := false }}'
    '{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ $hasSystem = true }}{{ end }}{{ end }}'
)

MISTRAL_NEMO_GO = (
    LAST_SYSTEM_GO
    + '{{- range $i, $m := .Messages }}'
    '{{- if eq $m.Role "user" }}[INST]{{ if and $hasSystem (eq (len (slice $.Messages $i)) 1) }}{{ $system }}\n\n'
    '{{ end }}{{ $m.Content }}[/INST]'
    '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>{{ end }}{{ end }}'
)


DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"


def _render_deepseek_r1(messages: Messages, add_generation_prompt: bool, think: bool | None = None) -> str:
    """DeepSeek-R1-Distill, thinking off (as llama.cpp's copy of the Distill-Qwen template renders when
    enable_thinking is not true): the last system prompt first, with no marker; <｜User｜> and <｜Assistant｜>
    before each turn, an answer's thinking dropped and EOS after it; the generation prompt opens and closes an
    empty thinking block, which a finished answer in the history no longer shows (train/chat.py)."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    text = systems[-1] if systems else ""
    for m in messages:
        if m["role"] == "user":
            text += "<｜User｜>" + m["content"]
        elif m["role"] == "assistant":
            text += "<｜Assistant｜>" + m["content"].split("</think>")[-1] + DEEPSEEK_EOS
    return text + ("<｜Assistant｜><think>\n</think>" if add_generation_prompt else "")


DEEPSEEK_R1_GO = (
    LAST_SYSTEM_GO
    + "{{- $system }}"
    '{{- range .Messages }}{{ if eq .Role "user" }}<｜User｜>{{ .Content }}'
    '{{ else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}' + DEEPSEEK_EOS + "{{ end }}{{ end }}"
    "<｜Assistant｜><think>\n</think>"
)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # the offline toy, and any model trained on plain ChatML
    Family("chatml", CHATML_GO, ("<|im_end|>", "<|im_start|>"), "<|im_end|>", _render_chatml),
    Family("qwen2.5", QWEN25_GO, ("<|im_end|>", "<|im_start|>"), "<|im_end|>", _render_qwen25,
           reference="Qwen-Qwen2.5-7B-Instruct.jinja"),
    Family("qwen3", QWEN3_GO, ("<|im_end|>", "<|im_start|>"), "<|im_end|>", _render_qwen3, thinking=True,
           reference="Qwen-Qwen3-0.6B.jinja"),
    # Llama 3.1 and 3.2 Instruct (both proven by `invoke families`)
    Family("llama3", LLAMA3_GO, ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"), "<|eot_id|>",
           _render_llama3, template_vars={"date_string": LLAMA3_DATE},
           reference="meta-llama-Llama-3.2-3B-Instruct.jinja"),
    # Phi-3 and Phi-3.5 mini instruct
    Family("phi3", PHI3_GO, ("<|end|>", "<|user|>", "<|assistant|>", PHI3_EOS), "<|end|>", _render_phi3,
           reference="microsoft-Phi-3.5-mini-instruct.jinja"),
    # Gemma 4 26B/31B instruct, thinking off. Ollama renders it with its own gemma4-large renderer (Ollama
    # ignores a TEMPLATE for gemma4 GGUFs); the passthrough parser keeps the model from being taken as a
    # thinking one, which Ollama would switch on for every request that does not say `think`.
    Family("gemma4", "", ("<turn|>", "<|turn>"), "<turn|>", _render_gemma4, renderer="gemma4-large",
           parser="passthrough", bos_text=True, reference="google-gemma-4-31B-it.jinja"),
    # DeepSeek-R1-Distill (Qwen and Llama), thinking off: the reference template is llama.cpp's copy of the
    # Distill-Qwen one, which closes the thinking block when enable_thinking is not true. DeepSeek's own
    # template opens it (<think>\n) whatever the switch; answers trained there would be answers inside an
    # unclosed thinking block, so that template renders like no family and is refused.
    Family("deepseek-r1", DEEPSEEK_R1_GO, (DEEPSEEK_EOS, "<｜User｜>"), DEEPSEEK_EOS, _render_deepseek_r1,
           reference="deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"),
    # Mistral Nemo Instruct 2407 (tekken vocabulary: not in the pinned source, so only its prompts are proven)
    Family("mistral-nemo", MISTRAL_NEMO_GO, ("</s>", "[INST]"), "</s>", _render_mistral_nemo,
           reference="mistralai-Mistral-Nemo-Instruct-2407.jinja"),
)}

# Conversations every family's Jinja and Go template must render identically (see the module docstring).
_Q1, _A1 = "商品を返品したいです", "返品承知いたしました。14日以内であれば返品を承ります。"
_Q2 = "送料は？\n着払いでも\"いい\"ですか？"
PROBES: tuple[tuple[dict, ...], ...] = (
    ({"role": "user", "content": _Q1},),
    ({"role": "system", "content": "あなたは丁寧なサポート担当です。"}, {"role": "user", "content": _Q1}),
    ({"role": "user", "content": _Q1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _Q2}),
    ({"role": "system", "content": "Be brief.\nAnswer in Japanese."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "こんにちは"}, {"role": "user", "content": _Q2}),
)


def probe_conversations() -> list[tuple[list[dict], bool]]:
    """(messages, add_generation_prompt): every probe with the generation prompt, then each answered (the
    full text training sees)."""
    answered = [[*p, {"role": "assistant", "content": _A1}] for p in PROBES]
    return [(list(p), True) for p in PROBES] + [(a, False) for a in answered]


def probe_renderings(family: Family, think: bool | None = None) -> list[str]:
    """The family's rendering of probe_conversations(), in that order. The train stage compares these with
    the model's Jinja template."""
    return [family.render(messages, gen, think) for messages, gen in probe_conversations()]


def custom(go_template: str, end_of_turn: str) -> Family:
    """A family of the user's own (model.go_template, model.end_of_turn): no Python twin, so the train stage
    cannot compare it; `invoke serve` compares what Ollama renders with it against the trained template."""
    return Family("custom", go_template, (end_of_turn,), end_of_turn, render=None)


def supported() -> str:
    """The family names, for error messages."""
    return ", ".join(FAMILIES)


@dataclass(frozen=True)
class Case:
    """One row of the family matrix (`invoke families`): a tiny random model with a real vocabulary and
    template from llama.cpp's models/ (finetune/train/vocab_models.py), trained, converted and served."""

    name: str
    family: str
    vocab: str  # models/ggml-vocab-<vocab>.gguf
    template: str  # models/templates/<template>
    architecture: str  # the transformers class
    eos: str  # the tokenizer's eos_token, as the real instruct model's tokenizer_config.json sets it
    added_tokens: tuple[tuple[int, str, bool], ...] = ()  # (id, text, special) the vocabulary file predates
    spm_pieces: int = 0  # SentencePiece: pieces in tokenizer.model; the rest are added tokens
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    bos: str = ""  # the tokenizer's bos_token, where it is not the vocabulary file's
    model_config: tuple[tuple[str, object], ...] = ()  # the architecture's own settings beside the toy sizes


# Qwen 2.5's added tokens after <|im_end|> (151645); the qwen2 vocabulary file has [PAD] there. Qwen 3 adds four.
_QWEN25_ADDED = tuple((151646 + i, t, t.startswith("<|")) for i, t in enumerate((
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")))
_QWEN3_ADDED = _QWEN25_ADDED + tuple((151665 + i, t, False) for i, t in enumerate((
    "<tool_response>", "</tool_response>", "<think>", "</think>")))

# DeepSeek-R1-Distill-Qwen's added tokens from <|endoftext|> (151643) on, as its tokenizer_config.json has them:
# its own markers where Qwen 2.5 has <|endoftext|>, <|im_start|> and <|im_end|>, then Qwen 2.5's, shifted.
_DEEPSEEK_QWEN_ADDED = tuple((151643 + i, t, s) for i, (t, s) in enumerate((
    (DEEPSEEK_EOS, True), ("<｜User｜>", False), ("<｜Assistant｜>", False), ("<｜begin▁of▁sentence｜>", True),
    ("<|EOT|>", False), ("<think>", False), ("</think>", False), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True),
    ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False))))

CASES: tuple[Case, ...] = (
    Case("llama3.1", "llama3", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct.jinja", "LlamaForCausalLM",
         "<|eot_id|>"),
    Case("llama3.2", "llama3", "llama-bpe", "meta-llama-Llama-3.2-3B-Instruct.jinja", "LlamaForCausalLM",
         "<|eot_id|>"),
    Case("qwen2.5", "qwen2.5", "qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen2ForCausalLM", "<|im_end|>",
         _QWEN25_ADDED),
    Case("qwen3", "qwen3", "qwen2", "Qwen-Qwen3-0.6B.jinja", "Qwen3ForCausalLM", "<|im_end|>", _QWEN3_ADDED),
    Case("phi3.5", "phi3", "phi-3", "microsoft-Phi-3.5-mini-instruct.jinja", "Phi3ForCausalLM", PHI3_EOS,
         spm_pieces=32000, target_modules=("qkv_proj", "o_proj")),
    # One sliding and one full attention layer, no per-layer input embeddings (as the 31B), tied embeddings.
    Case("gemma4", "gemma4", "gemma-4", "google-gemma-4-31B-it.jinja", "Gemma4ForCausalLM", "<eos>",
         model_config=(("hidden_size_per_layer_input", 0), ("layer_types", ["sliding_attention", "full_attention"]),
                       ("tie_word_embeddings", True))),
    Case("deepseek-r1-qwen", "deepseek-r1", "qwen2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
         "Qwen2ForCausalLM", DEEPSEEK_EOS, _DEEPSEEK_QWEN_ADDED, bos="<｜begin▁of▁sentence｜>"),
)


@dataclass(frozen=True)
class PromptCase:
    """A family of the matrix whose vocabulary the pinned source lacks: only its prompts are compared. The
    real template renders the probes in the train image (with the family's BOS and EOS texts); Ollama renders
    them with the family's Modelfile on a stand-in case's GGUF (a prompt's text does not depend on the
    vocabulary; its ids do, so they are not compared)."""

    name: str
    family: str
    template: str  # models/templates/<template>
    special: tuple[tuple[str, str], ...]  # the tokenizer's special tokens the template uses: (name, text)
    vocab: str  # what the source lacks, for the table
    stand_in: str  # the case whose GGUF Ollama loads


PROMPT_CASES: tuple[PromptCase, ...] = (
    PromptCase("mistral-nemo", "mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja",
               (("bos_token", "<s>"), ("eos_token", "</s>")), "tekken: not in the source", "llama3.2"),
)
