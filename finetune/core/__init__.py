"""What the host and every stage image share (each image copies this folder): the run config, datasets, chat
templates, the stage declaration and command line, the run's layout (names and paths)."""
