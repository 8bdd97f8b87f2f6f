"""The convert stage, run in the convert image: the merged model to GGUF, its quants and their checks (gguf.py).

This file is only the stage's declaration, which the host reads for the cache key.
"""

from finetune.core.stage import Stage

STAGE = Stage(
    name="convert",
    # serve.quant and serve.baseline: the base model is converted at the served type for the baseline
    params=("model", "data.train", "data.eval", "convert", "serve.quant", "serve.baseline"),
    files=("data.train", "data.eval"),  # calibration text (imatrix) and perplexity references
    upstream="train",
    outs=("convert",),
)
