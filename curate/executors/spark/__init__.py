"""The Spark executor: mapInArrow stages, shuffles for the global steps (jobs/ calls it)."""
