"""`invoke eval` on the offline default, through the real Ollama: every metric for the baseline and each
fine-tuned quant, the fine-tuned toy beating the baseline on the questions it was trained on, a
self-contained HTML report that headless Chromium renders, and a gate that fails the task."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest
from support import invoke, output, run_dir, sets

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EVAL = ("serve.port=11537", "eval.split=train")
METRICS = {"chrf", "key_fact_rate", "japanese_ratio", "answer_chars", "stop_rate", "latency_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def evaluated(trained_run):
    args = [x for stage in ("convert", "serve") for x in (stage, *sets(trained_run, *EVAL))]
    done = invoke(*args)
    assert done.returncode == 0, output(done)
    done = invoke("eval", *sets(trained_run, *EVAL))
    assert done.returncode == 0, output(done)
    yield trained_run, done.stdout
    invoke("stop", *sets(trained_run, *EVAL))


def test_every_metric_for_every_model_and_the_fine_tuned_model_beats_the_baseline(evaluated):
    run, stdout = evaluated
    results = json.loads((run_dir(run) / "eval" / "results.json").read_text())
    models = results["models"]
    assert list(models) == ["baseline", "fine-tuned Q8_0", "fine-tuned f16"]
    for entry in models.values():
        assert set(entry["metrics"]) == METRICS and entry["metrics"]["latency_s"] > 0
        # tokens/s needs Ollama's final message, which 0.24.0 drops on some answers that run to num_predict
        # (all 60 of the baseline's on an AMD EPYC, whose weights differ: README, Reproducibility)
        unmeasured = entry["answers_without_final_message"] == len(entry["answers"])
        assert None not in (v for k, v in entry["metrics"].items() if k != "tokens_per_s")
        assert (entry["metrics"]["tokens_per_s"] is None) == unmeasured
        assert len(entry["answers"]) == results["questions"] == 60
    assert models["fine-tuned Q8_0"]["answers_without_final_message"] == 0  # it stops by itself
    tuned, baseline = models["fine-tuned Q8_0"]["metrics"], models["baseline"]["metrics"]
    print(f"training questions: fine-tuned {tuned}, baseline {baseline}")
    assert tuned["key_fact_rate"] > 0.5 > baseline["key_fact_rate"]
    assert tuned["chrf"] > baseline["chrf"] + 20
    assert tuned["stop_rate"] == 1.0 and tuned["japanese_ratio"] > baseline["japanese_ratio"]
    assert "| fine-tuned Q8_0 |" in stdout


def test_html_report_is_self_contained_with_the_side_by_side_table_and_plots(evaluated):
    run, _ = evaluated
    page = (run_dir(run) / "eval" / "report.html").read_text(encoding="utf-8")
    assert f"<title>Evaluation of {run}</title>" in page
    side = page.split('<table id="side-by-side">')[1].split("</table>")[0]
    assert side.count("<tr>") == 1 + 6  # header + eval.side_by_side questions
    assert "返品承知いたしました" in side
    assert page.count('src="data:image/svg+xml;base64,') == 4  # loss, chrF, key facts, size vs perplexity
    assert 'src="http' not in page and "<script" not in page


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    run, _ = evaluated
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium package (.ci/run installs it)")
        pytest.skip("no chromium here")
    page = f"file://{(run_dir(run) / 'eval' / 'report.html').resolve()}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'p'}"]
    shot = run_dir(run) / "eval-screenshot.png"  # beside eval/, which the gate test writes again
    done = subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,1600", page],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])  # the PNG's IHDR
    assert (width, height) == (1280, 1600) and shot.stat().st_size > 50_000
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert f"<title>Evaluation of {run}</title>" in dom and 'id="models"' in dom and 'id="side-by-side"' in dom


def test_a_gate_that_cannot_be_met_fails_eval_naming_the_metric(evaluated):
    run, _ = evaluated
    done = invoke("eval", *sets(run, *EVAL, "eval.gate.chrf_gain=1000", "eval.gate.stop_rate=1.0"))
    assert done.returncode == 1
    assert "eval: gate failed: chrf gain over the baseline is " in done.stderr
    assert "< 1000.0 (eval.gate.chrf_gain)" in done.stderr
    assert "stop_rate" not in done.stderr.split("gate failed:")[1]  # the met threshold is not reported
