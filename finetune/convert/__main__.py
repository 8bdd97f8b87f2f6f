"""`python -m finetune.convert`: the convert image's entrypoint."""

from finetune.convert.gguf import main
from finetune.core.stage import exit_without_teardown

exit_without_teardown(main())
