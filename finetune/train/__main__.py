"""`python -m finetune.train`: the train image's entrypoint."""

import sys

from finetune.train.sft import main

sys.exit(main())
