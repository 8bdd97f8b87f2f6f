"""`python -m finetune.convert`: the convert image's entrypoint."""

import sys

from finetune.convert.gguf import main

sys.exit(main())
