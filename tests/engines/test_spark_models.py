"""`--scores model` through the Spark engine: the tiny real-architecture models loaded once per Python worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from curate.models.testing import write_tiny_weights
from curate.pipeline import run_local


def test_model_scores_on_spark_match_the_local_engine(spark: Any, tmp_path: Path, corpus_factory: Any,
                                                      config_factory: Any) -> None:
    from curate.engines.spark import run_spark

    corpus = corpus_factory(16)
    weights = write_tiny_weights(tmp_path / "weights")
    config = config_factory(scores="model", device="cpu", batch_size=8, threshold=0.0, max_watermark=1.0,
                            world_size=2, workers_per_rank=1, dedup=["url", "exact", "phash"], **weights)
    local = run_local([str(corpus.path)], tmp_path / "local", config)
    stats = run_spark(spark, [str(corpus.path)], str(tmp_path / "spark"), config)
    assert stats["scores_source"] == local["scores_source"] == "model"
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]
    ours = pq.read_table(tmp_path / "spark" / "samples.parquet").sort_by("key").to_pydict()
    theirs = pq.read_table(tmp_path / "local" / "samples.parquet").sort_by("key").to_pydict()
    assert ours["key"] == theirs["key"] and ours["shard"] == theirs["shard"] and len(ours["key"]) >= 2
    assert ours["aesthetic_score"] == pytest.approx(theirs["aesthetic_score"], abs=1e-4)
    assert ours["watermark_prob"] == pytest.approx(theirs["watermark_prob"], abs=1e-4)
