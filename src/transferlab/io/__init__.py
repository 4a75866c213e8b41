"""Files on disk: atomic writes, content digests, the run and experiment directories, checkpoints."""
