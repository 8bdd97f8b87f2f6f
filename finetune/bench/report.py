"""bench.md: the table of every figure beside its baseline, the cost ratios flagged, and the stage profiles."""

from __future__ import annotations

from finetune.bench.common import fmt


def markdown(results: dict) -> str:
    host = results["host"]
    lines = [f"# Bench of {results['run']} ({results['config']})", "",
             f"{host['cpu']}, {host['cpus']} CPUs, GPUs: {', '.join(host['gpus']) or 'none'}; "
             f"{results['repeats']} repeats of each figure (median, min-max); "
             f"train.max_steps={results['train_steps']}; "
             f"{results['started']}, {results['seconds'] / 60:.0f} min.", "",
             "| stage | figure | ours: median (min-max) | baseline | baseline: median (min-max) | ratio |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ratio = r["ratio"]
        flag = " ⚠" if ratio is not None and ratio > results["flag_above"] else ""
        lines.append(f"| {r['stage']} | {r['figure']} | {spread(r['ours_stats'], r['unit'])} | {r['baseline_name']} | "
                     f"{spread(r['baseline_stats'], r['unit']) if r['baseline_stats'] else '-'} | "
                     f"{f'{ratio:.2f}' if ratio is not None else '-'}{flag} |")
    lines += ["", f"Ratio: the cost of ours over the baseline's (time, memory, size; for a rate, the baseline's rate "
              f"over ours). Above 1 ours costs more; ⚠ marks above {results['flag_above']:.2f}: see the profiles.",
              ""]
    for name, phases in results["profiles"].items():
        total = sum(phases.values())
        lines += [f"## Profile: {name} (median seconds per phase)", "",
                  "| phase | s | share |", "|---|---|---|"]
        lines += [f"| {p} | {fmt(s)} | {100 * s / total:.0f}% |" for p, s in phases.items()]
        lines += [f"| total | {fmt(total)} | |", ""]
    for key, value in results["details"].items():
        if isinstance(value, str):
            lines += [f"{key}: {value}", ""]
    return "\n".join(lines)


def spread(stats: dict, unit: str) -> str:
    if stats["n"] == 1:
        return f"{fmt(stats['median'])} {unit}"
    return f"{fmt(stats['median'])} ({fmt(stats['min'])}-{fmt(stats['max'])}) {unit}"
