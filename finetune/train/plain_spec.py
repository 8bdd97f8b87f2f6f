"""The train stage's SFTConfig and LoraConfig arguments for a run, as JSON: what `invoke bench` gives its plain
TRL baseline (finetune/bench/plain_sft.py), so that both train the same way. Runs in the train image, so that
the host never imports the training code.

    python -m finetune.train.plain_spec --config run.yaml --device cpu --precision fp32 --method lora --out spec.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finetune.core.config import load_config
from finetune.train import STAGE
from finetune.train.sft import lora_kwargs, sft_kwargs


def spec(config, device: str, precision: str, method: str) -> dict:
    """spec.json of plain_sft.py: {"sft": SFTConfig kwargs, "lora": LoraConfig kwargs, "qlora", "revision"}."""
    return {"sft": sft_kwargs(config, device, precision) | {"save_strategy": "no"}, "lora": lora_kwargs(config),
            "qlora": method == "qlora", "revision": config.model.revision}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", required=True, choices=("cpu", "cuda"))
    parser.add_argument("--precision", required=True)
    parser.add_argument("--method", required=True, choices=("lora", "qlora"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    found = spec(STAGE.view(load_config(args.config)), args.device, args.precision, args.method)
    args.out.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
