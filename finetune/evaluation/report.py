"""The eval report: report.md for terminals and reviews, report.html for people (self-contained: the plots
are SVG embedded as data: images, so it opens offline and can be mailed as one file)."""

from __future__ import annotations

import base64
import html as html_
from collections.abc import Sequence

from finetune.core import layout
from finetune.core.config import RunConfig

COLUMNS = [("chrf", "chrF", "{:.1f}"), ("key_fact_rate", "key facts", "{:.0%}"),
           ("japanese_ratio", "Japanese", "{:.0%}"), ("answer_chars", "chars", "{:.0f}"),
           ("stop_rate", "stopped", "{:.0%}"), ("latency_s", "latency s", "{:.2f}"), ("tokens_per_s", "tok/s", "{:.0f}")]
SHOWN_CHARS = 240
COLORS = ["#8c8c8c", "#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057"]


QUANT_COLUMNS = [("file", "file", "{}"), ("type", "type", "{}"), ("size_mb", "MB", "{:.2f}"),
                 ("bits_per_weight", "bits/weight", "{:.2f}"), ("perplexity", "perplexity", "{:.2f}"),
                 ("kl_divergence", "KL vs full", "{:.5f}"), ("same_top_token", "same top token %", "{:.1f}")]


def quant_cells(row: dict) -> list[str]:
    values = {**row, "size_mb": row["size_bytes"] / 2**20}
    return [cell(values.get(key), fmt) for key, _, fmt in QUANT_COLUMNS]


def cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def side_by_side(results: dict, asked: Sequence, config: RunConfig) -> list[tuple[str, str, str, str]]:
    """(question, reference, baseline answer, fine-tuned answer) for the first eval.side_by_side questions."""
    models = results["models"]
    tuned = models[layout.tuned_label(config.serve.quant)]["answers"]
    none = [{"answer": "-"}] * len(asked)
    baseline = models[layout.BASELINE_LABEL]["answers"] if layout.BASELINE_LABEL in models else none
    rows = []
    for q, b, t in list(zip(asked, baseline, tuned))[: config.eval.side_by_side]:
        rows.append((q.messages[-1]["content"], q.reference, shorten(b["answer"]), shorten(t["answer"])))
    return rows


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """An answer cut for the table (results.json keeps it whole): a runaway one would fill the page."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def markdown(results: dict, asked: Sequence, config: RunConfig) -> str:
    lines = [f"# Evaluation of {results['run']}", "",
             f"{results['questions']} questions from the {results['split']} split, greedy decoding.", "",
             "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for label, entry in results["models"].items():
        m = entry["metrics"]
        lines.append(f"| {label} | " + " | ".join(cell(m[k], f) for k, _, f in COLUMNS) + " |")
    if results["quants"]:
        lines += ["", "| " + " | ".join(title for _, title, _ in QUANT_COLUMNS) + " |", "|---" * len(QUANT_COLUMNS) + "|"]
        lines += ["| " + " | ".join(quant_cells(q)) + " |" for q in results["quants"]]
    lines += ["", "| question | reference | baseline | fine-tuned |", "|---|---|---|---|"]
    for row in side_by_side(results, asked, config):
        lines.append("| " + " | ".join(x.replace("|", "\\|").replace("\n", "<br>") for x in row) + " |")
    failures = results["gate"]["failures"]
    lines += ["", f"Gate: {'FAILED: ' + '; '.join(failures) if failures else 'passed'}", ""]
    return "\n".join(lines)


def html(results: dict, asked: Sequence, config: RunConfig, curve: list[dict]) -> str:
    e = html_.escape
    title = f"Evaluation of {results['run']}"
    models = results["models"]
    rows = "".join(f"<tr><th>{e(label)}</th>" + "".join(f"<td>{cell(entry['metrics'][k], f)}</td>" for k, _, f in COLUMNS)
                   + "</tr>" for label, entry in models.items())
    header = "".join(f"<th>{t}</th>" for _, t, _ in COLUMNS)
    plots = [bars("chrF against the reference answers", {k: v["metrics"]["chrf"] for k, v in models.items()}, 100),
             bars("key facts stated (%)", {k: 100 * (v["metrics"]["key_fact_rate"] or 0) for k, v in models.items()}, 100)]
    if curve:
        plots.insert(0, lines("training loss", {
            "train loss": [(r["step"], r["loss"]) for r in curve if "loss" in r],
            "eval loss": [(r["step"], r["eval_loss"]) for r in curve if "eval_loss" in r]}))
    quants = [q for q in results["quants"] if q.get("perplexity")]
    if quants:
        plots.append(scatter("size vs perplexity per GGUF", [(q["type"], q["size_bytes"] / 2**20, q["perplexity"])
                                                            for q in quants], "MB", "perplexity"))
    quant_rows = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in quant_cells(q)) + "</tr>"
                         for q in results["quants"])
    quant_header = "".join(f"<th>{t}</th>" for _, t, _ in QUANT_COLUMNS)
    pairs = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>"
                    for row in side_by_side(results, asked, config))
    failures = results["gate"]["failures"]
    gate = (f"<p class=fail>Gate failed: {e('; '.join(failures))}</p>" if failures else "<p>Gate: passed</p>")
    return f"""<!doctype html>
