"""The eval gate and metrics without a server: each eval.gate threshold fails exactly when missed, naming the
key; chrF is sacrebleu's; the Japanese share counts kana and kanji only."""

from __future__ import annotations

import pytest
from support import ROOT

from finetune.core.config import load_config
from finetune.evaluation.evaluate import chrf, gate_failures, japanese_ratio

# sacrebleu 2.6.0, CHRF() defaults (chrF2), on the two pairs below.
CAT, JA = 64.5779420625287, 20.936735531448036
METRICS = {"chrf": 60.0, "key_fact_rate": 0.8, "stop_rate": 1.0}


def gated(*overrides: str):
    return load_config(ROOT / "configs" / "tiny-ja.yaml", [f"eval.gate.{o}" for o in overrides], root=ROOT)


def test_no_gate_no_failures():
    assert gate_failures(gated(), METRICS, {"chrf": 59.0}) == []


def test_chrf_gain_is_measured_against_the_baseline_or_zero_without_one():
    assert gate_failures(gated("chrf_gain=10"), METRICS, {"chrf": 50.0}) == []
    assert gate_failures(gated("chrf_gain=10"), METRICS, {"chrf": 50.01}) == [
        "chrf gain over the baseline is 9.99 < 10.0 (eval.gate.chrf_gain)"]
    assert gate_failures(gated("chrf_gain=60"), METRICS, None) == []  # no baseline served: the gain over 0


@pytest.mark.parametrize("key", ["key_fact_rate", "stop_rate"])
def test_rate_thresholds_fail_below_and_pass_at_the_threshold(key):
    assert gate_failures(gated(f"{key}={METRICS[key]}"), METRICS, None) == []
    assert gate_failures(gated(f"{key}=1.0"), METRICS | {key: 0.5}, None) == [f"{key} is 0.5 < 1.0 (eval.gate.{key})"]


def test_a_rate_that_could_not_be_measured_fails_its_gate():
    """No key facts in the questions: key_fact_rate is None, which cannot meet a threshold."""
    assert gate_failures(gated("key_fact_rate=0.1"), METRICS | {"key_fact_rate": None}, None) == [
        "key_fact_rate is None < 0.1 (eval.gate.key_fact_rate)"]


def test_every_missed_threshold_is_reported_together():
    failures = gate_failures(gated("chrf_gain=100", "key_fact_rate=0.9", "stop_rate=1.0"),
                             METRICS | {"stop_rate": 0.5}, {"chrf": 0.0})
    assert [f.split(" (")[1] for f in failures] == ["eval.gate.chrf_gain)", "eval.gate.key_fact_rate)",
                                                    "eval.gate.stop_rate)"]


def test_chrf_is_sacrebleus_chrf2_reference_numbers():
    """Reference numbers computed with sacrebleu 2.6.0 (`sacrebleu -m chrf`): whitespace is ignored, n = 1..6."""
    assert chrf(["返品承知いたしました。"], ["返品承知いたしました。"]) == pytest.approx(100.0)
    assert chrf(["abc"], ["xyz"]) == 0.0
    assert chrf(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(CAT, abs=1e-6)
    answers, references = ["14日以内なら返品できます", "送料は無料"], ["14日以内であれば返品を承ります", "送料はお客様負担です"]
    assert chrf(answers, references) == pytest.approx(JA, abs=1e-6)


def test_japanese_ratio_counts_kana_and_kanji_among_non_space_characters():
    assert japanese_ratio("返品 です") == 1.0
    assert japanese_ratio("OK です") == 0.5
    assert japanese_ratio("Return it within 14 days") == 0.0 and japanese_ratio("  ") == 0.0
