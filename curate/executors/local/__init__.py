"""The local executor: a process pool, hash-partitioned global steps, the shard writer."""