<html lang="ja"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222 }}
table {{ border-collapse: collapse; margin: 1em 0 }} th, td {{ border: 1px solid #ccc; padding: 4px 8px;
text-align: left; vertical-align: top }} thead th {{ background: #f0f0f0 }} .fail {{ color: #b00020 }}
.plots img {{ margin: 0 1em 1em 0; border: 1px solid #eee; vertical-align: top }}
</style></head><body>
<h1>{e(title)}</h1>
<p>{results['questions']} questions from the {e(results['split'])} split, greedy decoding, through Ollama.</p>
{gate}
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th>{header}</tr></thead><tbody>{rows}</tbody></table>
<div class="plots">{''.join(embed(p) for p in plots)}</div>
<h2>Quantization</h2>
<table id="quants"><thead><tr>{quant_header}</tr></thead>
<tbody>{quant_rows}</tbody></table>
<h2>Side by side</h2>
<table id="side-by-side"><thead><tr><th>question</th><th>reference</th><th>baseline</th><th>fine-tuned</th></tr></thead>
<tbody>{pairs}</tbody></table>
</body></html>
"""


def embed(svg: str) -> str:
    """An SVG as an <img> with a data: URL (self-contained)."""
    return f'<img alt="plot" src="data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()}">'


def _frame(title: str, body: str, width: int = 420, height: int = 260) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html_.escape(title)}</text>{body}</svg>')


def bars(title: str, values: dict[str, float], top: float) -> str:
    """Horizontal bars, one per model, scaled to `top`."""
    body, y = "", 34
    for i, (label, value) in enumerate(values.items()):
        width = 210 * max(0.0, min(value, top)) / top
        body += (f'<text x="150" y="{y + 13}" text-anchor="end">{html_.escape(label)}</text>'
                 f'<rect x="156" y="{y}" width="{width:.1f}" height="18" fill="{COLORS[i % len(COLORS)]}"/>'
                 f'<text x="{160 + width:.1f}" y="{y + 13}">{value:.1f}</text>')
        y += 26
    return _frame(title, body, height=y + 10)


def _scale(values: list[float], lo_px: float, hi_px: float):
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return lambda v: lo_px + (v - lo) / span * (hi_px - lo_px)


def lines(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """Line plot of each series (x, y); axes from the data."""
    points = [p for s in series.values() for p in s]
    if not points:
        return _frame(title, "")
    sx, sy = _scale([p[0] for p in points], 50, 400), _scale([p[1] for p in points], 230, 30)
    body = '<line x1="50" y1="230" x2="400" y2="230" stroke="#888"/><line x1="50" y1="30" x2="50" y2="230" stroke="#888"/>'
    ys = [p[1] for p in points]
    body += f'<text x="46" y="34" text-anchor="end">{max(ys):.2f}</text><text x="46" y="230" text-anchor="end">{min(ys):.2f}</text>'
    body += f'<text x="400" y="244" text-anchor="end">step {max(p[0] for p in points):.0f}</text>'
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[(i + 1) % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        body += f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>'
        body += f'<text x="300" y="{44 + 14 * i}" fill="{color}">{html_.escape(name)}</text>'
    return _frame(title, body)


def scatter(title: str, points: list[tuple[str, float, float]], x_label: str, y_label: str) -> str:
    sx, sy = _scale([p[1] for p in points], 70, 230), _scale([p[2] for p in points], 215, 50)
    body = '<line x1="50" y1="230" x2="400" y2="230" stroke="#888"/><line x1="50" y1="30" x2="50" y2="230" stroke="#888"/>'
    body += f'<text x="400" y="248" text-anchor="end">{html_.escape(x_label)}</text>'
    body += f'<text x="46" y="30" text-anchor="end" transform="rotate(-90 46 30)">{html_.escape(y_label)}</text>'
    for i, (label, x, y) in enumerate(points):
        body += (f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{COLORS[(i + 1) % len(COLORS)]}"/>'
                 f'<text x="{sx(x) + 8:.1f}" y="{sy(y) + 4:.1f}">{html_.escape(label)} ({x:.1f} MB, {y:.4g})</text>')
    return _frame(title, body)
