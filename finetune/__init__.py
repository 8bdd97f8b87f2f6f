"""finetune: the stage code of `invoke train convert serve`.

Modules run inside the stage images (train, convert, serve) and as helpers of tasks.py on the host.
One module per concern: config (the run configuration), data (datasets), templates (chat formats),
containers (building images and running stage containers), baseimage (a base image without a registry).
"""
