"""finetune: chat data in, a fine-tuned model served by Ollama out (`invoke train convert serve`).

The folders are the architecture:
    core/        shared by the host and every stage image: config, data, chat templates, the stage declaration
                 and command line, the run's layout (every name and path)
    train/       runs in the train image (Dockerfile.train copies core/ and train/ only)
    convert/     runs in the convert image (Dockerfile.convert copies core/ and convert/ only)
    serve/       runs on the host: the Modelfiles, and the Ollama container of Dockerfile.serve
    host/        runs on the host for tasks.py: images and containers, the stage cache, the manifest
    evaluation/  `invoke eval`, on the host
    bench/       `invoke bench`, on the host
Each stage folder's __init__.py declares what the stage reads and writes (core/stage.py: Stage).
"""
