"""The two executors of one pipeline: local (a process pool) and Spark (mapInArrow, shuffles)."""
