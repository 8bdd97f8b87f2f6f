"""`python -m finetune.train`: the train image's entrypoint."""

from finetune.core.stage import exit_without_teardown
from finetune.train.sft import main

exit_without_teardown(main())
