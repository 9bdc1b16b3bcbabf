"""fsspec storage for both executors: paths, atomic writes, checkpoints."""
