"""The pipeline rows: `invoke train convert serve` cold and with nothing changed, against the plain tools one
after another; and the size of every image."""

from __future__ import annotations

import shutil

from finetune.bench.common import Row, Session
from finetune.host import containers
from finetune.serve import server

# Image sizes as the closing note of each stage's issue gave them, to see growth.
NOTED_BYTES = {"finetune-base:bookworm": 117e6, "finetune-train": 6.64e9, "finetune-convert": 6.25e9,
               "finetune-ollama": 235e6, "finetune-serve": 235e6}


def run(b: Session) -> None:
    config = b.bench_config()
    cold, warm = [], []
    for i in range(b.repeats):
        server.stop(config)
        shutil.rmtree(b.run_dir)
        cold.append(b.invoke(["train", "convert", "serve"]))
        warm.append(b.invoke(["train", "convert", "serve"]))
        print(f"bench: pipeline {i + 1}/{b.repeats}: cold {cold[-1]:.1f} s, nothing changed {warm[-1]:.1f} s",
              flush=True)
    server.stop(config)
    packing = "on" if b.config.train.packing else "off"
    by_hand = [b.baseline_walls[f"train, packing {packing}"] + b.baseline_walls["convert"]
               + b.baseline_walls["serve"]]
    name = "plain TRL + llama.cpp + ollama by hand (sum of their medians above)"
    b.add(Row("pipeline", "`invoke train convert serve` from an empty run directory", "s", cold, name, by_hand))
    b.add(Row("pipeline", "`invoke train convert serve` again, nothing changed", "s", warm,
              "the same by hand, which has no cache", by_hand))


def image_sizes(b: Session) -> None:
    engine = containers.client()
    for tag in b.images:
        size = engine.images.get(tag).attrs["Size"]
        noted = NOTED_BYTES.get(tag, NOTED_BYTES.get(tag.split(":")[0]))
        b.add(Row("images", f"`{tag}`", "MB", [size / 1e6], "size in the note of its issue",
                  [noted / 1e6] if noted else []))
