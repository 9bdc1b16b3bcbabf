"""Engines drive the stage functions: local (in-process, process pool) and Spark."""
