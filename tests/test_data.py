"""Datasets: the bundled Japanese support data is valid and held out properly; every bad line is reported
as file:line with what is wrong; other formats are normalized to messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.core import data

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data" / "customer_support_ja" / "train.jsonl"
EVAL = ROOT / "data" / "customer_support_ja" / "eval.jsonl"


def conversation(question: str, answer: str = "承知いたしました。", **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def good_lines(n: int) -> list[dict]:
    return [conversation(f"質問その{i}です", f"回答その{i}でございます。") for i in range(n)]


def test_bundled_dataset_is_valid_and_large_enough():
    splits, problems, warnings = data.check(TRAIN, EVAL, "messages")
    assert problems == []
    train, held_out = splits
    assert len(train.examples) >= 200 and len(held_out.examples) >= 40
    assert any("500-1000 are recommended" in w for w in warnings)
    assert data.stats(train)["multi_turn"] >= 20


def test_bundled_dataset_starts_with_the_guides_example():
    first = data.read_split(TRAIN).examples[0]
    assert first.question == "商品を返品したいです"
    assert first.messages[-1]["content"].startswith("返品承知いたしました。14日以内であれば")


def test_bundled_eval_shares_no_question_with_train():
    train_questions = {m["content"] for e in data.read_split(TRAIN).examples for m in e.messages if m["role"] == "user"}
    eval_questions = {m["content"] for e in data.read_split(EVAL).examples for m in e.messages if m["role"] == "user"}
    assert not train_questions & eval_questions


@pytest.mark.parametrize("line, expected", [
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 1: unknown role 'bot'; use system, user or assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "roles out of order: message 1 is assistant, expected user"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a"}]}, "roles out of order: message 2 is user, expected assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "message 2 (assistant): empty content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
     "no assistant turn: there is nothing to learn from this line"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "the last message is a user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "lang": "ja"},
     "unknown key 'lang'"),
    ({"text": "raw"}, "cannot tell the format from the keys (text)"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "message 1: content must be a string or a list of text parts, got int"),
    ({"messages": [{"role": "user", "content": {"text": "q"}}, {"role": "assistant", "content": "a"}]},
     "message 1: content must be a string or a list of text parts, got dict"),
    ({"prompt": "q", "completion": ["a"]}, "message 2 (assistant): content must be a string or a list of text parts, "
                                            "got list"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                {"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "a"}]},
     "message 1: content part 2 has type 'image_url'; only text parts can be trained on"),
    ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
     "message 1: content part 1 is a str, not an object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text"}]}]},
     "message 2: content part 1 is a text part without a string 'text'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": []}]},
     "message 2 (assistant): empty content"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "message 2: unknown ShareGPT speaker 'function_call'; use system, human or gpt"),
    ({"conversations": [{"from": "human", "value": "q"}, {"role": "assistant", "content": "a"}]},
     "message 2 must be an object with exactly 'from' and 'value' (ShareGPT)"),
    ({"conversations": []}, "'conversations' must be a non-empty list of {from, value} objects"),
    (conversation("q", "14日以内です", key_facts=["7日以内"]), "key fact '7日以内' does not appear in the last"),
])
def test_bad_line_is_reported_with_file_and_line(tmp_path, line, expected):
    path = write(tmp_path / "train.jsonl", [*good_lines(3), line])
    split = data.read_split(path)
    assert len(split.examples) == 3
    assert len(split.problems) == 1 and split.problems[0].startswith(f"{path}:4: {expected}")


def test_duplicate_points_at_the_first(tmp_path):
    path = write(tmp_path / "train.jsonl", [conversation("a"), conversation("b"), conversation("a")])
    assert data.read_split(path).problems == [f"{path}:3: duplicate of line 1; remove one of them"]


def test_too_long_for_max_seq_len(tmp_path):
    path = write(tmp_path / "train.jsonl", [conversation("短い"), conversation("長い" * 100)])
    count = lambda messages: sum(len(m["content"]) for m in messages)  # a tokenizer's neighbour: 1 char, 1 token
    split = data.read_split(path, max_seq_len=50, count_tokens=count)
    assert split.problems == [f"{path}:2: 209 tokens, longer than data.max_seq_len=50; "
                              "shorten the conversation or raise data.max_seq_len"]


def test_fewer_than_minimum_is_an_error(tmp_path):
    path = write(tmp_path / "train.jsonl", good_lines(49))
    _, problems, _ = data.check(path, None)
    assert problems == [f"{path}: only 49 usable examples; at least 50 are needed "
                        "(the guide: 50-100 at minimum, 500-1000 recommended, quality over quantity)"]


def test_below_recommended_is_a_warning(tmp_path):
    path = write(tmp_path / "train.jsonl", good_lines(60))
    _, problems, warnings = data.check(path, None)
    assert problems == [] and len(warnings) == 1 and "500-1000 are recommended" in warnings[0]


def test_eval_question_in_train_is_an_error(tmp_path):
    train = write(tmp_path / "train.jsonl", good_lines(60))
    held_out = write(tmp_path / "eval.jsonl", [conversation("質問その7です", "別の回答です。")])
    _, problems, _ = data.check(train, held_out)
    assert problems == [f"{held_out}:1: the same question is in the training data at {train}:8; "
                        "eval questions must be held out"]


def test_alpaca_and_prompt_completion_normalize_to_messages(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [
        {"instruction": "要約してください", "input": "本文", "output": "要約です", "system": "簡潔に"},
        {"instruction": "挨拶して", "output": "こんにちは"},
        {"prompt": "返品できますか", "completion": "14日以内であれば承ります。"},
    ])
    split = data.read_split(path)
    assert split.problems == []
    assert [e.messages for e in split.examples] == [
        ({"role": "system", "content": "簡潔に"}, {"role": "user", "content": "要約してください\n\n本文"},
         {"role": "assistant", "content": "要約です"}),
        ({"role": "user", "content": "挨拶して"}, {"role": "assistant", "content": "こんにちは"}),
        ({"role": "user", "content": "返品できますか"}, {"role": "assistant", "content": "14日以内であれば承ります。"}),
    ]


def test_fixed_format_rejects_other_lines(tmp_path):
    path = write(tmp_path / "train.jsonl", [{"prompt": "q", "completion": "a"}])
    assert data.read_split(path, fmt="alpaca").problems == [
        f"{path}:1: missing 'instruction', 'output' for the alpaca format (keys here: completion, prompt)"]


def test_cli_reports_and_exits_nonzero(tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", [*good_lines(60), "{oops"])
    config = tmp_path / "run.yaml"
    tiny = (ROOT / "configs" / "tiny-ja.yaml").read_text(encoding="utf-8")
    config.write_text(tiny.replace("data/customer_support_ja/train.jsonl", str(train)), encoding="utf-8")
    assert data.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{train}:61: not valid JSON" in err and "nothing was written" in err


def test_leading_byte_order_mark_is_ignored(tmp_path):
    """Windows editors and spreadsheet exports start UTF-8 files with a BOM; the first line is still JSON."""
    path = tmp_path / "train.jsonl"
    path.write_bytes("\ufeff".encode() + write(tmp_path / "plain.jsonl", good_lines(2)).read_bytes())
    split = data.read_split(path)
    assert split.problems == [] and len(split.examples) == 2


def test_openai_content_parts_are_joined_text(tmp_path):
    parts = [{"type": "text", "text": "商品を返品したいです"}, {"type": "text", "text": "注文番号は123です"}]
    path = write(tmp_path / "train.jsonl", [{"messages": [
        {"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "承知しました"}]}]}])
    split = data.read_split(path)
    assert split.problems == []
    assert split.examples[0].messages == ({"role": "user", "content": "商品を返品したいです\n注文番号は123です"},
                                          {"role": "assistant", "content": "承知しました"})


def test_sharegpt_maps_speakers_to_roles(tmp_path):
    line = {"id": "c1", "conversations": [{"from": "system", "value": "丁寧に"}, {"from": "human", "value": "送料は？"},
                                          {"from": "gpt", "value": "全国一律550円です。"}]}
    path = write(tmp_path / "train.jsonl", [line])
    for fmt in ("auto", "sharegpt"):
        split = data.read_split(path, fmt=fmt)
        assert split.problems == []
        assert split.examples[0].messages == ({"role": "system", "content": "丁寧に"},
                                              {"role": "user", "content": "送料は？"},
                                              {"role": "assistant", "content": "全国一律550円です。"})
        assert split.examples[0].id == "c1"
