"""Tools around a run: score-embeddings, dedup-embeddings, the demo."""
