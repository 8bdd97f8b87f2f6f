"""The convert rows: `invoke convert` against convert_hf_to_gguf.py + llama-quantize run by hand in the same
image on the same merged model, as a whole and phase against phase."""

from __future__ import annotations

import json
import shutil
import statistics

from finetune.bench.common import Row, Session
from finetune.core import layout
from finetune.core.config import RunConfig
from finetune.host import containers


def run(b: Session) -> None:
    config = b.bench_config()
    walls, cores, hand_walls, hand_cores, reports = [], [], [], [], []
    for i in range(b.repeats):
        walls.append(b.invoke(["convert"], force=True))
        report = json.loads((layout.stage_dir(b.run_dir, "convert") / layout.CONVERT_REPORT).read_text())
        reports.append(b.with_overheads("convert", walls[-1], report["seconds"]))
        cores.append(report["seconds"]["convert_hf_to_gguf"] + report["seconds"]["llama-quantize"])
        wall, inside = by_hand(b, config)
        hand_walls.append(wall)
        hand_cores.append(inside)
        print(f"bench: convert {i + 1}/{b.repeats}: invoke convert {walls[-1]:.1f} s; by hand {wall:.1f} s",
              flush=True)
    name = "convert_hf_to_gguf.py + llama-quantize by hand"
    b.add(Row("convert", "wall time of `invoke convert`", "s", walls, f"{name} (docker run)", hand_walls))
    b.add(Row("convert", "the stage's convert + quantize phases", "s", cores,
              f"{name}, timed inside the container", hand_cores))
    b.profile("convert", reports)
    b.baseline_walls["convert"] = statistics.median(hand_walls)


def by_hand(b: Session, config: RunConfig) -> tuple[float, float]:
    """The two llama.cpp commands on the run's merged model, in the convert image; (wall, inside) seconds."""
    work = b.out / "hand-convert"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    full = f"/out/{layout.model_gguf(config.convert.outtype)}"
    commands = [f"python /opt/llama.cpp/convert_hf_to_gguf.py /in/merged --outfile {full} "
                f"--outtype {config.convert.outtype}"]
    commands += [f"llama-quantize {full} /out/{layout.model_gguf(q)} {q}" for q in config.convert.quant_types]
    script = ("set -e; s=$(date +%s%N); " + "; ".join(commands) +
              '; echo "by-hand-ms $(( ($(date +%s%N) - s) / 1000000 ))" > /out/seconds')
    wall = b.container("by-hand convert", layout.image_tag("convert"), [script],
                       [containers.Mount(work, "/out", read_only=False),
                        containers.Mount(layout.stage_dir(b.run_dir, "train") / layout.MERGED, "/in/merged")],
                       entrypoint=["sh", "-c"])
    inside = int((work / "seconds").read_text().split()[1]) / 1000
    shutil.rmtree(work)
    return wall, inside
