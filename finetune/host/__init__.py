"""What runs only on the host, for tasks.py: image builds and stage containers, the base image without a
registry, the stage cache and the run's manifest. No stage image copies this folder."""
