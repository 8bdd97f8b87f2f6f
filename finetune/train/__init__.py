"""The train stage, run in the train image: LoRA/QLoRA fine-tuning (sft.py), the offline tiny base model
(tiny.py), the numerical pin (numerics.py) and the training metrics (metrics.py).

This file is only the stage's declaration, which the host reads for the cache key: importing it loads no
torch.
"""

from finetune.core.stage import Stage

STAGE = Stage(
    name="train",
    params=("model", "data", "train", "serve.baseline"),  # serve.baseline: keep the base for the baseline
    # a local model directory, a .jinja file, a Go template of one's own
    files=("data.train", "data.eval", "model.id", "model.chat_template", "model.go_template"),
    upstream=None,
    outs=("train",),
)
