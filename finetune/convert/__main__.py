"""`python -m finetune.convert`: the convert image's entrypoint."""

import os
import sys

from finetune.convert.gguf import main

code = main()
# Everything is written and published (or removed) by now. Skip the interpreter's teardown of the modules
# transformers loaded for the tokenizer check: 0.25 s, a twentieth of a small model's convert stage.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
