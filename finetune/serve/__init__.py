"""The serve stage, run on the host: the Modelfiles (modelfiles.py, modelfile.py) and the Ollama container
that serves them (server.py), built from Dockerfile.serve.

This file is only the stage's declaration. The Modelfiles are written on the host, so the stage's key covers
the code that writes them (`code`) rather than an image.
"""

from finetune.core.stage import Stage

STAGE = Stage(
    name="serve",
    # convert.outtype and quant_types: a Modelfile per built type; train.seed: the Modelfile's sampling seed
    params=("model.chat_template", "train.seed", "serve", "convert.outtype", "convert.quant_types"),
    upstream="convert",
    outs=("serve",),
    code=("finetune/core", "finetune/serve"),
)
